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
from typing import TypedDict

import numpy as np
from scipy import stats

from ..errors import SweepError
from ..files import atomic_write_bytes
from ..llama.container import compute_settings, runtime_identity
from ..pipeline.point import per_token
from ..pipeline.session import Session
from ..scoring.metrics import RANKABLE, summarize
from ..scoring.perplexity import Score, score
from ..scoring.text import Text, load_text
from ..scoring.windows import Windows, make_windows
from .build import preset_file, stored_types
from .solve import Recipe
from .table import Table

log = logging.getLogger("sweep.recipe")

SETTINGS = compute_settings("f32")  # F32 K/V cache, flash attention off, no repacking: only the weights differ


@dataclass
class FileScore:
    label: str
    path: Path
    file_bytes: int
    n_elements: int
    heldout: dict  # metrics.summarize output + ppl
    window_damage: np.ndarray | None  # held-out per-window mean damage (the table's metric, if a token mean)
    sweep_window_damage: np.ndarray | None  # on the sweep's windows
    predicted: float | None
    predicted_windows: np.ndarray | None
    uncovered: list[str]  # quantized tensors the tables do not cover (not in the prediction), as name=type
    other: dict | None = None  # on the other text (--heldout-text): metrics.summarize output + ppl
    other_damage: np.ndarray | None = None  # its per-window damage


class Paired(TypedDict):
    """A paired difference over windows: its mean, standard error and 95% t-interval."""
    diff: float
    stderr: float
    ci95: tuple[float, float]


class Versus(Paired, total=False):
    """A file against another (`versus`): the paired difference, and where known the predicted one and the other
    text's."""
    predicted_diff: float
    other_text: Paired


def _t_ci(mean: float, se: float, n: int) -> tuple[float, float]:
    if n < 2 or not math.isfinite(se):
        return math.nan, math.nan
    h = stats.t.ppf(0.975, n - 1) * se
    return mean - h, mean + h


def _window_damage(run: Score, ref: Score, metric: str) -> np.ndarray | None:
    """Per-window means of the metric's damage (metrics.Metric.damage), where the metric is a token mean (none for a
    file that diverged)."""
    return None if run.diverged else RANKABLE[metric].window_damage(per_token(run, ref))


def _score_file(path: Path, windows: Windows, ref: Score, n_ctx: int, threads: int, desc: str) -> Score:
    with Session(path, n_ctx, threads, SETTINGS) as s:
        return score(s.backend, windows, progress=False, desc=desc, reference=ref, math=s.math)


def predicted_for(types: dict[str, str], table: Table) -> tuple[float | None, np.ndarray | None, list[str]]:
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


@dataclass
class Reference:
    """The source's score on one set of windows (its logits kept: every file is paired with it token by token)."""
    label: str  # "held-out WikiText", "sweep windows", the other text's name
    windows: Windows
    score: Score
    first_token: int
    source: str  # the text's path
    sha256: str


class References:
    """The source in F32 scored once on the windows every file is compared on: held-out windows of the tables' text
    (after the tables' slice), the tables' own windows (for the additivity residual), and optionally held-out
    windows of another text (`--heldout-text`: a recipe tuned on one text, seen on another). Logits of the
    held-out sets live in memory-mapped files in `out_dir`, removed on close."""

    def __init__(self, table: Table, source_path: Path, out_dir: Path, heldout_windows: int, threads: int,
                 other_text: Text | None = None):
        self.table, self.threads, self.n_ctx = table, threads, table.n_ctx
        self._files: list[Path] = []
        text = load_text(table.data_source)
        if table.data_sha256 and text.sha256 != table.data_sha256:
            raise SweepError(f"{table.data_source} is not the text the tables were measured on (hash differs)")
        out_dir.mkdir(parents=True, exist_ok=True)
        with Session(source_path, self.n_ctx, threads, SETTINGS) as s:
            bos = s.backend.bos if s.backend.add_bos else None
            tokens = s.tokens(text)
            skip = table.measured_tokens
            self.heldout = self._score(s, "held-out", make_windows(tokens[skip:], self.n_ctx, heldout_windows, bos),
                                       skip, text, out_dir / "validate-reference-logits.npy")
            log.info("held-out: %d windows of %d tokens after the first %d tokens (the tables' %d windows); "
                     "compute: %s, %d threads", self.heldout.windows.n_windows, self.n_ctx, skip, table.n_windows,
                     SETTINGS.as_dict(), threads)
            self.sweep = self._score(s, "sweep windows", make_windows(tokens, self.n_ctx, table.n_windows, bos), 0,
                                     text, None)
            self.other = None
            if other_text is not None:  # the whole text is unseen: its windows from its first token on
                w = make_windows(s.tokens(other_text), self.n_ctx, heldout_windows, bos)
                self.other = self._score(s, Path(other_text.source).name, w, 0, other_text,
                                         out_dir / "validate-reference-logits-other.npy")

    def _score(self, s: Session, label: str, windows: Windows, first: int, text, memmap: Path | None) -> Reference:
        shape = (windows.n_windows, windows.n_scored, s.backend.n_vocab)
        if memmap is None:
            logits = np.empty(shape, dtype=np.float32)
        else:
            self._files.append(memmap)
            logits = np.lib.format.open_memmap(memmap, mode="w+", dtype=np.float32, shape=shape)
        ref = score(s.backend, windows, progress=False, desc=f"reference ({label})", keep_logits=logits, math=s.math)
        return Reference(label, windows, ref, first, text.source, text.sha256)

    def score(self, label: str, path: Path, n_elements: int) -> FileScore:
        """One built file scored against the source on every set of windows."""
        log.info("scoring %s (%s)", label, path)
        metric, h = self.table.metric, self.heldout
        run = _score_file(path, h.windows, h.score, self.n_ctx, self.threads, label)
        summary = _summary(run, h.score)
        sweep_run = _score_file(path, self.sweep.windows, self.sweep.score, self.n_ctx, self.threads,
                                label + " (sweep windows)")
        other = other_damage = None
        if self.other is not None:
            o = self.other
            other_run = _score_file(path, o.windows, o.score, self.n_ctx, self.threads, f"{label} ({o.label})")
            other, other_damage = _summary(other_run, o.score), _window_damage(other_run, o.score, metric)
        types = {n: t for n, (t, _) in stored_types(path).items()}
        pred, pred_w, uncovered = predicted_for(types, self.table)
        return FileScore(label, path, path.stat().st_size, n_elements, summary, _window_damage(run, h.score, metric),
                         _window_damage(sweep_run, self.sweep.score, metric), pred, pred_w, uncovered, other,
                         other_damage)

    def describe(self) -> dict:
        """What the held-out sets were (for the report)."""
        out = {"heldout": {"windows": self.heldout.windows.n_windows, "n_ctx": self.n_ctx,
                           "first_token": self.heldout.first_token,
                           "tokens_scored": self.heldout.windows.n_windows * self.heldout.windows.n_scored,
                           "text": self.heldout.source, "text_sha256": self.heldout.sha256},
               "sweep_windows": self.sweep.windows.n_windows}
        if self.other is not None:
            o = self.other
            out["other_text"] = {"text": o.source, "text_sha256": o.sha256, "windows": o.windows.n_windows,
                                 "n_ctx": self.n_ctx, "first_token": 0,
                                 "tokens_scored": o.windows.n_windows * o.windows.n_scored}
        return out

    def close(self) -> None:
        for f in self._files:
            Path(f).unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# what the reports read of a file that diverged (non-finite logits): nothing measured, and why
_NOT_MEASURED = ("kld_mean", "kld_stderr", "kld_p999", "top1_agree", "top1_agree_stderr", "delta_nll",
                 "delta_nll_stderr", "ppl", "ppl_stderr")


def _summary(run: Score, ref: Score) -> dict:
    if run.diverged:  # llama.cpp's own kernels on this file gave NaN/inf logits: a result, said, not a crash
        log.warning("diverged: %s", run.diverged)
        return {**dict.fromkeys(_NOT_MEASURED, math.nan), "diverged": run.diverged, "n_windows": 0,
                "ref_ppl": ref.ppl, "ref_ppl_stderr": ref.ppl_stderr}
    out = summarize(per_token(run, ref), alpha=0.05)
    out.update(ppl=run.ppl, ppl_stderr=run.ppl_stderr, ref_ppl=ref.ppl, ref_ppl_stderr=ref.ppl_stderr)
    return out


def validate(table: Table, source_path: Path, recipe: Recipe, built: Path, imatrix: Path | None, *, out_dir: Path,
             presets: list[str], heldout_windows: int, threads: int, other_text: Text | None = None) -> dict:
    """Score the built file and llama.cpp's `presets` (built from the same source) on `heldout_windows` windows
    after the tables' own (and on another text's windows, when given), and write the report into `out_dir`."""
    with References(table, source_path, out_dir, heldout_windows, threads, other_text) as refs:
        files = [("recipe", built)]
        for name in presets:
            files.append((name, preset_file(out_dir, source_path, name, imatrix, threads)))
        results = [refs.score(label, path, recipe.n_elements) for label, path in files]
    report = _report(results, table.metric, refs)
    report["compute"] = compute_identity(threads)
    atomic_write_bytes(out_dir / "validation.json", json.dumps(report, indent=1, allow_nan=True).encode())
    _write_plot(out_dir / "validation_pareto.png", report)
    print(format_report(report))
    print(f"wrote {out_dir / 'validation.json'} and {out_dir / 'validation_pareto.png'}")
    return report


def compute_identity(threads: int) -> dict:
    return {**runtime_identity(SETTINGS), "threads": threads,
            "kernels": "llama.cpp's native quantized matmul kernels (CPU), weights as built"}


def paired(a: np.ndarray | None, b: np.ndarray | None) -> Paired | None:
    """Mean of the per-window differences a - b, its standard error and 95% t-interval."""
    if a is None or b is None or len(a) != len(b):
        return None
    d = np.asarray(a, float) - np.asarray(b, float)
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan
    return {"diff": float(d.mean()), "stderr": se, "ci95": _t_ci(float(d.mean()), se, len(d))}


def file_row(r: FileScore) -> dict:
    """One scored file as the reports give it: its held-out figures with 95% t-intervals over windows, the other
    text's, and the prediction with its residuals."""
    h = r.heldout
    n = len(r.window_damage) if r.window_damage is not None else int(h.get("n_windows", 0))
    row = {"file": r.label, "path": str(r.path), "file_bytes": r.file_bytes,
           "bpw_file": 8 * r.file_bytes / r.n_elements, **h}
    row["kld_ci95"] = _t_ci(h["kld_mean"], h["kld_stderr"], n)
    row["top1_ci95"] = _t_ci(h["top1_agree"], h["top1_agree_stderr"], n)
    row["delta_nll_ci95"] = _t_ci(h["delta_nll"], h["delta_nll_stderr"], n)
    if r.other is not None:
        o, k = r.other, len(r.other_damage) if r.other_damage is not None else 0
        row["other_text"] = {**o, "kld_ci95": _t_ci(o["kld_mean"], o["kld_stderr"], k),
                             "top1_ci95": _t_ci(o["top1_agree"], o["top1_agree_stderr"], k)}
    if r.predicted is not None and r.window_damage is not None:
        row["predicted"] = r.predicted
        row["uncovered_in_prediction"] = r.uncovered
        sw = r.sweep_window_damage
        # (paired: None unless both were measured, on as many windows)
        if sw is not None and (res := paired(sw, r.predicted_windows)) is not None:
            row["residual_sweep_windows"] = {"measured": float(sw.mean()), "residual": res["diff"],
                                             "stderr": res["stderr"], "ci95": res["ci95"]}
        pred_se = float(r.predicted_windows.std(ddof=1) / math.sqrt(len(r.predicted_windows))) \
            if r.predicted_windows is not None and len(r.predicted_windows) > 1 else math.nan
        m_se = float(r.window_damage.std(ddof=1) / math.sqrt(n))
        se = math.sqrt(m_se ** 2 + pred_se ** 2)
        residual = float(r.window_damage.mean()) - r.predicted
        row["residual_heldout"] = {"residual": residual, "stderr": se,
                                   "ci95": (residual - 1.96 * se, residual + 1.96 * se)}
    return row


def versus(r: FileScore, base: FileScore) -> Versus | None:
    """r - base, paired per window, on the held-out windows (and on the other text's)."""
    held_out = paired(r.window_damage, base.window_damage)
    if held_out is None:
        return None
    out = Versus(**held_out)
    if r.predicted is not None and base.predicted is not None and set(r.uncovered) == set(base.uncovered):
        # both files leave the same tensors outside the tables: the difference is all predicted
        out["predicted_diff"] = r.predicted - base.predicted
    other = paired(r.other_damage, base.other_damage)
    if other is not None:
        out["other_text"] = other
    return out


def _report(results: list[FileScore], metric: str, refs: References) -> dict:
    rows = []
    base = next((r for r in results if r.label != "recipe"), None)  # the first preset: Q4_K_M by default order
    q4km = next((r for r in results if r.label == "Q4_K_M"), base)
    for r in results:
        row = file_row(r)
        if q4km is not None and r is not q4km:
            vs = versus(r, q4km)
            if vs is not None:
                row[f"vs_{q4km.label}"] = vs
        rows.append(row)
    return {"metric": metric, **refs.describe(), "files": rows}


def format_report(report: dict) -> str:
    metric = report["metric"]
    h = report["heldout"]
    lines = [f"held-out validation: {h['windows']} windows of {h['n_ctx']} tokens from token {h['first_token']} on "
             f"(after the tables' slice), {h['tokens_scored']} tokens scored; 95% t-intervals over windows",
             f"{'file':<8} {'bytes':>10} {'MB':>8} {'bpw':>6} {'PPL':>16} {'KLD [95% CI]':>30} {'KLD p99.9':>10} "
             f"{'top-1 % [95% CI]':>24} {'Δ vs Q4_K_M [95% CI]':>34} {'predicted':>10} "
             f"{'residual (sweep win.) [95% CI]':>36}"]
    for r in report["files"]:
        kl, kh = r["kld_ci95"]
        tl, th = r["top1_ci95"]
        vs = next((v for k, v in r.items() if k.startswith("vs_")), None)
        vs_s = f"{vs['diff']:+.3e} [{vs['ci95'][0]:+.2e},{vs['ci95'][1]:+.2e}]" if vs else ""
        pred, rs_s = prediction_cells(r)
        lines.append(f"{r['file']:<8} {r['file_bytes']:>10} {r['file_bytes'] / 1e6:>8.3f} {r['bpw_file']:>6.3f} "
                     f"{r['ppl']:>8.4f} ± {r['ppl_stderr']:.4f} {r['kld_mean']:.4e} [{kl:.3e},{kh:.3e}] "
                     f"{r['kld_p999']:>10.4f} {100 * r['top1_agree']:6.2f} [{100 * tl:.2f},{100 * th:.2f}] "
                     f"{vs_s:>34} {pred:>10} {rs_s:>36}")
    ref = report["files"][0]
    lines.append(f"reference (source in F32): PPL {ref['ref_ppl']:.4f} ± {ref['ref_ppl_stderr']:.4f}; "
                 f"the solver minimised the sum of {metric} (predicted/residual); KLD p99.9: the 99.9th percentile "
                 f"of the per-token KLD; top-1: llama-perplexity's same top p; compute: "
                 f"{report.get('compute', {}).get('kv_type', '')} K/V cache, flash attention "
                 f"{report.get('compute', {}).get('flash_attn', '')}, no repacking")
    if report.get("other_text"):
        lines += format_other(report["other_text"], [(r["file"], r, next((v for k, v in r.items()
                                                                          if k.startswith("vs_")), None))
                                                     for r in report["files"]])
    return "\n".join(lines)


def format_other(other: dict, rows: list[tuple[str, dict, dict | None]]) -> list[str]:
    """The other text's lines (--heldout-text): per file, PPL, KLD and top-1 with intervals and the paired
    difference."""
    lines = [f"on another text: {other['text']} (sha256 {other['text_sha256'][:16]}...), {other['windows']} windows "
             f"of {other['n_ctx']} tokens, {other['tokens_scored']} tokens scored"]
    for label, r, vs in rows:
        o = r.get("other_text")
        if o is None:
            continue
        kl, kh = o["kld_ci95"]
        tl, th = o["top1_ci95"]
        d = (vs or {}).get("other_text")
        d_s = f"{d['diff']:+.3e} [{d['ci95'][0]:+.2e},{d['ci95'][1]:+.2e}]" if d else ""
        lines.append(f"{label:<8} PPL {o['ppl']:8.4f} ± {o['ppl_stderr']:.4f} (reference {o['ref_ppl']:.4f}) "
                     f"KLD {o['kld_mean']:.4e} [{kl:.3e},{kh:.3e}] top-1 {100 * o['top1_agree']:6.2f} "
                     f"[{100 * tl:.2f},{100 * th:.2f}] {d_s}")
    return lines


def _write_plot(path: Path, report: dict) -> None:
    from ..report.plots import plt, recipe_pareto  # deferred: matplotlib, only for the figure (headless backend there)

    fig = recipe_pareto(report)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def prediction_cells(row) -> tuple[str, str]:
    """A table row's predicted damage and the additivity residual on the sweep's windows with its 95% interval, as
    the validation and ladder tables print them ("-" where the row has none)."""
    pred = f"{row['predicted']:.3e}" if row.get("predicted") is not None else "-"
    rs = row.get("residual_sweep_windows")
    return pred, (f"{rs['residual']:+.2e} [{rs['ci95'][0]:+.1e},{rs['ci95'][1]:+.1e}]" if rs else "-")
