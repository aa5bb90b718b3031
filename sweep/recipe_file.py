"""A recipe.json read back (written by `python -m sweep.recipe`, sweep/recipe_export.py): the type of every tensor,
for a joint point (`fmt=recipe fmt.recipe=PATH`: the whole recipe applied at once, no file built), and what the
tables predicted for it, so that the point's record can say how far the measured joint damage is from the sum of
the single-tensor damages (the additivity residual), paired window by window when the point ran on the tables'
windows.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from .errors import SweepError

FLOAT_FORMATS = {"f32": "none", "f16": "fp16", "bf16": "bf16"}  # a recipe's float types as sweep formats


@dataclass(frozen=True)
class Planned:
    type: str  # what llama.cpp stores (recipe.json "type": the row fallback applied)
    damage: float | None  # the tables' single-tensor damage at that type (None: not covered by the tables)
    windows: tuple[float, ...] | None  # its per-window means (recipe.json from before they were written: None)


@dataclass(frozen=True)
class RecipeFile:
    path: Path
    sha256: str
    metric: str
    tensors: dict[str, Planned]
    measured_on: dict  # container, n_ctx, n_windows, data_sha256 of the tables
    model_sha256: str | None
    imatrix: str | None

    def planned(self, tensor: str) -> Planned:
        if tensor not in self.tensors:
            raise SweepError(f"the recipe {self.path} has no type for {tensor}: target only its tensors (it names "
                             f"{len(self.tensors)}, e.g. {next(iter(self.tensors), '-')})")
        return self.tensors[tensor]

    def format_name(self, tensor: str) -> str:
        """The sweep format (sweep/formats.py) that rounds `tensor` as the recipe stores it."""
        ty = self.planned(tensor).type
        from .ggml_formats import GGML_NAME

        ours = {ggml: name for name, ggml in GGML_NAME.items()}
        return FLOAT_FORMATS.get(ty) or ours.get(ty, ty)


def read(path: str | Path) -> RecipeFile:
    """recipe.json, validated; a bad or missing file is one SweepError line."""
    import hashlib

    p = Path(path)
    hint = "give the recipe.json that `python -m sweep.recipe` wrote (fmt.recipe=DIR/recipe.json)"
    try:
        raw = p.read_bytes()
        data = json.loads(raw)
        tensors = {t["name"]: Planned(t["type"], t.get("predicted_damage"),
                                      tuple(t["predicted_damage_windows"]) if t.get("predicted_damage_windows")
                                      else None) for t in data["tensors"]}
        metric = data["metric"]
    except OSError as e:
        raise SweepError(f"cannot read the recipe {p}: {e.strerror}; {hint}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise SweepError(f"{p} is not a recipe.json ({type(e).__name__}: {e}); {hint}") from None
    return RecipeFile(p, hashlib.sha256(raw).hexdigest(), metric, tensors, data.get("measured_on") or {},
                      data.get("model_sha256"), data.get("imatrix"))


def prediction_columns(recipe: RecipeFile, names: tuple[str, ...], measured: np.ndarray | None,
                       context: dict) -> dict:
    """The joint point's prediction (sum of the tables' single damages of its tensors) and, when the point ran on
    the tables' windows (`context`: model_sha256, container, n_ctx, data_sha256, stopped_early), the
    additivity residual measured - predicted, paired over windows: its mean, standard error and 95% t-interval.

    `measured`: the point's per-window damage in the recipe's metric (metrics.Metric.window_damage)."""
    planned = {n: recipe.planned(n) for n in names}
    covered = {n: p for n, p in planned.items() if p.damage is not None}
    # quantized tensors the tables never measured (token_embd at a default type): in the point, not in the prediction
    outside = [f"{n}={p.type}" for n, p in planned.items() if p.damage is None and p.type not in FLOAT_FORMATS]
    predicted = float(sum(p.damage for p in covered.values()))
    out = {"additivity_metric": recipe.metric, "predicted": predicted, "predicted_tensors": len(covered),
           "not_predicted": ",".join(outside) or None}
    windows = [p.windows for p in covered.values()]
    if not covered or measured is None:
        out["additivity_note"] = "nothing to predict" if not covered else f"{recipe.metric} has no per-window values"
        return out
    why = _not_paired(recipe, context, windows, len(measured))
    if why:
        out["additivity_note"] = f"no paired residual: {why}"
        return out
    per_window = np.sum(np.array(windows, dtype=np.float64), axis=0)
    residual = measured - per_window
    k = len(residual)
    se = float(residual.std(ddof=1) / math.sqrt(k))
    half = float(stats.t.ppf(0.975, k - 1) * se)
    mean = float(residual.mean())
    out.update(predicted_stderr=float(per_window.std(ddof=1) / math.sqrt(k)), additivity_residual=mean,
               additivity_residual_stderr=se, additivity_residual_lo=mean - half, additivity_residual_hi=mean + half)
    return out


def _not_paired(recipe: RecipeFile, context: dict, windows: list, n_measured: int) -> str | None:
    """Why the point's windows are not the tables' windows (None: they are, so residuals pair window by window)."""
    on = recipe.measured_on
    if any(w is None for w in windows):
        return "the recipe.json has no per-window predictions (write it again with this version of sweep.recipe)"
    if n_measured < 2:
        return "fewer than 2 windows"
    if context.get("stopped_early"):
        return "the point stopped early"
    if recipe.model_sha256 and context["model_sha256"] != recipe.model_sha256:
        return "another model than the tables'"
    for key in ("container", "n_ctx", "data_sha256"):
        if on.get(key) is not None and str(on[key]) != str(context[key]):
            return f"{key} {context[key]} differs from the tables' {on[key]}"
    if any(len(w) != n_measured for w in windows):
        return f"the tables have {len(windows[0])} windows per tensor, the point {n_measured}"
    return None
