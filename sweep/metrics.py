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


def summarize(per_token: dict[str, np.ndarray], alpha: float) -> dict:
    """Every metric of METRICS whose per-token array is present, plus the significance flags."""
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
        t = float(stats.t.ppf(1 - alpha / 2, n_windows - 1))  # two-sided: ΔNLL may go either way
        out["significant"] = bool(abs(out["delta_nll"]) > t * out["delta_nll_stderr"])
        if "kld_mean" in out:  # one-sided: KL is never negative
            out["kld_significant"] = bool(out["kld_mean"] > stats.t.ppf(1 - alpha, n_windows - 1)
                                          * out["kld_stderr"])
    return out


@dataclass(frozen=True)
class StopRule:
    """Early stopping: a point stops scoring windows once the window-blocked (1 - alpha) confidence interval of the
    mean damage it is ranked by is narrower than max(rtol * |estimate|, atol) -- the estimate is then known to
    within rtol of itself (rtol=1: its sign is settled, i.e. it is significant) or to be below atol (negligible).

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
        values = per_token[self.per_token]
        if self.per_token == "top1":
            values = 1.0 - values
        n = values.shape[0]
        if n < max(2, self.min_windows):
            return False
        means = values.mean(axis=1)
        half_width = float(stats.t.ppf(1 - self.alpha / 2, n - 1) * means.std(ddof=1) / math.sqrt(n))
        return half_width <= max(self.rtol * abs(float(means.mean())), self.atol)
