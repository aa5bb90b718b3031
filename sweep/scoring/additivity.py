"""A joint point's additivity: the prediction a recipe.json carries (the sum of the tables' single-tensor damages of
its tensors) set against the damage measured with all of them applied at once, paired window by window when the
point ran on the tables' windows (the additivity residual with its standard error and 95% t-interval)."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from ..quant.recipe_types import FLOAT_FORMATS, RecipeFile


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
    predicted = float(sum(p.damage for p in covered.values() if p.damage is not None))  # (all of them)
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
