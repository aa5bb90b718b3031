"""Metrics against the matching baseline, defined once, as data.

Per scored token a run yields quantities paired with the baseline on the same token (PER_TOKEN):
  dnll  NLL(run) - NLL(baseline)
  kld   KL(baseline || run) of the next-token distributions (llama-perplexity --kl-divergence's definition)
  top1  1 if the run's most likely token is the baseline's, else 0 ("same top p" in llama-perplexity)
Each metric of METRICS aggregates them into one column, with its standard error, direction and test; records,
ranking, early stopping, the generation check's choice of points and the plots all read it from there. Adding a
metric is adding one `Metric`. Standard errors are window-blocked: the mean of each window, then the
standard error of those means. Tokens of one window share their context and are correlated, so a token-level
standard error (what llama-perplexity prints) would be too small.

KL is exact: the baseline's raw float32 logits are kept on disk (full vocabulary, read one window at a time) and
KL is computed from the logit differences (window_math.WindowMath), so it equals a float64 computation from
two full logit dumps to ~1e-4 relative even at KL ~ 1e-7. (A top-64 + tail scheme was measured to under-estimate
KL by ~20% on SmolLM2, whose next-token distributions are broad.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

Tokens = dict[str, np.ndarray]  # per-token quantity -> (n_windows, n_scored) array (see PER_TOKEN)

# The per-token quantities a point yields (run.per_token), and which of them need the baseline's raw logits.
PER_TOKEN = {"dnll": "NLL(run) - NLL(baseline)", "kld": "KL(baseline || run)", "top1": "1 if the top token is kept",
             "nll": "NLL(run)", "base_nll": "NLL(baseline)"}
NEEDS_LOGITS = frozenset({"kld"})


@dataclass(frozen=True)
class Test:
    """A per-point significance test of "this metric is 0" and the columns it fills (a q-value column is added over
    the whole table: records.add_q_values)."""
    p: str
    q: str
    flag: str


@dataclass(frozen=True)
class Metric:
    column: str
    per_token: str  # the quantity of PER_TOKEN it aggregates
    value: Callable[[Tokens], float]
    worse: str  # which direction is more damage: "higher" | "lower"
    label: str  # in words, for axes and tables
    stderr: str | None = None  # the column of its paired standard error, if it has one
    stderr_value: Callable[[Tokens], float] | None = None
    test: Test | None = None
    # the per-token damage whose mean early stopping watches (larger = worse): the quantity itself, or 1 - top-1
    damage: Callable[[np.ndarray], np.ndarray] = lambda v: v
    also_reads: tuple[str, ...] = ()  # quantities besides per_token that `value` needs
    token_mean: bool = False  # the value is the mean of per_token: per-window means of it add up to it

    @property
    def window_column(self) -> str | None:
        """The record's per-window means of this metric's quantity (pipeline/point.record), when they make up the
        value."""
        return f"window_{self.per_token}" if self.token_mean else None

    def window_damage(self, tokens: Tokens) -> np.ndarray | None:
        """Per-window means of the damage (what a recipe adds up over tensors); None unless a token mean."""
        return self.damage(tokens[self.per_token]).mean(axis=1) if self.token_mean and self.per_token in tokens \
            else None

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.per_token, *self.also_reads)

    @property
    def needs_logits(self) -> bool:
        return self.per_token in NEEDS_LOGITS

    def worst_first(self, values: pd.Series) -> pd.Series:
        """`values` of this metric as a key that sorts descending from the most damaged."""
        return -values if self.worse == "lower" else values


def _of(quantity: str, statistic: Callable[[np.ndarray], float]) -> Callable[[Tokens], float]:
    return lambda tokens: float(statistic(tokens[quantity]))


def _blocked(quantity: str) -> Callable[[Tokens], float]:
    return lambda tokens: blocked_stderr(tokens[quantity])


def _delta_ppl(tokens: Tokens) -> float:
    return math.exp(float(tokens["nll"].mean())) - math.exp(float(tokens["base_nll"].mean()))


def _delta_ppl_stderr(tokens: Tokens) -> float:
    # ΔPPL = PPL_base * (exp(ΔNLL) - 1): its paired standard error by the delta method
    return math.exp(float(tokens["nll"].mean())) * blocked_stderr(tokens["dnll"])


METRICS = (
    Metric("delta_ppl", "dnll", _delta_ppl, "higher", "ΔPPL vs. baseline", "delta_ppl_stderr", _delta_ppl_stderr,
           also_reads=("nll", "base_nll")),
    Metric("delta_nll", "dnll", _of("dnll", np.mean), "higher", "ΔNLL vs. baseline (nats)", "delta_nll_stderr",
           _blocked("dnll"), Test("delta_nll_p", "delta_nll_q", "significant"), token_mean=True),
    Metric("kld_mean", "kld", _of("kld", np.mean), "higher", "KL divergence (baseline ‖ run)", "kld_stderr",
           _blocked("kld"), token_mean=True),
    Metric("kld_median", "kld", _of("kld", np.median), "higher", "median KL divergence"),
    Metric("kld_p99", "kld", _of("kld", lambda v: np.percentile(v, 99)), "higher", "99th percentile KL divergence"),
    Metric("kld_p999", "kld", _of("kld", lambda v: np.percentile(v, 99.9)), "higher",
           "99.9th percentile KL divergence (the tail: a few tokens a file gets badly wrong)"),
    Metric("kld_max", "kld", _of("kld", np.max), "higher", "largest KL divergence"),
    Metric("top1_agree", "top1", _of("top1", np.mean), "lower", "top-1 agreement with the baseline",
           "top1_agree_stderr", _blocked("top1"), damage=lambda v: 1.0 - v, token_mean=True),
)
RANKABLE = {m.column: m for m in METRICS}  # what the ranking, plots and early stopping can order by


def worst_first(df: pd.DataFrame, column: str) -> pd.Series:
    """A sort key, descending from the most damaged row, for a metric's column (any other numeric column of the
    table sorts as larger = worse)."""
    return RANKABLE[column].worst_first(df[column]) if column in RANKABLE else df[column]


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


def summarize(per_token: Tokens, alpha: float, stopped_early: bool = False) -> dict:
    """Every metric of METRICS whose per-token quantity is present, and every metric's test.

    `significant` (and its p-value `delta_nll_p`) is a per-point test of ΔNLL = 0 at level alpha (two-sided t-test
    over windows). It is made only for a point that scored every window. A point that stopped early (StopRule) is
    never flagged and has no p-value: the rule looked at it after every window, and a fixed-sample test applied at
    a data-chosen window does not keep its level (a zero effect is flagged 18.8% of the time at 5% with rtol=1:
    `python -m bench.studies.early_stop --simulate`). A full-length point's test keeps its level whatever rule ran,
    since "reached the last window and p < alpha" is contained in "p < alpha at the last window" (test_metrics.py
    checks it by simulation). A group-sequential boundary would flag stopped points too, but its standard form assumes a
    known variance: with per-window t-statistics over 4-16 windows an O'Brien-Fleming spending boundary let 5.55%
    of zero effects cross it at nominal 5% (same bench), and an exact one needs the joint law of those t-statistics.
    KL and top-1 agreement have no test: "KL = 0" is false for any change at all, so rejecting it says nothing.
    """
    out = {}
    n_windows = next(iter(per_token.values())).shape[0]
    for m in METRICS:
        if any(q not in per_token for q in m.inputs):
            continue
        out[m.column] = m.value(per_token)
        if m.stderr and m.stderr_value is not None:  # (given together)
            out[m.stderr] = m.stderr_value(per_token)
        if m.test and n_windows > 1:
            p = math.nan if stopped_early else float(delta_nll_p(per_token[m.per_token].mean(axis=1)))
            out[m.test.p] = p
            out[m.test.flag] = bool(p < alpha)  # NaN (stopped early) compares False
    return out


@dataclass
class EarlyStop:
    """The early-stopping parameters (the config's `metrics.early_stop`; explained in `StopRule`)."""
    enabled: bool = False
    min_windows: int = 4
    rtol: float = 0.5
    atol: float = 0.0


@dataclass(frozen=True)
class StopRule:
    """Early stopping: a point stops scoring windows once the window-blocked (1 - alpha) confidence interval of the
    mean damage it is ranked by is narrower than max(rtol * |estimate|, atol) -- the estimate is then known to
    within rtol of itself or to be below atol (negligible). With rtol=1 the interval excludes 0 at the moment it
    stops, but that is not a significance test: the rule asked after every window, so a zero effect stops this way
    far more often than alpha (see `summarize`, which never flags an early-stopped point), and a point that stops
    early reports an estimate biased away from 0 (it stopped because its running mean was large).

    The damage is the rank metric's per-token `damage`: ΔNLL for delta_ppl/delta_nll, KL for kld_*, 1 - top-1
    agreement for top1_agree. atol is in its units (nats, or a fraction of tokens).
    """
    metric: str  # a RANKABLE column: the metric the sweep ranks by
    params: EarlyStop = field(default_factory=EarlyStop)
    alpha: float = 0.05

    def key(self) -> dict:
        """What determines the rule's decisions (part of a point's store key)."""
        p = self.params
        return {"per_token": RANKABLE[self.metric].per_token, "min_windows": p.min_windows, "rtol": p.rtol,
                "atol": p.atol, "alpha": self.alpha}

    def settled(self, per_token: Tokens) -> bool:
        return bool(self.settled_means(per_token[RANKABLE[self.metric].per_token].mean(axis=1)))

    def settled_means(self, window_means: np.ndarray) -> np.ndarray:
        """The rule on per-window means of its quantity (the last axis: windows so far), vectorized over leading
        axes; `settled` applies it to one point's per-token arrays."""
        means = RANKABLE[self.metric].damage(window_means)
        n = means.shape[-1]
        if n < max(2, self.params.min_windows):
            return np.zeros(means.shape[:-1], bool)
        half_width = stats.t.ppf(1 - self.alpha / 2, n - 1) * means.std(axis=-1, ddof=1) / math.sqrt(n)
        return half_width <= np.maximum(self.params.rtol * np.abs(means.mean(axis=-1)), self.params.atol)
