"""The ladder's report: per size the recipe against its preset (held-out KLD, the paired difference, the tails,
throughput), the order of the recipes as the size grows with the reason at each exception, and the Pareto figure."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .solve import Recipe
from .validate import FileScore, Paired, file_row, paired, prediction_cells

SLOWER = 0.05  # generation throughput more than 5% below the preset's is stated


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
    kept_from: str | None = None  # monotone: the smaller size whose recipe this size took
    tie: dict | None = None  # --tie: the tied recipe's predicted cost against the untied one
    untied: Recipe | None = None
    untied_built: Path | None = None
    scores: dict[str, FileScore] = field(default_factory=dict)  # "recipe"/"preset" -> FileScore
    speed: dict | None = None  # "recipe"/"preset"/"untied" -> throughput.Throughput.summary


def rung_json(r: Rung) -> dict[str, object]:
    out: dict[str, object] = {"size": r.size, "preset": str(r.preset) if r.preset else None,
                              "preset_bytes": r.preset_bytes, "note": r.note, "loop": r.loop, "refine": r.refine,
                              "kept_from": r.kept_from, "tie": r.tie}
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
        out["verdict"] = _diverged(rec_row, pre_row) or verdict(rec_row["kld_ci95"], pre_row["kld_ci95"], diff)
        if "other_text" in rec_row:
            out["verdict_other_text"] = _diverged(rec_row["other_text"], pre_row["other_text"]) or verdict(
                rec_row["other_text"]["kld_ci95"], pre_row["other_text"]["kld_ci95"], diff_other)
    if r.speed:
        out["speed"] = r.speed
        out["speed_verdict"] = speed_verdict(r.speed)
    return out


def _diverged(recipe: dict, preset: dict) -> str | None:
    """The verdict where a file's logits went non-finite (llama.cpp's kernels on that file), else None."""
    if recipe.get("diverged") or preset.get("diverged"):
        which = [f"{label} diverged ({row['diverged']})" for label, row in (("recipe", recipe), ("preset", preset))
                 if row.get("diverged")]
        better = "; the recipe did not" if not recipe.get("diverged") else ""
        return "; ".join(which) + better
    return None


def _test(s: dict, kind: str) -> dict:
    """A file's throughput summary of one test ("pp": pp512, "tg": tg128): median, min, max, runs."""
    return next(v for k, v in s.items() if k.startswith(kind) and v)


def _tg(s: dict) -> float:
    return _test(s, "tg")["median"]


def _pp(s: dict) -> float:
    return _test(s, "pp")["median"]


def speed_verdict(speed: dict) -> str:
    """Generation throughput of the recipe against its preset's (and the untied recipe's, with --tie), in words."""
    rec, pre = _tg(speed["recipe"]), _tg(speed["preset"])
    rel = rec / pre - 1
    text = (f"generation {rel:+.1%} against the preset ({rec:.1f} vs {pre:.1f} t/s), "
            + ("within 5%" if rel >= -SLOWER else "slower by more than 5%"))
    if speed.get("untied"):
        untied = _tg(speed["untied"])
        text += (f"; the tie changes generation by {rec / untied - 1:+.1%} and prompt processing by "
                 f"{_pp(speed['recipe']) / _pp(speed['untied']) - 1:+.1%} against the untied recipe")
    return text


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
             f"{'residual (sweep win.) [95% CI]':>34} {speed_header(report):>34}"]
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
                         f"{_ci(row['top1_ci95'], 100, '.2f')} {d_s:>34} {pred:>10} {rs_s:>34} "
                         f"{speed_cells((r.get('speed') or {}).get('recipe' if label == 'recipe' else 'preset')):>34}")
    for r in report["rungs"]:
        if "verdict" in r:
            lines.append(f"{r['size']:<8} {r['verdict']}" + (f"; on the other text: {r['verdict_other_text']}"
                                                                if r.get("verdict_other_text") else ""))
        if r.get("speed_verdict"):
            lines.append(f"{r['size']:<8} speed: {r['speed_verdict']}")
        if r.get("tie"):
            lines.append(f"{r['size']:<8} {r['tie']['line']}")
        if r.get("kept_from"):
            lines.append(f"{r['size']:<8} took {r['kept_from']}'s recipe (its own solve predicted more damage)")
    lines += format_order(report.get("order") or [])
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


def speed_header(report: dict) -> str:
    t = report.get("throughput")
    return f"pp{t['n_prompt']} / tg{t['n_gen']} t/s (median, range)" if t else ""


def speed_cells(s: dict | None) -> str:
    if not s:
        return ""
    pp, tg = _test(s, "pp"), _test(s, "tg")
    return (f"{pp['median']:.0f} [{pp['min']:.0f},{pp['max']:.0f}] / {tg['median']:.1f} "
            f"[{tg['min']:.1f},{tg['max']:.1f}]")


def order_check(rungs: list[Rung]) -> list[dict]:
    """Does the recipes' held-out KLD fall as the size grows? One entry per step between consecutive validated sizes
    (smallest file first), with the reasons found where it does not."""
    done = [r for r in rungs if r.scores and r.recipe is not None]
    done.sort(key=lambda r: r.recipe.predicted_file_bytes if r.recipe else 0)
    steps = []
    for prev, cur in zip(done, done[1:]):
        a, b = prev.scores["recipe"], cur.scores["recipe"]
        assert prev.recipe is not None and cur.recipe is not None
        step: dict = {"size": cur.size, "previous": prev.size,
                      "kld": float(b.heldout["kld_mean"]), "kld_previous": float(a.heldout["kld_mean"]),
                      "paired": paired(b.window_damage, a.window_damage)}
        texts = [("held-out", step["kld"], step["kld_previous"], step["paired"])]
        if a.other is not None and b.other is not None:
            step["other_kld"], step["other_kld_previous"] = float(b.other["kld_mean"]), float(a.other["kld_mean"])
            step["other_paired"] = paired(b.other_damage, a.other_damage)
            texts.append(("other text", step["other_kld"], step["other_kld_previous"], step["other_paired"]))
        step["falls"] = all(k <= k_prev for _, k, k_prev, _ in texts)
        if not step["falls"]:
            step["reasons"] = _reasons(prev, cur, texts)
        steps.append(step)
    return steps


def _reasons(prev: Rung, cur: Rung, texts: list) -> list[str]:
    """Why a larger recipe measured more held-out damage than a smaller one, as far as the records tell."""
    assert prev.recipe is not None and cur.recipe is not None
    out = []
    if prev.recipe.types() == cur.recipe.types():
        return [f"the same recipe as {prev.size} (the same file): the difference is the scoring's only"]
    for name, k, k_prev, d in texts:
        if k > k_prev and d and d["ci95"][0] <= 0:
            out.append(f"{name}: within noise (paired {d['diff']:+.2e} [{d['ci95'][0]:+.1e}, {d['ci95'][1]:+.1e}] "
                       f"holds 0)")
    a, b = prev.scores["recipe"], cur.scores["recipe"]
    if cur.recipe.damage < prev.recipe.damage:
        sw_a = float(np.mean(a.sweep_window_damage)) if a.sweep_window_damage is not None else float("nan")
        sw_b = float(np.mean(b.sweep_window_damage)) if b.sweep_window_damage is not None else float("nan")
        if sw_b < sw_a:
            out.append(f"on the tables' own windows the larger recipe is better ({sw_b:.4g} < {sw_a:.4g}, predicted "
                       f"{cur.recipe.damage:.4g} < {prev.recipe.damage:.4g}): what the tables' windows measured does "
                       f"not carry over to other text at this step")
        else:
            out.append(f"the prediction misses on the tables' own windows too (measured {sw_b:.4g} vs {sw_a:.4g}, "
                       f"predicted {cur.recipe.damage:.4g} < {prev.recipe.damage:.4g}): the tensors interact, or "
                       f"the built file's kernels differ from the measured points")
    exact_b = {c.tensor for c in cur.recipe.choices if c.type_asked and c.damage == 0}
    exact_a = {c.tensor for c in prev.recipe.choices if c.type_asked and c.damage == 0}
    if exact_b - exact_a:
        ex = next(c for c in cur.recipe.choices if c.tensor in exact_b - exact_a)
        out.append(f"{len(exact_b - exact_a)} more tensors take a type the tables measured as an exact re-encoding "
                   f"of the source (damage 0, e.g. {ex.tensor}={ex.type_stored}): the source's own quantization")
    outside = [c for c, p in zip(cur.recipe.choices, prev.recipe.choices) if c.type_asked is None
               and c.type_stored != p.type_stored]
    if outside:
        out.append(f"{len(outside)} tensors outside the tables take other types (the presets', e.g. "
                   f"{outside[0].tensor}={outside[0].type_stored}): their damage is in no prediction")
    if cur.kept_from:
        out.append(f"it took {cur.kept_from}'s recipe")
    return out or ["none found in the records"]


def format_order(steps: list[dict]) -> list[str]:
    if not steps:
        return []
    worse = [s for s in steps if not s["falls"]]
    if not worse:
        return [f"order: the recipes' KLD falls at every one of {len(steps)} steps as the size grows"]
    lines = [f"order: the recipes' KLD falls at {len(steps) - len(worse)} of {len(steps)} steps; where it does not:"]
    for s in worse:
        other = (f", other text {s['other_kld']:.4g} vs {s['other_kld_previous']:.4g}" if "other_kld" in s else "")
        lines.append(f"  {s['size']} after {s['previous']}: {s['kld']:.4g} vs {s['kld_previous']:.4g}{other}: "
                     + "; ".join(s["reasons"]))
    return lines


def write_plot(path: Path, report: dict) -> None:
    from ..report.plots import plt  # deferred: matplotlib, only for the figure (headless backend there)

    done = [r for r in report["rungs"] if "recipe" in r]
    panels = [("heldout", "held-out WikiText")] + ([("other", Path(report["other_text"]["text"]).name)]
                                                  if report.get("other_text") else [])
    fast = [r for r in done if r.get("speed")]
    fig, axes = plt.subplots(1, len(panels) + bool(fast), figsize=(7 * (len(panels) + bool(fast)), 5),
                             squeeze=False)
    if fast:
        _speed_panel(axes[0][-1], fast)
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


def _speed_panel(ax, rungs: list[dict]) -> None:
    """Generation throughput against held-out KLD: quality and speed of each size's recipe and preset."""
    for label, key, color, marker in (("recipe", "recipe", "C3", "o"), ("llama.cpp presets", "preset", "C0", "s")):
        rows = [(_tg(r["speed"][key]), (r["recipe"] if key == "recipe" else r["preset_row"])["kld_mean"], r["size"])
                for r in rungs]
        ax.plot([x for x, _, _ in rows], [y for _, y, _ in rows], marker, color=color, label=label)
        for x, y, size in rows:
            ax.annotate(size, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("generation throughput, tokens/s (tg128, median)")
    ax.set_ylabel("KL divergence, held-out WikiText")
    ax.set_title("speed beside quality", fontsize=9)
    ax.legend(fontsize=8)
