"""A recipe on disk: `recipe.txt` for llama-quantize's `--tensor-type-file`, and `recipe.json` with the figures.

How llama.cpp reads the file (tools/quantize/quantize.cpp of the vendored llama.cpp, `parse_tensor_type_file`):
whitespace-separated tokens (`file >> arg`), each `name=type`; the name is lower-cased; the type is matched
case-insensitively against ggml_type_name(). How it applies them (src/llama-quant.cpp, `llama_tensor_get_type`):
each pattern is a std::regex searched in the tensor's name (`std::regex_search`, not a full match), the first
matching pattern wins, and only when the file's ftype is a quantized type. So every pattern here is anchored
(`^blk\\.3\\.attn_q\\.weight$`) and names exactly one tensor, and every quantizable tensor gets a line: none is
left to the ftype's own mix.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from ..errors import SweepError
from ..files import atomic_write_bytes
from ..quant.ggml_types import TYPES, ggml_type_by_name
from .sizes import SourceModel
from .solve import Recipe


def pattern_for(name: str) -> str:
    return "^" + re.escape(name) + "$"


def type_id(name: str) -> int:
    if name in TYPES:
        return TYPES[name].type_id
    try:
        return ggml_type_by_name(name).type_id
    except KeyError:
        raise SweepError(f"unknown ggml type {name!r} in the recipe") from None


def overrides(recipe: Recipe, source: SourceModel) -> list[tuple[str, str]]:
    """(anchored pattern, stored type) for every tensor llama.cpp's quantizer would quantize."""
    return [(pattern_for(c.tensor), c.type_stored) for c in recipe.choices if source.tensor(c.tensor).quantizable]


def write_recipe_txt(path: Path, lines: list[tuple[str, str]]) -> None:
    for pattern, _ in lines:
        if any(ch.isspace() for ch in pattern) or pattern != pattern.lower():
            # llama-quantize splits on whitespace and lower-cases names: such a pattern would not survive
            raise SweepError(f"tensor pattern {pattern!r} cannot be written for llama-quantize (whitespace or "
                             f"upper case)")
    atomic_write_bytes(path, "".join(f"{p}={t}\n" for p, t in lines).encode())


def read_recipe_txt(path: Path) -> list[tuple[str, str]]:
    """As llama-quantize's parse_tensor_type_file reads it."""
    out = []
    for token in Path(path).read_text().split():
        name, sep, ty = token.partition("=")
        if not sep or not name or not ty:
            raise SweepError(f"{path}: malformed tensor type {token!r} (expected pattern=type)")
        match = [t for t in [*TYPES, "f32", "f16", "bf16"] if t.lower() == ty.lower()]
        if not match:
            raise SweepError(f"{path}: invalid quantization type {ty!r}")
        out.append((name.lower(), match[0]))
    return out


def types_from_patterns(lines: list[tuple[str, str]], names: list[str]) -> dict[str, str]:
    """The type each tensor gets: the first pattern found in its name (std::regex_search; these anchored,
    escaped patterns mean the same in ECMAScript and Python regexes)."""
    compiled = [(re.compile(p), t) for p, t in lines]
    out = {}
    for n in names:
        for rx, t in compiled:
            if rx.search(n):
                out[n] = t
                break
    return out


def recipe_json(recipe: Recipe, source: SourceModel, meta: dict) -> dict:
    return {
        "command": " ".join(["python -m sweep.recipe", *sys.argv[1:]]) if meta.get("command") is None
        else meta["command"],
        **{k: v for k, v in meta.items() if k != "command"},
        "source": str(source.path),
        "budget_bytes": recipe.budget,
        "budget_counts": ("the whole file (header + every tensor, padded)" if recipe.budget_kind == "file"
                          else "every tensor's bytes (bits per weight over all elements)"),
        "predicted_file_bytes": recipe.predicted_file_bytes,
        "tensor_bytes": recipe.tensor_bytes,
        "bpw": recipe.bpw,
        "predicted_damage": recipe.damage,
        "predicted_damage_stderr": recipe.damage_stderr,
        "predicted_damage_windows": None if recipe.windows is None else [float(x) for x in recipe.windows],
        "solver": recipe.solver,
        "types_used": _count(recipe),
        "tensors": [{"name": c.tensor, "type": c.type_stored, "type_asked": c.type_asked, "bytes": c.bytes,
                     "predicted_damage": None if c.type_asked is None else c.damage,
                     "predicted_damage_stderr": None if c.type_asked is None else c.stderr,
                     "predicted_damage_windows": None if c.type_asked is None or c.windows is None
                     else [float(x) for x in c.windows],
                     "covered": c.type_asked is not None, "group": c.group} for c in recipe.choices],
    }


def _count(recipe: Recipe) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in recipe.choices:
        out[c.type_stored] = out.get(c.type_stored, 0) + 1
    return dict(sorted(out.items()))


def write_recipe(out_dir: Path, recipe: Recipe, source: SourceModel, meta: dict) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    txt, js = out_dir / "recipe.txt", out_dir / "recipe.json"
    write_recipe_txt(txt, overrides(recipe, source))
    atomic_write_bytes(js, json.dumps(recipe_json(recipe, source, meta), indent=1, allow_nan=True).encode())
    return txt, js
