"""The measured damage of each weight tensor at each GGUF type, from the gathered tables of finished sweeps.

One row per (tensor, type stored): the metric's value, its window-blocked standard error, its per-window means (so
that sums over tensors measured on the same windows get an honest standard error), the type llama.cpp stores it
in, and the slice it was measured on (validation must stay off those windows).
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import SweepError
from ..estimate.rows import gather_table
from ..llama.gguf_names import split_block
from ..llama.model_file import embedded_model_path
from ..scoring.metrics import RANKABLE

log = logging.getLogger("sweep.recipe")


@dataclass
class Measurement:
    tensor: str  # full name, e.g. blk.3.attn_q.weight
    type_asked: str  # the sweep's fmt (q4_K)
    type_stored: str  # what llama.cpp stores (q5_0 on rows the q4_K block does not divide)
    damage: float  # the metric as damage (1 - top-1 agreement for top1_agree)
    stderr: float
    windows: np.ndarray | None  # per-window damage means, or None
    estimated: bool = False  # the map's prediction (run.estimate=map), not a measurement
    lo: float = math.nan  # 95% interval of the damage: a prediction's own, a measurement's ± 1.96 stderr
    hi: float = math.nan

    def interval(self) -> tuple[float, float]:
        if self.estimated or not math.isfinite(self.stderr):
            return (self.lo, self.hi) if self.estimated else (self.damage, self.damage)
        return self.damage - 1.96 * self.stderr, self.damage + 1.96 * self.stderr


@dataclass
class Table:
    metric: str
    # (tensor, type stored) -> measurement: a q6_K point stored as q8_0 (llama.cpp's row fallback) is the same weight
    # as the q8_0 point, so either stands for both
    rows: dict[tuple[str, str], Measurement]
    diverged: set[tuple[str, str]] = field(default_factory=set)  # measured: the model broke (never chosen)
    model: str | None = None  # the model file the tables were measured on (its name)
    model_path: str | None = None  # where it was when measured (records since MoE support say it)
    model_sha256: str | None = None
    container: str | None = None
    n_ctx: int = 512
    n_windows: int = 0  # windows of the slice measured (the largest when runs differ)
    imatrix: bool = False
    data_source: str | None = None  # the text the tables were measured on, and its hash
    data_sha256: str | None = None

    @property
    def tensors(self) -> set[str]:
        return {t for t, _ in self.rows} | {t for t, _ in self.diverged}

    @property
    def measured_tokens(self) -> int:
        """Tokens at the start of the text that the tables were measured on (validation skips them)."""
        return self.n_windows * self.n_ctx


def damage_of(metric: str, value):
    """The metric as damage, higher = worse (1 - top-1 agreement for top1_agree): metrics.Metric.damage."""
    return RANKABLE[metric].damage(value)


def read_table(runs: list[Path], metric: str = "kld_mean", imatrix: bool = False) -> Table:
    """Single-tensor weight points of the given sweep directories (or record files)."""
    if metric not in RANKABLE:
        raise SweepError(f"--metric {metric!r}: choose among {', '.join(RANKABLE)}")
    for run in runs:
        if not Path(run).exists():
            raise SweepError(f"{run} does not exist: give sweep directories (hydra.sweep.dir) or record files")
    df = gather_table(runs)
    if df.empty:
        raise SweepError(f"no records under {', '.join(map(str, runs))}: run the sweep first (docs/recipes.md: "
                         f"Mixed-precision recipe)")
    # a weight no-op is a measurement too: the type holds the tensor exactly, the model is bit-identical, the damage
    # is 0 (the embedded model is Q4_1: with an imatrix, llama.cpp's q5_1 recovers its 4-bit grid exactly)
    df = df[(df["kind"] == "weight") & df["status"].isin(["ok", "no-op", "diverged"]) & df["ggml_type"].notna()]
    df = df[~df["targets"].astype(str).str.contains(",")]  # one tensor per point
    if "imatrix_used" in df:
        # measured with an importance matrix: one that covers the tensor, or one without its entry (the token
        # embedding: the build with that matrix quantizes it without data too, as the point did)
        lacking = df["imatrix_missing"].notna() if "imatrix_missing" in df else pd.Series(False, index=df.index)
        with_im = df["imatrix_used"].fillna(False).astype(bool) | lacking
        df = df[with_im] if imatrix else df[df["imatrix_used"].isna() & ~lacking]
    elif imatrix:
        df = df.iloc[0:0]
    if df.empty:
        what = "measured with an importance matrix" if imatrix else "of GGUF types on weights"
        raise SweepError(f"the tables hold no single-tensor weight points {what} (fmt=q4_K, ...): run the grid "
                         f"of docs/recipes.md 'Mixed-precision recipe'")
    for col in ("model_sha256", "data_sha256"):
        if df[col].nunique() > 1:
            raise SweepError(f"the tables mix {df[col].nunique()} {'models' if col == 'model_sha256' else 'texts'}"
                             f": give the runs of one model measured on one text")
    stderr_col = RANKABLE[metric].stderr
    win_col = RANKABLE[metric].window_column
    # the same point measured twice (another slice, a rerun): the one with more windows wins, then the newest
    df = df.assign(_n=df["n_windows"].astype(int)).sort_values(["_n", "finished_at"])
    paths = df["model_path"].dropna() if "model_path" in df else pd.Series(dtype=object)
    table = Table(metric, {}, model=str(df["model"].iloc[0]), model_sha256=str(df["model_sha256"].iloc[0]),
                  model_path=str(paths.iloc[-1]) if len(paths) else None,
                  container=str(df["container"].iloc[0]), n_ctx=int(df["n_ctx"].max()),
                  n_windows=int((df["n_windows"].astype(int) * df["n_ctx"].astype(int)).max()
                                // int(df["n_ctx"].max())),
                  imatrix=imatrix, data_source=str(df["data_source"].iloc[0]),
                  data_sha256=str(df["data_sha256"].iloc[0]))
    for r in df.itertuples(index=False):
        tensor, stored, fmt = str(r.targets), str(r.ggml_type), str(r.fmt)  # strings in every record kept above
        key = (tensor, stored)
        if r.status == "diverged":
            table.diverged.add(key)
            table.rows.pop(key, None)
            continue
        value = getattr(r, metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise SweepError(f"{tensor} {fmt}: the record has no {metric} (measured with metrics.kld=false?): "
                             f"choose --metric delta_nll or rerun with KL")
        windows = None
        w = getattr(r, win_col, None) if win_col else None
        if isinstance(w, (list, np.ndarray)) and len(w):
            windows = damage_of(metric, np.asarray(w, float))
        se = getattr(r, stderr_col) if stderr_col else math.nan
        estimated = bool(getattr(r, "estimated", False)) and pd.notna(getattr(r, "estimated", False))
        if estimated and metric != "kld_mean":
            raise SweepError("the tables hold the map's predictions (run.estimate=map), which predict kld_mean: "
                             "choose --metric kld_mean")
        lo, hi = (float(getattr(r, "estimate_lo")), float(getattr(r, "estimate_hi"))) if estimated else \
            (math.nan, math.nan)  # noqa: B009  (getattr: a row's columns are not attributes mypy knows)
        if estimated:  # a prediction's standard error, for the sums: its 95% interval's half width
            se = (hi - lo) / 3.92
        table.rows[key] = Measurement(tensor, fmt, stored, float(damage_of(metric, float(value))),
                                      float(se) if se is not None and pd.notna(se) else math.nan, windows,
                                      estimated, lo, hi)
        table.diverged.discard(key)
    return table


def _layers_arg(layers: list[int]) -> str:
    layers = sorted(set(layers))
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"'layer=range({layers[0]},{layers[-1] + 1})'"
    return "layer=" + ",".join(map(str, layers))


def measure_command(missing: list[tuple[str, str]], table: Table) -> str:
    """The sweep that measures the missing (tensor, type) points (those already in its store are reused)."""
    layers, tensors, outside = [], [], []
    for name, _ in missing:
        split = split_block(name)
        if split is not None and split[1].endswith(".weight"):
            layers.append(split[0])
            tensors.append(split[1].removesuffix(".weight"))
        else:
            outside.append(name.removesuffix(".weight"))
    fmts = ",".join(dict.fromkeys(ty for _, ty in missing))
    args = ["python -m sweep"]
    if layers:
        args.append(_layers_arg(layers))
    args += [f"tensor={','.join(dict.fromkeys(tensors + outside))}", "kind=weight", f"fmt={fmts}",
             f"data.n_windows={table.n_windows}", f"data.n_ctx={table.n_ctx}", f"model.container={table.container}",
             "metrics.generate=false", f"metrics.rank_by={table.metric}"]

    if table.model != embedded_model_path().name:
        args.append(f"model.path=<the {table.model} you measured>")
    return " ".join(args)


def check_complete(table: Table, missing: list[tuple[str, str]]) -> None:
    if missing:
        shown = ", ".join(f"{n} {ty}" for n, ty in missing[:4])
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        raise SweepError(f"{len(missing)} candidate measurement(s) missing: {shown}{more}; measure them with: "
                         f"{measure_command(missing, table)} (add run.store=... to reuse the points already run)")


def sweep_on_tables(table: Table, axes: list[str], sweep_dir: Path, store: str | Path, threads: int,
                    imatrix: Path | None, what: str) -> None:
    """`python -m sweep AXES` on the tables' model, text, slice and container (so that its points pair with the
    tables' own), into `sweep_dir`; a failure is a SweepError saying `what` failed and the sweep's command."""
    cmd = [sys.executable, "-m", "sweep", *axes, f"model.container={table.container}",
           f"data.path={table.data_source}", f"data.n_ctx={table.n_ctx}", f"data.n_windows={table.n_windows}",
           "metrics.generate=false", f"metrics.rank_by={table.metric}", "run.progress=false",
           f"run.threads={threads}", f"run.store={store}", f"hydra.sweep.dir={sweep_dir}"]
    if table.model_path:
        cmd.append(f"model.path={table.model_path}")
    if imatrix:
        cmd.append(f"fmt.imatrix={imatrix}")
    log.info("%s: %s", what, " ".join(cmd[1:]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SweepError(f"{what} failed ({tail}); the sweep's command: python -m sweep {' '.join(cmd[3:])}")
