"""`--tie gate,up`, `--tie q,k,v`: tensor classes of a block that take one type, as one choice of the solver.

Why: some backends fuse the matrix products of tensors that share an input when they share a type (gate and up of
a gated FFN; q, k and v of attention), and a recipe that mixes their types loses that kernel. A tie is a group of
the solver (solve.py: the matching tensors of each block share one type), so its cost in predicted damage is exact:
the recipe solved with and without the tie at the same budget. The built file is read back: one type per tie and
block (`check_ties`).
"""

from __future__ import annotations

import re

from ..errors import SweepError
from ..llama.gguf_names import block_of
from .solve import Recipe

# short names users type -> the tensor classes of llama.cpp's blocks (gguf's TENSOR_NAMES: blk.N.<class>.weight);
# a class name itself is accepted too
SHORT = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate", "up": "ffn_up",
         "down": "ffn_down"}
TIE_HELP = ", ".join(f"{k}={v}" for k, v in SHORT.items()) + "; MoE expert stacks (ffn_gate_exps ...) tie alike"


def tie_pattern(text: str) -> str:
    """The solver's group pattern of one --tie value: the named classes of one block (and their expert stacks)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    classes = [SHORT.get(n, n) for n in names]
    bad = [n for n, c in zip(names, classes) if not re.fullmatch(r"(attn|ffn)_[a-z_]+", c)]
    if bad or len(set(classes)) < 2:
        why = f"unknown tensor class {bad[0]!r}" if bad else "a tie needs two or more classes"
        raise SweepError(f"--tie {text!r}: {why}; e.g. --tie gate,up or --tie q,k,v ({TIE_HELP})")
    return r"^blk\.\d+\.(" + "|".join(re.escape(c) for c in dict.fromkeys(classes)) + r")(_exps)?\.weight$"


def tie_patterns(ties: list[str]) -> list[str]:
    return [tie_pattern(t) for t in ties]


def check_ties(file_types: dict[str, str], patterns: list[str], where: str) -> int:
    """Every tie of the built file (its tensors' types, read back) holds one type per block; returns the ties seen."""
    seen: dict[tuple[str, int | None], dict[str, str]] = {}
    for name, ty in file_types.items():
        for p in patterns:
            if re.search(p, name):
                seen.setdefault((p, block_of(name)), {})[name] = ty
                break
    for (_, block), members in seen.items():
        if len(set(members.values())) > 1:
            shown = ", ".join(f"{n}={t}" for n, t in sorted(members.items()))
            raise SweepError(f"{where}: the tie of block {block} holds several types ({shown})")
    return len(seen)


def tie_cost(ties: list[str], tied: Recipe, untied: Recipe, metric: str) -> dict:
    """What the ties cost in predicted damage: the recipe with and without them at the same budget."""
    cost = tied.damage - untied.damage
    changed = sum(1 for a, b in zip(tied.choices, untied.choices) if a.type_stored != b.type_stored)
    line = (f"tie {' '.join(ties)}: predicted {metric} {tied.damage:.4g} against {untied.damage:.4g} untied "
            f"({cost:+.3g}, {100 * cost / untied.damage if untied.damage else 0:+.1f}%); {changed} tensor(s) take "
            f"another type than untied")
    return {"ties": ties, "predicted": tied.damage, "predicted_untied": untied.damage, "cost": cost,
            "tensors_changed": changed, "line": line}
