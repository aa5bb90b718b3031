"""`--ladder` / `--sizes Q2_K,Q3_K_M,...`: a recipe at every llama.cpp preset size, each against its preset.

For each size: llama.cpp's preset is built from the same source (with the importance matrix, if one is given); its
file size is the budget; tensors the tables do not cover keep the type that preset gives them (unless
--default-type says otherwise), so recipe and preset differ only where the tables measured; the recipe is solved
(and, for --loop-sizes, corrected by measured joint points: sweep/recipe/loop.py), written to OUT/SIZE/, built with
llama.cpp's quantizer and checked tensor by tensor. A size the candidates cannot reach, or a preset llama.cpp will
not build, is one line in the output, not a silent gap. `--validate` then scores every recipe and every preset on the
same held-out windows (and `--heldout-text`'s), paired with the source in F32: one table, one Pareto figure
(ladder.json, ladder_pareto.png).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SweepError
from ..files import atomic_write_bytes
from ..scoring.text import Text
from .build import IMATRIX_LADDER, LADDER, NEED_IMATRIX, PRESETS, build_and_check, preset_file, stored_types
from .export import pattern_for, write_recipe
from .loop import LoopSettings, closed_loop
from .refine import refine
from .sizes import SourceModel
from .solve import Recipe, make_recipe
from .table import Table, read_table
from .validate import FileScore, Paired, References, compute_identity, file_row, paired, prediction_cells

log = logging.getLogger("sweep.recipe")


@dataclass
class Rung:
    size: str
    preset: Path | None = None
    preset_bytes: int | None = None
    recipe: Recipe | None = None
    built: Path | None = None
    note: str | None = None  # why there is no recipe at this size
    loop: dict | None = None
    refine: list[dict] | None = None  # --refine's rounds at this size
    scores: dict[str, FileScore] = field(default_factory=dict)  # "recipe"/"preset" -> FileScore


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


def run_ladder(args: argparse.Namespace, table: Table, source: SourceModel, source_path: Path, types: list[str],
               imatrix: Path | None, meta: dict, threads: int, other_text: Text | None = None) -> dict:
    sizes = ladder_sizes(args.sizes, imatrix)
    loop_sizes = set(ladder_sizes(args.loop_sizes, imatrix)) if args.loop_sizes else set()
    per_file = args.heldout_windows * (2 if other_text is not None else 1) + table.n_windows
    print(f"ladder: {len(sizes)} size(s) {','.join(sizes)}; {len(loop_sizes)} through the closed loop (at most "
          f"{args.loop_budget} joint points of {table.n_windows} windows each); "
          + (f"validation: {2 * len(sizes)} files x {per_file} windows of {table.n_ctx} tokens + the reference's "
             f"{per_file}" if args.validate else "no validation"))
    rungs: list[Rung] = []
    runs = list(args.runs)  # with --refine, the points it measured serve the sizes after too
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
        rung.recipe = recipe
        txt, js = write_recipe(d, recipe, source, {**m, "loop": rung.loop})
        print(f"{size}: recipe predicted {table.metric} {recipe.damage:.4g} in {recipe.predicted_file_bytes} bytes "
              f"(preset {rung.preset_bytes}); wrote {txt} and {js}")
        rung.built = build_and_check(recipe, source_path, d / "recipe.gguf", txt, js, imatrix, threads)
    built = [r for r in rungs if r.built is not None]
    if not [r for r in rungs if r.recipe is not None]:
        raise SweepError(f"no size of {', '.join(sizes)} is reachable with candidates {','.join(types)}: add "
                         f"smaller --types (q2_K, q3_K, iq4_xs) or measure more tensors")
    report: dict[str, object] = {"metric": table.metric, "imatrix": str(imatrix) if imatrix else None, "types": types,
              "rungs": [_rung_json(r) for r in rungs]}
    if args.validate and built:
        with References(table, source_path, args.out, args.heldout_windows, threads, other_text) as refs:
            for r in built:
                assert r.recipe is not None and r.built is not None and r.preset is not None  # (built: all three)
                n = r.recipe.n_elements
                r.scores = {"recipe": refs.score("recipe", r.built, n), "preset": refs.score(r.size, r.preset, n)}
            report.update(refs.describe())
        report["compute"] = compute_identity(threads)
        report["rungs"] = [_rung_json(r) for r in rungs]
        print(format_ladder(report))
        _write_plot(args.out / "ladder_pareto.png", report)
    atomic_write_bytes(args.out / "ladder.json", json.dumps(report, indent=1, allow_nan=True).encode())
    print(f"wrote {args.out / 'ladder.json'}" + (f" and {args.out / 'ladder_pareto.png'}" if "heldout" in report
                                                 else ""))
    return {"rungs": rungs, "report": report}


def _solve(table: Table, source: SourceModel, types: list[str], budget: int, defaults: list[str],
           groups: list[str]) -> Recipe:
    return make_recipe(table, source, types, budget, "file", defaults, groups)


def _rung_json(r: Rung) -> dict[str, object]:
    out: dict[str, object] = {"size": r.size, "preset": str(r.preset) if r.preset else None,
                              "preset_bytes": r.preset_bytes, "note": r.note, "loop": r.loop, "refine": r.refine}
    if r.recipe is not None:
        out.update(recipe_predicted=r.recipe.damage, recipe_bytes_predicted=r.recipe.predicted_file_bytes,
                   recipe_dir=str(Path(r.built).parent) if r.built else None)
    if r.scores:
        rec, pre = r.scores["recipe"], r.scores["preset"]
        rec_row, pre_row = file_row(rec), file_row(pre)
        diff = paired(rec.window_damage, pre.window_damage)  # KLD: per-window means
        diff_other = paired(rec.other_damage, pre.other_damage)
        out.update(recipe=rec_row, preset_row=pre_row, recipe_minus_preset=diff,
                   recipe_minus_preset_other_text=diff_other)
        out["verdict"] = verdict(rec_row["kld_ci95"], pre_row["kld_ci95"], diff)
        if diff_other:
            out["verdict_other_text"] = verdict(rec_row["other_text"]["kld_ci95"], pre_row["other_text"]["kld_ci95"],
                                                diff_other)
    return out


def verdict(recipe_ci: tuple[float, float], preset_ci: tuple[float, float], diff: Paired | None) -> str:
    """Recipe vs preset in words, from the KLD intervals and the paired difference's."""
    if recipe_ci[1] < preset_ci[0]:
        return "recipe better, intervals apart"
    if recipe_ci[0] > preset_ci[1]:
        return "preset better, intervals apart"
    if diff and diff["ci95"][1] < 0:
        return "recipe better in the paired difference (KLD intervals overlap)"
    if diff and diff["ci95"][0] > 0:
        return "preset better in the paired difference (KLD intervals overlap)"
    return "no difference within the intervals"


def _ci(lo_hi, scale=1.0, f=".3e") -> str:
    lo, hi = lo_hi
    return f"[{scale * lo:{f}},{scale * hi:{f}}]"


def format_ladder(report: dict) -> str:
    h = report["heldout"]
    lines = [f"ladder ({'with importance matrix ' + report['imatrix'] if report['imatrix'] else 'no importance matrix'}"
             f"): held-out {h['windows']} windows of {h['n_ctx']} tokens from token {h['first_token']} on, "
             f"{h['tokens_scored']} tokens scored; 95% t-intervals over windows; the solver minimised the sum of "
             f"{report['metric']}; KLD p99.9: the 99.9th percentile of the per-token KLD; top-1: llama-perplexity's "
             f"same top p",
             f"{'size':<8} {'file':<7} {'bytes':>11} {'bpw':>6} {'PPL':>17} {'KLD [95% CI]':>31} {'KLD p99.9':>10} "
             f"{'top-1 % [95% CI]':>22} {'recipe − preset [95% CI]':>34} {'predicted':>10} "
             f"{'residual (sweep win.) [95% CI]':>34}"]
    for r in report["rungs"]:
        if "recipe" not in r:
            lines.append(f"{r['size']:<8} {r['note'] or 'not validated'}")
            continue
        for label, row in (("recipe", r["recipe"]), ("preset", r["preset_row"])):
            d = r["recipe_minus_preset"] if label == "recipe" else None
            d_s = f"{d['diff']:+.3e} {_ci(d['ci95'], f='+.2e')}" if d else ""
            pred, rs_s = prediction_cells(row)
            lines.append(f"{r['size']:<8} {label:<7} {row['file_bytes']:>11,} {row['bpw_file']:>6.3f} "
                         f"{row['ppl']:>8.4f} ± {row['ppl_stderr']:.4f} {row['kld_mean']:.4e} {_ci(row['kld_ci95'])} "
                         f"{row['kld_p999']:>10.4f} {100 * row['top1_agree']:6.2f} "
                         f"{_ci(row['top1_ci95'], 100, '.2f')} {d_s:>34} {pred:>10} {rs_s:>34}")
    for r in report["rungs"]:
        if "verdict" in r:
            lines.append(f"{r['size']:<8} {r['verdict']}" + (f"; on the other text: {r['verdict_other_text']}"
                                                                if r.get("verdict_other_text") else ""))
    first = next((r for r in report["rungs"] if "recipe" in r), None)
    if first:
        lines.append(f"reference (source in F32): PPL {first['recipe']['ref_ppl']:.4f} ± "
                     f"{first['recipe']['ref_ppl_stderr']:.4f}")
    o = report.get("other_text")
    if o:
        lines.append(f"on another text: {o['text']} (sha256 {o['text_sha256']}), {o['windows']} windows of "
                     f"{o['n_ctx']} tokens, {o['tokens_scored']} tokens scored")
        for r in report["rungs"]:
            if "recipe" not in r:
                continue
            for label, row in (("recipe", r["recipe"]), ("preset", r["preset_row"])):
                x = row["other_text"]
                d = r["recipe_minus_preset_other_text"] if label == "recipe" else None
                d_s = f"{d['diff']:+.3e} {_ci(d['ci95'], f='+.2e')}" if d else ""
                lines.append(f"{r['size']:<8} {label:<7} {row['file_bytes']:>11,} PPL {x['ppl']:8.4f} ± "
                             f"{x['ppl_stderr']:.4f} KLD {x['kld_mean']:.4e} {_ci(x['kld_ci95'])} top-1 "
                             f"{100 * x['top1_agree']:6.2f} {_ci(x['top1_ci95'], 100, '.2f')} {d_s}")
        if first is not None:
            lines.append(f"reference on it: PPL {first['recipe']['other_text']['ref_ppl']:.4f}")
    return "\n".join(lines)


def _write_plot(path: Path, report: dict) -> None:
    from ..report.plots import plt  # deferred: matplotlib, only for the figure (headless backend there)

    done = [r for r in report["rungs"] if "recipe" in r]
    panels = [("heldout", "held-out WikiText")] + ([("other", Path(report["other_text"]["text"]).name)]
                                                  if report.get("other_text") else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for label, color, marker in (("recipe", "C3", "o"), ("preset_row", "C0", "s")):
            rows = sorted((r[label] for r in done), key=lambda x: x["file_bytes"])
            xs = [x["bpw_file"] for x in rows]
            ms = [(x if key == "heldout" else x["other_text"]) for x in rows]
            ys = [m["kld_mean"] for m in ms]
            err = [[y - m["kld_ci95"][0] for y, m in zip(ys, ms)], [m["kld_ci95"][1] - y for y, m in zip(ys, ms)]]
            ax.errorbar(xs, ys, yerr=err, fmt=f"{marker}-", color=color, capsize=3, lw=1,
                        label="recipe" if label == "recipe" else "llama.cpp presets")
        for r in done:
            row = r["preset_row"]
            y = row["kld_mean"] if key == "heldout" else row["other_text"]["kld_mean"]
            ax.annotate(r["size"], (row["bpw_file"], y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight (file bytes × 8 / elements)")
        ax.set_ylabel(f"KL divergence (F32 ‖ file), {title}")
        ax.set_title(f"the ladder on {title}: both frontiers, 95% intervals", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
