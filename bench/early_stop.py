"""Early stopping: the windows it saves and what it costs the ranking, measured on a real sweep.

    python bench/early_stop.py [--quick] [--store DIR]

1. Runs the grid below on the full slice (the store keeps it: a second invocation reuses every point).
2. Runs it again with early stopping on (VERIFY_RULE) and checks that replaying that rule on the full sweep's
   per-window means gives the same windows and the same values: a replay is then as good as a run.
3. Replays a table of rules on the full sweep: windows scored, tokens saved, and the Spearman correlation and
   top-5 overlap of each early-stopped ranking with the full-slice ranking by the same metric.
Counts, not seconds: the figures do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from sweep.metrics import RANKABLE, StopRule

ROOT = Path(__file__).resolve().parents[1]
GRID = ["tensor=l_out", "kind=activation", "fmt=int8", "metrics.generate=false", "run.progress=false"]
VERIFY_RULE = ("kld_mean", dict(min_windows=4, rtol=0.25, atol=0.0))
RULES = [("delta_ppl", dict(min_windows=4, rtol=1.0, atol=0.0)),
         ("delta_ppl", dict(min_windows=4, rtol=0.5, atol=0.0)),
         ("delta_ppl", dict(min_windows=4, rtol=1.0, atol=1e-3)),
         ("delta_ppl", dict(min_windows=4, rtol=1.0, atol=5e-3)),
         ("delta_ppl", dict(min_windows=8, rtol=1.0, atol=1e-3)),
         ("kld_mean", dict(min_windows=4, rtol=0.5, atol=0.0)),
         ("kld_mean", dict(min_windows=4, rtol=0.25, atol=0.0)),
         ("kld_mean", dict(min_windows=4, rtol=0.1, atol=0.0)),
         ("kld_mean", dict(min_windows=2, rtol=0.1, atol=0.0)),
         ("top1_agree", dict(min_windows=4, rtol=0.25, atol=0.0)),
         ("top1_agree", dict(min_windows=4, rtol=0.1, atol=0.0))]


def sweep(layers: str, n_chunks: int, store: Path, out: Path, *extra: str) -> pd.DataFrame:
    args = [sys.executable, "-m", "sweep", f"layer={layers}", *GRID, f"data.n_chunks={n_chunks}",
            f"run.store={store}", f"hydra.sweep.dir={out}", *extra]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"sweep failed: {proc.stderr[-2000:]}")
    return pd.read_parquet(out / "results.parquet").sort_values("layer").reset_index(drop=True)


@dataclass
class Replay:
    windows: int  # windows scored before the rule stopped
    value: float  # the rank metric over those windows


def replay(row: pd.Series, metric: str, rule: StopRule) -> Replay:
    """What a sweep with `rule` would have recorded for this point, from its full-slice per-window means (the
    rule itself only looks at per-window means, and window i is the same text in both runs)."""
    per_window = {name: np.asarray(row[f"window_{name}"])[:, None] for name in ("dnll", "kld", "top1")}
    n = len(per_window["dnll"])
    k = next((k for k in range(1, n) if rule.settled({q: v[:k] for q, v in per_window.items()})), n)
    return Replay(k, metric_over(row, metric, k))


def metric_over(row: pd.Series, metric: str, k: int) -> float:
    means = {name: float(np.mean(row[f"window_{name}"][:k])) for name in ("dnll", "kld", "top1", "baseline_nll")}
    if metric == "delta_ppl":
        return math.exp(means["baseline_nll"] + means["dnll"]) - math.exp(means["baseline_nll"])
    return means[RANKABLE[metric].per_token]


def top_overlap(a: pd.Series, b: pd.Series, metric: str, n: int = 5) -> int:
    lower = RANKABLE[metric].worse == "lower"
    pick = (lambda s: set(s.nsmallest(n).index)) if lower else (lambda s: set(s.nlargest(n).index))
    return len(pick(a) & pick(b))


def overrides(metric: str, params: dict) -> list[str]:
    return [f"metrics.rank_by={metric}", "metrics.early_stop.enabled=true",
            *(f"metrics.early_stop.{k}={v}" for k, v in params.items())]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10 layers, 8 windows")
    ap.add_argument("--store", type=Path, default=Path(os.environ.get("SWEEP_CACHE") or Path.home() / ".cache/sweep")
                    / "bench-store", help="point store (kept between invocations)")
    args = ap.parse_args()
    layers, n_chunks = ("range(0,10)", 8) if args.quick else ("range(0,30)", 16)
    tmp = Path(tempfile.mkdtemp(prefix="sweep-early-"))
    print(f"# early stopping on `python -m sweep 'layer={layers}' {' '.join(GRID[:3])}`, {n_chunks} windows, "
          f"store {args.store}")
    full = sweep(layers, n_chunks, args.store, tmp / "full")
    assert (full["status"] == "ok").all() and (full["n_chunks"] == n_chunks).all(), full[["layer", "status"]]

    metric, params = VERIFY_RULE
    real = sweep(layers, n_chunks, args.store, tmp / "early", *overrides(metric, params))
    rule = StopRule.for_metric(metric, alpha=float(full["alpha"].iloc[0]), **params)
    replays = [replay(r, metric, rule) for _, r in full.iterrows()]
    same_windows = sum(int(r.windows == n) for r, n in zip(replays, real["n_chunks"]))
    same_values = sum(math.isclose(r.value, v, rel_tol=1e-6, abs_tol=1e-12) for r, v in zip(replays, real[metric]))
    print(f"\n## Replay vs a real early-stopped sweep ({metric}, {params})")
    print(f"windows equal for {same_windows}/{len(full)} points, {metric} equal (1e-6) for {same_values}/{len(full)}; "
          f"real sweep scored {int(real['n_chunks'].sum())} of {n_chunks * len(full)} windows")

    print(f"\n## Rules replayed on the full sweep ({len(full)} points x {n_chunks} windows)")
    print(f"{'rank_by':<12}{'min_windows':>12}{'rtol':>6}{'atol':>8}{'windows':>10}{'tokens saved':>14}"
          f"{'Spearman':>10}{'top-5':>7}")
    for metric, params in RULES:
        rule = StopRule.for_metric(metric, alpha=float(full["alpha"].iloc[0]), **params)
        rs = [replay(r, metric, rule) for _, r in full.iterrows()]
        scored = sum(r.windows for r in rs)
        early = pd.Series([r.value for r in rs], index=full.index)
        rho = stats.spearmanr(full[metric], early).statistic
        print(f"{metric:<12}{params['min_windows']:>12}{params['rtol']:>6}{params['atol']:>8.0e}"
              f"{scored:>6}/{n_chunks * len(full):<4}{100 * (1 - scored / (n_chunks * len(full))):>13.1f}%"
              f"{rho:>10.3f}{top_overlap(full[metric], early, metric):>5}/5")


if __name__ == "__main__":
    main()
