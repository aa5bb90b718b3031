"""Early stopping: the windows it saves and what it costs the ranking, measured on a real sweep.

    python -m bench.studies.early_stop [--quick] [--store DIR]
    python -m bench.studies.early_stop --simulate      # seconds, numpy only: what early stopping does to the statistics

1. Runs the grid below on the full slice (the store keeps it: a second invocation reuses every point).
2. Runs it again with early stopping on (VERIFY_RULE) and checks that replaying that rule on the full sweep's
   per-window means gives the same windows and the same values: a replay is then as good as a run.
3. Replays a table of rules on the full sweep: windows scored, tokens saved, and the Spearman correlation and
   top-5 overlap of each early-stopped ranking with the full-slice ranking by the same metric.
Counts, not seconds: the figures do not depend on the machine's load.

--simulate: per-window means drawn as i.i.d. normal (200,000 points of 16 windows, effect in units of the
per-window standard deviation), the rtol=1 rule (min_windows 4) replayed on them: how often a zero effect would
be flagged by a t-test at the window where it stopped (what the flag did before it left early-stopped points
untested) and by the `significant` flag now, and how far an early-stopped estimate lies from the true effect.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from sweep.llama.cache import cache_root
from sweep.scoring.metrics import RANKABLE, EarlyStop, StopRule, delta_nll_p

ROOT = Path(__file__).resolve().parents[2]
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


def sweep(layers: str, n_windows: int, store: Path, out: Path, *extra: str) -> pd.DataFrame:
    args = [sys.executable, "-m", "sweep", f"layer={layers}", *GRID, f"data.n_windows={n_windows}",
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


def simulate(n_points: int = 200_000, n: int = 16, alpha: float = 0.05, seed: int = 0) -> None:
    rule = StopRule("delta_nll", EarlyStop(min_windows=4, rtol=1.0), alpha=alpha)
    rng = np.random.default_rng(seed)
    print(f"# rtol=1, min_windows=4, {n} windows, alpha {alpha}, {n_points} simulated points per effect size")
    print(f"{'effect':>7}{'stopped':>9}{'flag at stop':>14}{'flag now':>10}{'mean est. stopped':>19}"
          f"{'full':>8}{'all':>8}")
    for effect in (0.0, 0.1, 0.25, 0.5, 1.0):
        means = rng.normal(effect, 1.0, (n_points, n))
        stop = np.full(n_points, n)
        for k in range(1, n):
            stop[(stop == n) & rule.settled_means(means[:, :k])] = k
        estimate = np.empty(n_points)
        at_stop = np.empty(n_points)
        for k in np.unique(stop):
            rows = stop == k
            estimate[rows] = means[rows, :k].mean(axis=1)
            at_stop[rows] = delta_nll_p(means[rows, :k])
        stopped = stop < n
        flag_now = ~stopped & (at_stop < alpha)  # metrics.summarize: only full-length points are tested
        print(f"{effect:>7}{stopped.mean():>9.3f}{(at_stop < alpha).mean():>14.4f}{flag_now.mean():>10.4f}"
              f"{estimate[stopped].mean():>19.3f}{estimate[~stopped].mean():>8.3f}{estimate.mean():>8.3f}")
    z, t = group_sequential_level(n_points, n, 4, alpha, rng)
    print(f"\nnot used: a zero effect crosses an O'Brien-Fleming spending boundary (looks 4..{n}) at nominal "
          f"{100 * alpha:g}% in {100 * z:.2f}% of the points with the variance known, and in {100 * t:.2f}% with "
          f"t-tests over the windows at its nominal levels")


def obrien_fleming_bounds(looks: np.ndarray, alpha: float, n_grid: int = 401) -> np.ndarray:
    """Two-sided z-boundaries of Lan-DeMets O'Brien-Fleming-type alpha spending at `looks` (windows, the last one
    the full slice), by the recursive numerical integration of Armitage, McPherson and Rowe (known variance)."""
    from scipy import optimize

    spent = np.diff(2 * stats.norm.sf(stats.norm.isf(alpha / 2) / np.sqrt(looks / looks[-1])), prepend=0.0)
    bounds = [stats.norm.isf(spent[0] / 2)]
    u = np.linspace(-bounds[0] * math.sqrt(looks[0]), bounds[0] * math.sqrt(looks[0]), n_grid)  # running sums
    density = stats.norm.pdf(u, scale=math.sqrt(looks[0]))  # of the sum, given no crossing so far
    for j in range(1, len(looks)):
        sd = math.sqrt(looks[j] - looks[j - 1])
        weights = density * np.r_[0.5, np.ones(n_grid - 2), 0.5] * (u[1] - u[0])  # trapezoid rule

        def crossing(z: float) -> float:
            b = z * math.sqrt(looks[j])  # noqa: B023 (called within this iteration only)
            return float(weights @ (stats.norm.sf((b - u) / sd) + stats.norm.cdf((-b - u) / sd)))  # noqa: B023

        bounds.append(optimize.brentq(lambda z: crossing(z) - spent[j], 0.0, 40.0, xtol=1e-10))  # noqa: B023
        b = bounds[-1] * math.sqrt(looks[j])
        s = np.linspace(-b, b, n_grid)
        density = (stats.norm.pdf((s[:, None] - u[None, :]) / sd) / sd) @ weights
        u = s
    return np.array(bounds)


def group_sequential_level(n_points: int, n: int, min_windows: int, alpha: float, rng) -> tuple[float, float]:
    """How often a zero effect crosses the O'Brien-Fleming boundary at some look: with the variance known (z, what
    the boundary is built for), and with each look's t-test over the windows so far at the boundary's nominal level
    (the usual unknown-variance approximation)."""
    looks = np.arange(min_windows, n + 1)
    z_bounds = obrien_fleming_bounds(looks.astype(float), alpha)
    t_bounds = stats.t.isf(stats.norm.sf(z_bounds), looks - 1)
    means = rng.normal(0.0, 1.0, (n_points, n))
    crossed_z, crossed_t = np.zeros(n_points, bool), np.zeros(n_points, bool)
    for k, z_bound, t_bound in zip(looks, z_bounds, t_bounds):
        m = means[:, :k]
        crossed_z |= np.abs(m.mean(axis=1)) * math.sqrt(k) >= z_bound
        crossed_t |= np.abs(m.mean(axis=1)) / (m.std(axis=1, ddof=1) / math.sqrt(k)) >= t_bound
    return float(crossed_z.mean()), float(crossed_t.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--simulate", action="store_true", help="the statistics of early stopping, simulated (seconds)")
    ap.add_argument("--quick", action="store_true", help="10 layers, 8 windows")
    ap.add_argument("--store", type=Path, default=cache_root() / "bench-store",
                    help="point store (kept between invocations)")
    args = ap.parse_args()
    if args.simulate:
        return simulate()
    layers, n_windows = ("range(0,10)", 8) if args.quick else ("range(0,30)", 16)
    tmp = Path(tempfile.mkdtemp(prefix="sweep-early-"))
    print(f"# early stopping on `python -m sweep 'layer={layers}' {' '.join(GRID[:3])}`, {n_windows} windows, "
          f"store {args.store}")
    full = sweep(layers, n_windows, args.store, tmp / "full")
    assert (full["status"] == "ok").all() and (full["n_windows"] == n_windows).all(), full[["layer", "status"]]

    metric, params = VERIFY_RULE
    real = sweep(layers, n_windows, args.store, tmp / "early", *overrides(metric, params))
    rule = StopRule(metric, EarlyStop(**params), alpha=float(full["alpha"].iloc[0]))
    replays = [replay(r, metric, rule) for _, r in full.iterrows()]
    same_windows = sum(int(r.windows == n) for r, n in zip(replays, real["n_windows"]))
    same_values = sum(math.isclose(r.value, v, rel_tol=1e-6, abs_tol=1e-12) for r, v in zip(replays, real[metric]))
    print(f"\n## Replay vs a real early-stopped sweep ({metric}, {params})")
    print(f"windows equal for {same_windows}/{len(full)} points, {metric} equal (1e-6) for {same_values}/{len(full)}; "
          f"real sweep scored {int(real['n_windows'].sum())} of {n_windows * len(full)} windows")

    print(f"\n## Rules replayed on the full sweep ({len(full)} points x {n_windows} windows)")
    print(f"{'rank_by':<12}{'min_windows':>12}{'rtol':>6}{'atol':>8}{'windows':>10}{'tokens saved':>14}"
          f"{'Spearman':>10}{'top-5':>7}")
    for metric, params in RULES:
        rule = StopRule(metric, EarlyStop(**params), alpha=float(full["alpha"].iloc[0]))
        rs = [replay(r, metric, rule) for _, r in full.iterrows()]
        scored = sum(r.windows for r in rs)
        early = pd.Series([r.value for r in rs], index=full.index)
        rho = stats.spearmanr(full[metric], early).statistic
        print(f"{metric:<12}{params['min_windows']:>12}{params['rtol']:>6}{params['atol']:>8.0e}"
              f"{scored:>6}/{n_windows * len(full):<4}{100 * (1 - scored / (n_windows * len(full))):>13.1f}%"
              f"{rho:>10.3f}{top_overlap(full[metric], early, metric):>5}/5")


if __name__ == "__main__":
    main()
