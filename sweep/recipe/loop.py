"""The closed loop: solve, measure the recipe's joint points, correct the additive model where it is wrong, solve again.

The solver assumes that damages add up. After solving, the recipe's tensors are applied together inside a sweep
(`fmt=recipe`, sweep/scoring/additivity.py), on the tables' own windows: one joint point per chunk of
`blocks` consecutive blocks (`tensor=all layer=[...]`) and one for the whole recipe (`layer=null`). Tensors the
tables do not cover stay as in the source (F32) in these points, so a point measures exactly what its prediction sums.

Correction: damage_i(type) of every tensor in chunk g is scaled by a factor a_g, the least-squares fit through the
origin of the chunk's measured joint damages on their raw predictions over every iteration so far (an interaction
term per chunk: a_g > 1 where the tensors hurt more together than alone). The whole recipe is predicted as the
sum of the corrected chunks. Then the recipe is solved again with the corrected damages.

Stop rules, in this order: `agree` when every point's residual (measured - corrected prediction, paired over windows)
has a 95% interval holding 0; `unchanged` when the corrected solve gives a recipe already measured (measuring it again
teaches nothing); `budget` when the next iteration's points would exceed the budget of joint points.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import numpy as np
import pandas as pd
from scipy import stats

from ..errors import SweepError
from ..files import atomic_write_bytes
from ..llama.gguf_names import block_of
from ..scoring.metrics import RANKABLE
from .export import write_recipe
from .sizes import SourceModel
from .solve import Choice, Recipe, make_recipe
from .table import Table, sweep_on_tables

log = logging.getLogger("sweep.recipe")

OUTSIDE = "outside"  # the chunk of covered tensors outside the blocks (token_embd, output)


class JointPoint(TypedDict):
    """One joint point of an iteration: measured, raw and corrected prediction, the paired residual."""
    chunk: str  # a chunk's label, or "whole"
    tensors: int
    measured: float
    predicted_raw: float
    predicted: float
    residual: float
    stderr: float
    ci95: tuple[float, float]
    agrees: bool  # ci95 holds 0


class Iteration(TypedDict):
    """One iteration of the loop, as loop.json records it."""
    iteration: int
    alpha_used: dict[str, float]
    predicted_raw: float
    changed: list[str]
    points: list[JointPoint]
    joint_points_spent: int


@dataclass(frozen=True)
class LoopSettings:
    budget: int  # joint points, all iterations together
    blocks: int  # consecutive blocks per joint point
    threads: int
    imatrix: Path | None = None
    store: Path | None = None  # where the joint sweeps keep the baseline (default: next to the iterations)


def chunks(tensors: Iterable[str], blocks: int) -> dict[str, list[int] | None]:
    """Joint points' chunks of covered tensors: label -> block numbers (None: the tensors outside the blocks)."""
    if blocks < 1:
        raise SweepError(f"--loop-blocks {blocks}: give at least 1 block per joint point")
    nums = sorted({b for t in tensors if (b := block_of(t)) is not None})
    out: dict[str, list[int] | None] = {}
    for i in range(0, len(nums), blocks):
        part = nums[i:i + blocks]
        out[f"blk {part[0]}" if len(part) == 1 else f"blk {part[0]}-{part[-1]}"] = part
    if any(block_of(t) is None for t in tensors):
        out[OUTSIDE] = None
    return out


def chunk_of(tensor: str, parts: dict[str, list[int] | None]) -> str:
    n = block_of(tensor)
    if n is None:
        return OUTSIDE
    return next(label for label, nums in parts.items() if nums is not None and n in nums)


def stop_reason(points: list[JointPoint], repeated: bool, spent: int, cost: int, budget: int) -> str | None:
    """Why the loop stops now (None: go on). `points`: the last iteration's (each with its residual's 95% interval
    `ci95`), empty before the first; `repeated`: the recipe just solved was measured before; `cost`: joint points of
    the next iteration."""
    if points and all(p["ci95"][0] <= 0 <= p["ci95"][1] for p in points):
        return "agree"
    if repeated:
        return "unchanged"
    if spent + cost > budget:
        return "budget"
    return None


def scaled_table(table: Table, alpha: dict[str, float], parts: dict[str, list[int] | None]) -> Table:
    """The tables with every tensor's damages scaled by its chunk's factor."""
    rows = {}
    for key, m in table.rows.items():
        a = alpha.get(chunk_of(key[0], parts), 1.0)
        rows[key] = dataclasses.replace(m, damage=m.damage * a, stderr=m.stderr * a,
                                        windows=None if m.windows is None else m.windows * a)
    return dataclasses.replace(table, rows=rows)


def fit_alpha(history: list[Iteration]) -> dict[str, float]:
    """Per chunk: the least-squares factor through the origin of measured on raw predicted, over all iterations."""
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    for it in history:
        for p in it["points"]:
            if p["chunk"] == "whole" or p["predicted_raw"] <= 0:
                continue
            num[p["chunk"]] = num.get(p["chunk"], 0.0) + p["measured"] * p["predicted_raw"]
            den[p["chunk"]] = den.get(p["chunk"], 0.0) + p["predicted_raw"] ** 2
    return {c: num[c] / den[c] for c in num if den[c] > 0}


def _interval(diff: np.ndarray) -> tuple[float, float, tuple[float, float]]:
    k = len(diff)
    mean = float(diff.mean())
    se = float(diff.std(ddof=1) / math.sqrt(k)) if k > 1 else math.nan
    half = float(stats.t.ppf(0.975, k - 1) * se) if k > 1 else math.nan
    return mean, se, (mean - half, mean + half)


def joint_recipe(recipe: Recipe) -> Recipe:
    """The recipe as its joint points apply it: tensors the tables do not cover stay as in the source (f32)."""
    return dataclasses.replace(recipe, choices=[c if c.type_asked is not None else
                                                dataclasses.replace(c, type_stored="f32") for c in recipe.choices])


def measure(recipe_json: Path, table: Table, parts: dict[str, list[int] | None], settings: LoopSettings,
            out: Path) -> pd.DataFrame:
    """The joint points of one iteration, by the sweep itself (`fmt=recipe`), on the tables' windows."""
    layers = [f"[{','.join(map(str, nums))}]" for nums in parts.values() if nums is not None]
    layer_axis = ",".join((["null"] if len(parts) > 1 or OUTSIDE in parts else []) + layers)
    sweep_on_tables(table, ["kind=weight", "fmt=recipe", f"fmt.recipe={recipe_json}", "tensor=all",
                            f"layer={layer_axis}"], out, settings.store or out.parent / "store", settings.threads,
                    settings.imatrix, "the joint points of the closed loop")
    return pd.read_parquet(out / "results.parquet")


def iteration_points(df: pd.DataFrame, recipe: Recipe, parts: dict[str, list[int] | None], alpha: dict[str, float],
                     metric: str) -> list[JointPoint]:
    """Each joint point: measured, raw and corrected prediction, and the residual paired over windows."""
    win_col = RANKABLE[metric].window_column
    if win_col is None:
        raise SweepError(f"the closed loop pairs residuals over windows: {metric} has no per-window values")
    choice = {c.tensor: c for c in recipe.choices if c.type_asked is not None}
    points: list[JointPoint] = []
    for r in df.itertuples(index=False):
        names = [n for n in str(r.targets).split(",") if n in choice]
        windows = {n: _windows(choice[n]) for n in names}
        label = "whole" if str(r.layers) == "-" else chunk_of(names[0], parts)
        measured_w = RANKABLE[metric].damage(np.asarray(getattr(r, win_col), float))
        raw_w = np.sum([windows[n] for n in names], axis=0)
        if label == "whole":
            corr_w = np.sum([alpha.get(chunk_of(n, parts), 1.0) * windows[n] for n in names], axis=0)
        else:
            corr_w = alpha.get(label, 1.0) * raw_w
        mean, se, ci = _interval(measured_w - corr_w)
        points.append({"chunk": label, "tensors": len(names), "measured": float(measured_w.mean()),
                       "predicted_raw": float(raw_w.mean()), "predicted": float(corr_w.mean()), "residual": mean,
                       "stderr": se, "ci95": ci, "agrees": bool(ci[0] <= 0 <= ci[1])})
    return sorted(points, key=lambda p: (p["chunk"] != "whole", p["chunk"]))


def _windows(c: Choice) -> np.ndarray:
    """A covered tensor's per-window damages (the tables of a per-window metric have them)."""
    if c.windows is None:
        raise SweepError(f"{c.tensor} at {c.type_stored}: its measurement has no per-window values")
    return c.windows


def _changes(before: Recipe | None, after: Recipe) -> list[str]:
    if before is None:
        return []
    old = before.types()
    return [f"{n}: {old[n]}->{t}" for n, t in after.types().items() if old.get(n) != t]


def closed_loop(table: Table, source: SourceModel, types: list[str], budget: int, defaults: str | list[str],
                groups: list[str] | None, out_dir: Path, meta: dict, settings: LoopSettings) -> tuple[Recipe, dict]:
    """The corrected recipe and the loop's record (every iteration: predicted, measured, residual with its
    interval, what changed), also written to out_dir/loop.json."""
    parts = chunks(table.tensors, settings.blocks)
    cost = len(parts) + (1 if len(parts) > 1 or OUTSIDE in parts else 0)
    alpha: dict[str, float] = {}
    history: list[Iteration] = []
    seen: set[frozenset] = set()
    spent = 0
    previous: Recipe | None = None
    points: list[JointPoint] = []
    while True:
        recipe = make_recipe(scaled_table(table, alpha, parts) if alpha else table, source, types, budget, "file",
                             defaults, groups)
        key = frozenset(recipe.types().items())
        why = stop_reason(points, key in seen, spent, cost, settings.budget)
        if why == "agree":  # the recipe just measured holds: keep it
            assert previous is not None  # (agreeing points were measured on it)
            recipe = previous
        if why:
            break
        k = len(history)
        it_dir = out_dir / f"iter-{k}"
        _, js = write_recipe(it_dir, joint_recipe(recipe), source, meta)
        raw = _with_raw_damages(recipe, table) if alpha else recipe
        df = measure(js, table, parts, settings, it_dir / "joint")
        points = iteration_points(df, raw, parts, alpha, table.metric)
        spent += len(points)
        changed = _changes(previous, recipe)
        history.append({"iteration": k, "alpha_used": dict(alpha), "predicted_raw": raw.damage,
                        "changed": changed, "points": points, "joint_points_spent": spent})
        _print_iteration(history[-1], meta.get("size") or meta.get("budget_from", ""))
        seen.add(key)
        previous = recipe
        alpha = fit_alpha(history)
    record = {"stop": why, "final_recipe_measured": bool(history) and why != "budget",  # budget: solved, unmeasured
              "iterations": history, "joint_points_spent": spent, "budget": settings.budget,
              "blocks_per_point": settings.blocks, "alpha_final": alpha,
              "final_types_changed_from_first": _changes(_first(history, table, source, types, budget, defaults,
                                                                groups), recipe)}
    print(f"closed loop: stop ({why}) after {len(history)} iteration(s), {spent} of {settings.budget} joint points")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "loop.json", json.dumps(record, indent=1, allow_nan=True).encode())
    return recipe, record


def _first(history: list[Iteration], table: Table, source: SourceModel, types: list[str], budget: int,
           defaults: str | list[str], groups: list[str] | None) -> Recipe | None:
    return make_recipe(table, source, types, budget, "file", defaults, groups) if history else None


def _with_raw_damages(recipe: Recipe, table: Table) -> Recipe:
    """The recipe's choices with the tables' own (uncorrected) damages, so raw predictions stay raw."""
    choices = []
    for c in recipe.choices:
        if c.type_asked is None:
            choices.append(c)
            continue
        m = table.rows[(c.tensor, c.type_stored)]
        choices.append(dataclasses.replace(c, damage=m.damage, stderr=m.stderr, windows=m.windows))
    return dataclasses.replace(recipe, choices=choices,
                               damage=float(sum(c.damage for c in choices if c.type_asked is not None)))


def _print_iteration(it: Iteration, where: str) -> None:
    changed = ", ".join(it["changed"][:6]) + (" ..." if len(it["changed"]) > 6 else "") if it["changed"] else "-"
    factors = ", ".join(f"{c} {a:.3f}" for c, a in sorted(it["alpha_used"].items()))
    print(f"closed loop iteration {it['iteration']} ({where}): predicted {it['predicted_raw']:.4g} (sum of singles); "
          f"changed: {changed} ({len(it['changed'])} tensors){'; factors ' + factors if factors else ''}")
    for p in it["points"]:
        lo, hi = p["ci95"]
        print(f"  {p['chunk']:<12} {p['tensors']:>4} tensors  measured {p['measured']:.4e}  predicted "
              f"{p['predicted']:.4e} (raw {p['predicted_raw']:.4e})  residual {p['residual']:+.3e} "
              f"[{lo:+.2e}, {hi:+.2e}]{'' if p['agrees'] else '  *'}")
