"""Validate a built recipe against llama.cpp's own mixes, on text the tables never saw.

Held-out windows: the tables were measured on the first n_windows * n_ctx tokens of the text; validation cuts its
windows from the tokens after those (the token array is sliced before the windows are made), so no window of the
validation was used to choose the recipe. Every file (the recipe, and each preset built from the same source by
llama.cpp's ftype) is scored with its real quantized kernels against the source in F32, paired token by token:
PPL, ΔNLL, KL(reference || file), top-1 agreement, window-blocked standard errors (sweep/scoring/metrics.py), and the
paired difference to the first preset (Q4_K_M by default) per window.

Predicted vs measured (additivity): a file's predicted damage is the sum of its tensors' single-tensor damages from
the tables. It is compared with the file measured on the sweep's own windows (same text as the prediction: the
residual is then about additivity and kernels, not text), and with the held-out measurement.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from ..errors import SweepError
from ..llama.container import compute_settings, runtime_identity
from ..run import per_token
from ..scoring.metrics import RANKABLE, summarize
from ..scoring.perplexity import Score, score
from ..scoring.text import load_text
from ..scoring.windows import Windows, make_windows
from ..session import Session
from ..store.files import atomic_write_bytes
from .build import preset_file, stored_types

log = logging.getLogger("sweep.recipe")

SETTINGS = compute_settings("f32")  # F32 K/V cache, flash attention off, no repacking: only the weights differ


@dataclass
class FileScore:
    label: str
    path: Path
    file_bytes: int
    n_elements: int
    heldout: dict  # metrics.summarize output + ppl
    window_damage: np.ndarray  # held-out per-window mean damage (the table's metric)
    sweep_window_damage: np.ndarray | None  # on the sweep's windows
    predicted: float | None
    predicted_windows: np.ndarray | None
    uncovered: list[str]  # quantized tensors the tables do not cover (not in the prediction), as name=type


def _t_ci(mean: float, se: float, n: int) -> tuple[float, float]:
    if n < 2 or not math.isfinite(se):
        return math.nan, math.nan
    h = stats.t.ppf(0.975, n - 1) * se
    return mean - h, mean + h


def _window_damage(run: Score, ref: Score, metric: str) -> np.ndarray | None:
    """Per-window means of the metric's damage (metrics.Metric.damage), where the metric is a token mean."""
    return RANKABLE[metric].window_damage(per_token(run, ref))


def _score_file(path: Path, windows: Windows, ref: Score, n_ctx: int, threads: int, desc: str) -> Score:
    with Session(path, n_ctx, threads, SETTINGS) as s:
        return score(s.backend, windows, progress=False, desc=desc, reference=ref, math=s.math)


def predicted_for(types: dict[str, str], table) -> tuple[float | None, np.ndarray | None, list[str]]:
    """Sum of the tables' single-tensor damages for the file's types; tensors the tables do not cover (or not in
    that type) are listed apart. None when any covered tensor lacks its type's measurement."""
    total, windows, uncovered = 0.0, None, []
    for name, ty in types.items():
        m = table.rows.get((name, ty))
        if m is None:
            if name in table.tensors:
                return None, None, [name]
            if ty not in ("f32", "f16", "bf16"):
                uncovered.append(f"{name}={ty}")
            continue
        total += m.damage
        if m.windows is not None:
            windows = m.windows.copy() if windows is None else windows + m.windows
    return total, windows, uncovered


def validate(table, source_path: Path, recipe, built: Path, imatrix, *, out_dir: Path, presets: list[str],
             heldout_windows: int, threads: int) -> dict:
    """Score the built file and llama.cpp's `presets` (built from the same source) on `heldout_windows` windows
    after the tables' own, and write the report into `out_dir`."""
    text_path = table.data_source
    text = load_text(text_path)
    if table.data_sha256 and text.sha256 != table.data_sha256:
        raise SweepError(f"{text_path} is not the text the tables were measured on (hash differs)")
    n_ctx = table.n_ctx
    with Session(source_path, n_ctx, threads, SETTINGS) as ref_session:
        ref_backend = ref_session.backend
        tokens = ref_session.tokens(text)
        bos = ref_backend.bos if ref_backend.add_bos else None
        skip = table.measured_tokens
        heldout = make_windows(tokens[skip:], n_ctx, heldout_windows, bos)
        sweep_windows = make_windows(tokens, n_ctx, table.n_windows, bos)
        n_vocab = ref_backend.n_vocab
        log.info("held-out: %d windows of %d tokens after the first %d tokens (the tables' %d windows); "
                 "compute: %s, %d threads", heldout.n_windows, n_ctx, skip, table.n_windows, SETTINGS.as_dict(),
                 threads)
        ref_file = out_dir / "validate-reference-logits.npy"
        logits = np.lib.format.open_memmap(ref_file, mode="w+", dtype=np.float32,
                                           shape=(heldout.n_windows, heldout.n_scored, n_vocab))
        ref = score(ref_backend, heldout, progress=False, desc="reference", keep_logits=logits, math=ref_session.math)
        ref_sweep = score(ref_backend, sweep_windows, progress=False, desc="reference (sweep windows)",
                          math=ref_session.math,
                          keep_logits=np.empty((sweep_windows.n_windows, sweep_windows.n_scored, n_vocab),
                                               dtype=np.float32))
    files = [("recipe", built)]
    for name in presets:
        files.append((name, preset_file(out_dir, source_path, name, imatrix, threads)))
    metric = table.metric
    results: list[FileScore] = []
    for label, path in files:
        log.info("scoring %s (%s)", label, path)
        run = _score_file(path, heldout, ref, n_ctx, threads, label)
        summary = summarize(per_token(run, ref), alpha=0.05)
        summary.update(ppl=run.ppl, ppl_stderr=run.ppl_stderr, ref_ppl=ref.ppl, ref_ppl_stderr=ref.ppl_stderr)
        sweep_run = _score_file(path, sweep_windows, ref_sweep, n_ctx, threads, label + " (sweep windows)")
        types = {n: t for n, (t, _) in stored_types(path).items()}
        pred, pred_w, uncovered = predicted_for(types, table)
        results.append(FileScore(label, path, path.stat().st_size, recipe.n_elements, summary,
                                 _window_damage(run, ref, metric), _window_damage(sweep_run, ref_sweep, metric),
                                 pred, pred_w, uncovered))
    Path(ref_file).unlink(missing_ok=True)
    report = _report(results, metric, heldout, sweep_windows, skip)
    report["compute"] = {**runtime_identity(SETTINGS), "threads": threads,
                         "kernels": "llama.cpp's native quantized matmul kernels (CPU), weights as built"}
    atomic_write_bytes(out_dir / "validation.json", json.dumps(report, indent=1, allow_nan=True).encode())
    _write_plot(out_dir / "validation_pareto.png", report)
    print(format_report(report))
    print(f"wrote {out_dir / 'validation.json'} and {out_dir / 'validation_pareto.png'}")
    return report


def _report(results: list[FileScore], metric: str, heldout: Windows, sweep_windows: Windows, skip: int) -> dict:
    rows = []
    base = next((r for r in results if r.label != "recipe"), None)  # the first preset: Q4_K_M by default order
    q4km = next((r for r in results if r.label == "Q4_K_M"), base)
    n = heldout.n_windows
    for r in results:
        h = r.heldout
        row = {"file": r.label, "path": str(r.path), "file_bytes": r.file_bytes,
               "bpw_file": 8 * r.file_bytes / r.n_elements, **h}
        row["kld_ci95"] = _t_ci(h["kld_mean"], h["kld_stderr"], n)
        row["top1_ci95"] = _t_ci(h["top1_agree"], h["top1_agree_stderr"], n)
        row["delta_nll_ci95"] = _t_ci(h["delta_nll"], h["delta_nll_stderr"], n)
        if q4km is not None and r is not q4km and r.window_damage is not None:
            d = r.window_damage - q4km.window_damage
            se = float(d.std(ddof=1) / math.sqrt(n))
            row[f"vs_{q4km.label}"] = {"diff": float(d.mean()), "stderr": se, "ci95": _t_ci(float(d.mean()), se, n)}
            if r.predicted is not None and q4km.predicted is not None and set(r.uncovered) == set(q4km.uncovered):
                # both files leave the same tensors outside the tables: the difference is all predicted
                row[f"vs_{q4km.label}"]["predicted_diff"] = r.predicted - q4km.predicted
        if r.predicted is not None and r.window_damage is not None:
            row["predicted"] = r.predicted
            row["uncovered_in_prediction"] = r.uncovered
            sw = r.sweep_window_damage
            if r.predicted_windows is not None and sw is not None and len(sw) == len(r.predicted_windows):
                res = sw - r.predicted_windows
                k = len(res)
                se = float(res.std(ddof=1) / math.sqrt(k)) if k > 1 else math.nan
                row["residual_sweep_windows"] = {"measured": float(sw.mean()), "residual": float(res.mean()),
                                                 "stderr": se, "ci95": _t_ci(float(res.mean()), se, k)}
            pred_se = float(r.predicted_windows.std(ddof=1) / math.sqrt(len(r.predicted_windows))) \
                if r.predicted_windows is not None and len(r.predicted_windows) > 1 else math.nan
            m_se = float(r.window_damage.std(ddof=1) / math.sqrt(n))
            se = math.sqrt(m_se ** 2 + pred_se ** 2)
            res = float(r.window_damage.mean()) - r.predicted
            row["residual_heldout"] = {"residual": res, "stderr": se, "ci95": (res - 1.96 * se, res + 1.96 * se)}
        rows.append(row)
    return {"metric": metric, "heldout": {"windows": n, "n_ctx": heldout.n_ctx, "first_token": skip,
                                          "tokens_scored": n * heldout.n_scored},
            "sweep_windows": sweep_windows.n_windows, "files": rows}


def format_report(report: dict) -> str:
    metric = report["metric"]
    h = report["heldout"]
    lines = [f"held-out validation: {h['windows']} windows of {h['n_ctx']} tokens from token {h['first_token']} on "
             f"(after the tables' slice), {h['tokens_scored']} tokens scored; 95% t-intervals over windows",
             f"{'file':<8} {'bytes':>10} {'MB':>8} {'bpw':>6} {'PPL':>16} {'KLD [95% CI]':>30} {'top-1 % [95% CI]':>24}"
             f" {'Δ vs Q4_K_M [95% CI]':>34} {'predicted':>10} {'residual (sweep win.) [95% CI]':>36}"]
    for r in report["files"]:
        kl, kh = r["kld_ci95"]
        tl, th = r["top1_ci95"]
        vs = next((v for k, v in r.items() if k.startswith("vs_")), None)
        vs_s = f"{vs['diff']:+.3e} [{vs['ci95'][0]:+.2e},{vs['ci95'][1]:+.2e}]" if vs else ""
        pred = f"{r['predicted']:.3e}" if r.get("predicted") is not None else "-"
        rs = r.get("residual_sweep_windows")
        rs_s = f"{rs['residual']:+.2e} [{rs['ci95'][0]:+.1e},{rs['ci95'][1]:+.1e}]" if rs else "-"
        lines.append(f"{r['file']:<8} {r['file_bytes']:>10} {r['file_bytes'] / 1e6:>8.3f} {r['bpw_file']:>6.3f} "
                     f"{r['ppl']:>8.4f} ± {r['ppl_stderr']:.4f} {r['kld_mean']:.4e} [{kl:.3e},{kh:.3e}] "
                     f"{100 * r['top1_agree']:6.2f} [{100 * tl:.2f},{100 * th:.2f}] {vs_s:>34} {pred:>10} {rs_s:>36}")
    ref = report["files"][0]
    lines.append(f"reference (source in F32): PPL {ref['ref_ppl']:.4f} ± {ref['ref_ppl_stderr']:.4f}; "
                 f"metric predicted/residual: {metric}; compute: {report.get('compute', {}).get('kv_type', '')} "
                 f"K/V cache, flash attention {report.get('compute', {}).get('flash_attn', '')}, no repacking")
    return "\n".join(lines)


def _write_plot(path: Path, report: dict) -> None:
    from ..report.plots import plt, recipe_pareto  # deferred: matplotlib, only for the figure (headless backend there)

    fig = recipe_pareto(report)
    fig.savefig(path, dpi=120)
    plt.close(fig)
