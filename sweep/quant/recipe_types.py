"""A recipe.json read back (written by `python -m sweep.recipe`, sweep/recipe/export.py) into a per-tensor map: the
type of every tensor and the sweep format that rounds it, for a joint point (`fmt=recipe fmt.recipe=PATH`: the whole
recipe applied at once, no file built), and what the tables predicted for it (sweep/scoring/additivity.py sets the
measured joint damage against it).

A file is read and hashed once per (path, size, modification time): labels and per-tensor formats ask the map, not
the file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import SweepError
from ..files import file_memo
from .ggml_types import GGML_NAME

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
        """The sweep format (sweep/quant/formats.py) that rounds `tensor` as the recipe stores it."""
        ty = self.planned(tensor).type
        return FLOAT_FORMATS.get(ty) or _OURS.get(ty, ty)


_OURS = {ggml: name for name, ggml in GGML_NAME.items()}  # a ggml type's name -> the sweep format of that type


@file_memo(maxsize=8)
def read(p: Path) -> RecipeFile:
    """recipe.json, validated; a bad or missing file is one SweepError line."""
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
