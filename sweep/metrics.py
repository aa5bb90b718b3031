"""Metrics against the matching baseline, defined once, as data.

Per scored token a run yields three quantities, each paired with the baseline on the same token:
  dnll  NLL(run) - NLL(baseline)
  kld   KL(baseline || run) of the next-token distributions (llama-perplexity --kl-divergence's definition)
  top1  1 if the run's most likely token is the baseline's, else 0 ("same top p" in llama-perplexity)
Each metric below aggregates one of them. Standard errors are window-blocked: the mean of each window, then the
standard error of those means. Tokens of one window share their context and are correlated, so a token-level
standard error (what llama-perplexity prints) would be too small.

KL is exact: the baseline's raw float32 logits are kept on disk (full vocabulary, read one window at a time) and
KL is computed from the logit differences (perplexity.WindowMath), so it equals a float64 computation from
two full logit dumps to ~1e-4 relative even at KL ~ 1e-7. (A top-64 + tail scheme was measured to under-estimate
KL by ~20% on SmolLM2, whose next-token distributions are broad.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Metric:
    column: str
    per_token: str  # "dnll" | "kld" | "top1"
    statistic: str  # "mean" | "median" | "p99" | "max"
    stderr: str | None  # the column of its window-blocked standard error, if it has one
    worse: str  # which direction is more damage: "higher" | "lower"


METRICS = (
    Metric("delta_nll", "dnll", "mean", "delta_nll_stderr", "higher"),
    Metric("kld_mean", "kld", "mean", "kld_stderr", "higher"),
    Metric("kld_median", "kld", "median", None, "higher"),
    Metric("kld_p99", "kld", "p99", None, "higher"),
    Metric("kld_max", "kld", "max", None, "higher"),
    Metric("top1_agree", "top1", "mean", "top1_agree_stderr", "lower"),
)
# What the ranking can order by: every metric, and ΔPPL (computed from ΔNLL in run.record).
RANKABLE = {m.column: m for m in METRICS} | {"delta_ppl": Metric("delta_ppl", "dnll", "mean", "delta_ppl_stderr",
                                                                "higher")}
_STATISTICS = {"mean": np.mean, "median": np.median, "p99": lambda v: np.percentile(v, 99), "max": np.max}


def blocked_stderr(per_token: np.ndarray) -> float:
    """Standard error of the mean from per-window means (rows are windows)."""
    if per_token.shape[0] < 2:
        return math.nan
    return float(per_token.mean(axis=1).std(ddof=1) / math.sqrt(per_token.shape[0]))


def delta_nll_p(window_means: np.ndarray) -> np.ndarray:
    """Two-sided p-value of "mean ΔNLL = 0": one-sample t-test over the per-window means (the last axis), vectorized
    over leading axes. A zero standard error gives p = 0 for a non-zero mean (an exact shift) and 1 for zero."""
    n = window_means.shape[-1]
    mean = window_means.mean(axis=-1)
    se = window_means.std(axis=-1, ddof=1) / math.sqrt(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = 2 * stats.t.sf(np.abs(mean) / se, n - 1)
    return np.where(se > 0, p, np.where(mean != 0, 0.0, 1.0))


def summarize(per_token: dict[str, np.ndarray], alpha: float, stopped_early: bool = False) -> dict:
    """Every metric of METRICS whose per-token array is present, plus the ΔNLL test.

    `significant` (and its p-value `delta_nll_p`) is a per-point test of ΔNLL = 0 at level alpha (two-sided t-test
    over windows). It is made only for a point that scored every window. A point that stopped early (StopRule) is
    never flagged and has no p-value: the rule looked at it after every window, and a fixed-sample test applied at
    a data-chosen window does not keep its level (a zero effect is flagged 18.8% of the time at 5% with rtol=1:
    `python bench/early_stop.py --simulate`). A full-length point's test keeps its level whatever rule ran, since
    "reached the last window and p < alpha" is contained in "p < alpha at the last window" (test_metrics.py checks
    it by simulation). A group-sequential boundary would flag stopped points too, but its standard form assumes a
    known variance: with per-window t-statistics over 4-16 windows an O'Brien-Fleming spending boundary let 5.55%
    of zero effects cross it at nominal 5% (same bench), and an exact one needs the joint law of those t-statistics.
    KL and top-1 agreement have no test: "KL = 0" is false for any change at all, so rejecting it says nothing.
    """
    out = {}
    for m in METRICS:
        values = per_token.get(m.per_token)
        if values is None:
            continue
        out[m.column] = float(_STATISTICS[m.statistic](values))
        if m.stderr:
            out[m.stderr] = blocked_stderr(values)
    n_windows = next(iter(per_token.values())).shape[0]
    if n_windows > 1:
        p = math.nan if stopped_early else float(delta_nll_p(per_token["dnll"].mean(axis=1)))
        out["delta_nll_p"] = p
        out["significant"] = bool(p < alpha)  # NaN (stopped early) compares False
    return out


@dataclass(frozen=True)
class StopRule:
    """Early stopping: a point stops scoring windows once the window-blocked (1 - alpha) confidence interval of the
    mean damage it is ranked by is narrower than max(rtol * |estimate|, atol) -- the estimate is then known to
    within rtol of itself or to be below atol (negligible). With rtol=1 the interval excludes 0 at the moment it
    stops, but that is not a significance test: the rule asked after every window, so a zero effect stops this way
    far more often than alpha (see `summarize`, which never flags an early-stopped point), and a point that stops
    early reports an estimate biased away from 0 (it stopped because its running mean was large).

    The damage is the mean of the rank metric's per-token quantity: ΔNLL for delta_ppl/delta_nll, KL for kld_*,
    1 - top-1 agreement for top1_agree. atol is in its units (nats, or a fraction of tokens).
    """
    per_token: str
    min_windows: int = 4
    rtol: float = 0.5
    atol: float = 0.0
    alpha: float = 0.05

    @classmethod
    def for_metric(cls, rank_by: str, **params) -> StopRule:
        return cls(RANKABLE[rank_by].per_token, **params)

    def settled(self, per_token: dict[str, np.ndarray]) -> bool:
        return bool(self.settled_means(per_token[self.per_token].mean(axis=1)))

    def settled_means(self, window_means: np.ndarray) -> np.ndarray:
        """The rule on per-window means of its quantity (the last axis: windows so far), vectorized over leading
        axes; `settled` applies it to one point's per-token arrays."""
        means = 1.0 - window_means if self.per_token == "top1" else window_means
        n = means.shape[-1]
        if n < max(2, self.min_windows):
            return np.zeros(means.shape[:-1], bool)
        half_width = stats.t.ppf(1 - self.alpha / 2, n - 1) * means.std(axis=-1, ddof=1) / math.sqrt(n)
        return half_width <= np.maximum(self.rtol * np.abs(means.mean(axis=-1)), self.atol)
