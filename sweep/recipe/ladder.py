"""`--ladder` / `--sizes Q2_K,Q3_K_M,...`: a recipe at every llama.cpp preset size, each against its preset.

For each size: llama.cpp's preset is built from the same source (with the importance matrix, if one is given); its
file size is the budget; tensors the tables do not cover keep the type that preset gives them (unless
--default-type says otherwise), so recipe and preset differ only where the tables measured; the recipe is solved
(and, for --loop-sizes, corrected by measured joint points: sweep/recipe/loop.py), written to OUT/SIZE/, built with
llama.cpp's quantizer and checked tensor by tensor. A size the candidates cannot reach, or a preset llama.cpp will
not build, is one line in the output, not a silent gap. `--validate` then scores every recipe and every preset on the
same held-out windows (and `--heldout-text`'s), paired with the source in F32, and times them as llama-bench does
(pp512, tg128: sweep/llama/throughput.py): one table, one Pareto figure (ladder.json, ladder_pareto.png;
ladder_table.py).

Monotone by construction: the sizes are solved smallest file first, and a size whose solve predicts more damage than
a smaller size's recipe that fits its budget takes that recipe (with the tables covering every quantizable tensor the
exact solver never needs it: a larger budget admits every smaller recipe). Where the held-out measurement still
falls the other way, the table says so and why (ladder_table.order_check).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import re
from pathlib import Path

from ..errors import SweepError
from ..files import atomic_write_bytes
from ..llama.throughput import BenchSettings, measure
from ..scoring.text import Text
from .build import IMATRIX_LADDER, LADDER, NEED_IMATRIX, PRESETS, build_and_check, preset_file, stored_types
from .export import pattern_for, write_recipe
from .ladder_table import Rung, format_ladder, order_check, rung_json, write_plot
from .loop import LoopSettings, closed_loop
from .refine import refine
from .sizes import SourceModel
from .solve import Recipe, make_recipe
from .table import Table, read_table
from .ties import tie_cost, tie_patterns
from .validate import References, compute_identity

log = logging.getLogger("sweep.recipe")


def ladder_sizes(text: str | None, imatrix: Path | None) -> list[str]:
    """--sizes's names (checked), or every size of the ladder (the IQ2/IQ3 mixes too with an importance matrix)."""
    if text is None:
        return [*(IMATRIX_LADDER if imatrix else ()), *LADDER]
    sizes = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in PRESETS]
    if unknown or not sizes:
        raise SweepError(f"--sizes {text!r}: {'unknown preset ' + repr(unknown[0]) if unknown else 'empty'}; "
                         f"valid: {', '.join(PRESETS)}")
    return list(dict.fromkeys(sizes))


def preset_defaults(preset: Path) -> list[str]:
    """--default-type entries giving each tensor the type the preset stores it in."""
    return [f"{pattern_for(n)}={t}" for n, (t, _) in stored_types(preset).items()]


def _presets(sizes: list[str], args: argparse.Namespace, source_path: Path, imatrix: Path | None,
             threads: int) -> list[Rung]:
    """Every size's preset built (or the line why not); the rungs smallest file first (those without one first)."""
    rungs = []
    for size in sizes:
        rung = Rung(size)
        rungs.append(rung)
        if size in NEED_IMATRIX and imatrix is None:
            rung.note = "llama.cpp builds it only with an importance matrix (--imatrix)"
            print(f"{size}: no preset: {rung.note}")
            continue
        try:
            rung.preset = preset_file(args.out, source_path, size, imatrix, threads)
        except (SweepError, RuntimeError) as e:
            rung.note = f"llama.cpp did not build the preset ({e})"
            print(f"{size}: no preset: {rung.note}")
            continue
        rung.preset_bytes = rung.preset.stat().st_size
    return sorted(rungs, key=lambda r: -1 if r.preset_bytes is None else r.preset_bytes)


def run_ladder(args: argparse.Namespace, table: Table, source: SourceModel, source_path: Path, types: list[str],
               imatrix: Path | None, meta: dict, threads: int, other_text: Text | None = None) -> dict:
    sizes = ladder_sizes(args.sizes, imatrix)
    loop_sizes = set(ladder_sizes(args.loop_sizes, imatrix)) if args.loop_sizes else set()
    per_file = args.heldout_windows * (2 if other_text is not None else 1) + table.n_windows
    speed = BenchSettings(threads, reps=args.speed_reps) if args.validate and args.speed_reps else None
    print(f"ladder: {len(sizes)} size(s) {','.join(sizes)}; {len(loop_sizes)} through the closed loop (at most "
          f"{args.loop_budget} joint points of {table.n_windows} windows each); "
          + (f"validation: {2 * len(sizes)} files x {per_file} windows of {table.n_ctx} tokens + the reference's "
             f"{per_file}" if args.validate else "no validation")
          + (f"; throughput: pp{speed.n_prompt} and tg{speed.n_gen}, {speed.reps} repetitions alternated"
             if speed else ""))
    rungs = _presets(sizes, args, source_path, imatrix, threads)
    runs = list(args.runs)  # with --refine, the points it measured serve the sizes after too
    for rung in rungs:
        if rung.preset_bytes is None:
            continue
        assert rung.preset is not None
        size = rung.size
        defaults = args.default_type or preset_defaults(rung.preset)
        try:
            recipe = make_recipe(table, source, types, rung.preset_bytes, "file", defaults, args.group)
        except SweepError as e:
            if "infeasible budget" not in str(e):
                raise
            smallest = re.search(r" takes (.*?);", str(e))
            rung.note = (f"not reachable with candidates {','.join(types)}: the smallest recipe (the other tensors "
                         f"at {'the preset' if not args.default_type else 'the default'}'s types) takes "
                         f"{smallest.group(1) if smallest else '?'}")
            print(f"{size} ({rung.preset_bytes} bytes): {rung.note}")
            continue
        d = args.out / size
        if args.refine:
            solve = functools.partial(_solve, source=source, types=types, budget=rung.preset_bytes,
                                      defaults=defaults, groups=args.group)
            read = functools.partial(read_table, metric=table.metric, imatrix=imatrix is not None)
            recipe, table, rounds, measured = refine(solve, read, runs, table, source, types, args.refine,
                                                     d / "refine", threads, imatrix)
            runs += measured
            rung.refine = rounds
        m = {**meta, "size": size,
             "budget_from": f"the size of llama.cpp's {size} built from the same source ({rung.preset})",
             "default_type": "the preset's type of each tensor" if not args.default_type else args.default_type}
        if size in loop_sizes:
            recipe, rung.loop = closed_loop(table, source, types, rung.preset_bytes, defaults, args.group, d / "loop",
                                            m, LoopSettings(args.loop_budget, args.loop_blocks, threads, imatrix))
        recipe = _monotone(rung, recipe, rungs)
        rung.recipe = recipe
        if args.tie:
            rung.untied = make_recipe(table, source, types, rung.preset_bytes, "file", defaults, args.untied_group)
            rung.tie = tie_cost(args.tie, recipe, rung.untied, table.metric)
            m["ties"] = rung.tie
            print(f"{size}: {rung.tie['line']}")
        txt, js = write_recipe(d, recipe, source, {**m, "loop": rung.loop, "kept_from": rung.kept_from})
        print(f"{size}: recipe predicted {table.metric} {recipe.damage:.4g} in {recipe.predicted_file_bytes} bytes "
              f"(preset {rung.preset_bytes}); wrote {txt} and {js}")
        rung.built = build_and_check(recipe, source_path, d / "recipe.gguf", txt, js, imatrix, threads,
                                     ties=tie_patterns(args.tie))
        if rung.untied is not None and speed is not None:  # for the tie's gain in speed
            u_txt, u_js = write_recipe(d / "untied", rung.untied, source, {**m, "note": "the recipe without --tie"})
            rung.untied_built = build_and_check(rung.untied, source_path, d / "untied" / "recipe.gguf", u_txt, u_js,
                                                imatrix, threads)
    built = [r for r in rungs if r.built is not None]
    if not [r for r in rungs if r.recipe is not None]:
        raise SweepError(f"no size of {', '.join(sizes)} is reachable with candidates {','.join(types)}: add "
                         f"smaller --types (q2_K, q3_K, iq4_xs) or measure more tensors")
    report: dict[str, object] = {"metric": table.metric, "imatrix": str(imatrix) if imatrix else None, "types": types,
                                 "ties": args.tie, "rungs": [rung_json(r) for r in rungs]}
    if args.validate and built:
        with References(table, source_path, args.out, args.heldout_windows, threads, other_text) as refs:
            for r in built:
                assert r.recipe is not None and r.built is not None and r.preset is not None  # (built: all three)
                n = r.recipe.n_elements
                r.scores = {"recipe": refs.score("recipe", r.built, n), "preset": refs.score(r.size, r.preset, n)}
            report.update(refs.describe())
        if speed is not None:
            _time(built, speed)
            report["throughput"] = speed.describe()
        report["compute"] = compute_identity(threads)
        report["rungs"] = [rung_json(r) for r in rungs]
        report["order"] = order_check(rungs)
        print(format_ladder(report))
        write_plot(args.out / "ladder_pareto.png", report)
    atomic_write_bytes(args.out / "ladder.json", json.dumps(report, indent=1, allow_nan=True).encode())
    print(f"wrote {args.out / 'ladder.json'}" + (f" and {args.out / 'ladder_pareto.png'}" if "heldout" in report
                                                 else ""))
    return {"rungs": rungs, "report": report}


def _monotone(rung: Rung, recipe: Recipe, rungs: list[Rung]) -> Recipe:
    """The smaller sizes' recipe of least predicted damage that fits this size's budget, where it predicts less than
    this size's own solve (which then says so): a larger size is never worse in prediction."""
    assert rung.preset_bytes is not None
    fits = [r for r in rungs if r is not rung and r.recipe is not None and r.kept_from is None
            and r.recipe.predicted_file_bytes <= rung.preset_bytes]
    best = min(fits, key=lambda r: r.recipe.damage if r.recipe else 0.0, default=None)
    if best is None or best.recipe is None or not best.recipe.damage < recipe.damage * (1 - 1e-9):  # (sums' rounding)
        return recipe
    rung.kept_from = best.size
    print(f"{rung.size}: its solve predicts {recipe.damage:.4g}, more than {best.size}'s recipe "
          f"({best.recipe.damage:.4g}), which fits its budget: kept {best.size}'s recipe (the tensors outside the "
          f"tables take other types at the two presets' sizes)")
    return dataclasses.replace(best.recipe, budget=rung.preset_bytes)


def _time(built: list[Rung], settings: BenchSettings) -> None:
    """pp/tg of each size's recipe, its preset (and the untied recipe), their repetitions alternated."""
    for r in built:
        files = {"recipe": r.built, "preset": r.preset, "untied": r.untied_built}
        named = {k: Path(v) for k, v in files.items() if v is not None}
        log.info("throughput of %s: %s", r.size, ", ".join(named))
        got = measure(list(named.values()), settings)
        r.speed = {k: t.summary(settings.n_prompt, settings.n_gen) for k, t in zip(named, got)}


def _solve(table: Table, source: SourceModel, types: list[str], budget: int, defaults: list[str],
           groups: list[str]) -> Recipe:
    return make_recipe(table, source, types, budget, "file", defaults, groups)
