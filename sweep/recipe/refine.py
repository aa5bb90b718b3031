"""`sweep recipe ... --refine N`: where a recipe's choice rests on the map's predictions, measure them and solve again.

A tensor's choice rests on predictions when its chosen type and a neighbouring candidate (the next smaller or larger
type of --types) have damage intervals that overlap and at least one of the two is predicted (run.estimate=map).
Each round measures the most ambiguous of those predicted points exactly -- the pairs whose predicted damages differ
least relative to their intervals' width first -- by the sweep itself, on the tables' model, text, slice and
container, into OUT/refine/round-K/; the exact rows then replace the predictions, and the recipe is solved again.
Rounds stop when no choice rests on overlapping predictions, or when N points have been measured.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..errors import SweepError
from ..llama.gguf_names import split_block
from .sizes import SourceModel
from .solve import Recipe, measured_key
from .table import Table, sweep_on_tables

log = logging.getLogger("sweep.recipe")


def ambiguous(recipe: Recipe, table: Table, source: SourceModel, types: list[str]) -> list[tuple[str, str]]:
    """The predicted (tensor, type asked) points a choice rests on, most ambiguous first."""
    by_bytes = list(types)  # (--types in any order: sorted by the bytes they take)
    found: dict[tuple[str, str], float] = {}
    for c in recipe.choices:
        if c.type_asked is None or c.type_asked not in types:
            continue
        t = source.tensor(c.tensor)
        ladder = sorted(by_bytes, key=t.bytes_as)
        rows = {ty: table.rows.get(measured_key(source, c.tensor, ty)) for ty in ladder}
        mine = rows[c.type_asked]
        i = ladder.index(c.type_asked)
        for j in (i - 1, i + 1):
            if mine is None or not 0 <= j < len(ladder):
                continue
            other = rows[ladder[j]]
            if other is None or other.type_stored == mine.type_stored or not (mine.estimated or other.estimated):
                continue
            (a_lo, a_hi), (b_lo, b_hi) = mine.interval(), other.interval()
            if a_lo <= b_hi and b_lo <= a_hi:  # the intervals overlap: the data cannot tell the two apart
                width = max(a_hi, b_hi) - min(a_lo, b_lo)
                score = abs(mine.damage - other.damage) / width if width > 0 else 0.0
                for ty, m in ((c.type_asked, mine), (ladder[j], other)):
                    if m.estimated:
                        found[c.tensor, ty] = min(found.get((c.tensor, ty), score), score)
    return sorted(found, key=lambda k: (found[k], k))


def store_of(runs: list[Path]) -> str:
    """The store the tables' sweeps used (their multirun.yaml), else the default one."""
    for run in runs:
        cfg = Path(run) / "multirun.yaml"
        if cfg.is_file():
            loaded = OmegaConf.load(cfg)
            store = OmegaConf.select(loaded, "run.store") if isinstance(loaded, DictConfig) else None
            if store:
                return str(store)
    return "runs/store"


def measure(points: list[tuple[str, str]], table: Table, out: Path, store: str, threads: int,
            imatrix: Path | None) -> list[Path]:
    """The points measured exactly by the sweep: one sweep per (tensor class, type) over its layers."""
    groups: dict[tuple[str, str], list[int]] = {}
    for tensor, ty in points:
        split = split_block(tensor)
        if split is None:
            raise SweepError(f"--refine measures block tensors; {tensor} is outside the blocks")
        groups.setdefault((split[1].removesuffix(".weight"), ty), []).append(split[0])
    dirs = []
    for (cls, ty), layers in sorted(groups.items()):
        sweep_dir = out / f"{cls}-{ty}"
        sweep_on_tables(table, ["kind=weight", f"tensor={cls}", f"fmt={ty}",
                                f"layer={','.join(map(str, sorted(layers)))}"], sweep_dir, store, threads, imatrix,
                        f"--refine: measuring {cls} {ty}")
        dirs.append(sweep_dir)
    return dirs


def refine(solve: Callable[[Table], Recipe], read: Callable[[list[Path]], Table], runs: list[Path], table: Table,
           source: SourceModel, types: list[str], budget_points: int, out: Path, threads: int,
           imatrix: Path | None) -> tuple[Recipe, Table, list[dict], list[Path]]:
    """Solve; measure up to `budget_points` ambiguous predictions, round by round; solve again. Returns the last
    recipe, its table, one entry per round (printed as it happens) and the sweep directories it measured into."""
    recipe, spent = solve(table), 0
    rounds: list[dict] = []
    extra: list[Path] = []
    store = store_of(runs)
    while True:
        todo = ambiguous(recipe, table, source, types)
        take = todo[:max(0, budget_points - spent)]
        entry = {"round": len(rounds) + 1, "ambiguous": len(todo), "measured": take, "predicted_damage":
                 recipe.damage}
        if not take:
            why = "no choice rests on overlapping predictions" if not todo else \
                f"--refine {budget_points} points spent, {len(todo)} ambiguous left"
            print(f"refine: round {entry['round']}: {why}; recipe predicted {table.metric} {recipe.damage:.4g}")
            rounds.append({**entry, "stop": why})
            return recipe, table, rounds, extra
        before = {(t, ty): table.rows[measured_key(source, t, ty)].damage for t, ty in take}
        extra += measure(take, table, out / f"round-{entry['round']}", store, threads, imatrix)
        spent += len(take)
        table = read([*runs, *extra])
        new = solve(table)
        changed = sum(1 for a, b in zip(recipe.choices, new.choices) if a.type_stored != b.type_stored)
        misses = [(t, ty, before[t, ty], table.rows[measured_key(source, t, ty)].damage) for t, ty in take]
        print(f"refine: round {entry['round']}: {len(todo)} choices rest on overlapping predictions; measured "
              f"{len(take)} exactly (e.g. " + ", ".join(f"{t} {ty} predicted {p:.3g} measured {m:.3g}"
                                                     for t, ty, p, m in misses[:3])
              + f"); {changed} tensors changed type; predicted {table.metric} {recipe.damage:.4g} -> "
                f"{new.damage:.4g}")
        rounds.append({**entry, "changed": changed, "measured_values": misses})
        recipe = new
