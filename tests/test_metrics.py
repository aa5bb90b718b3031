"""KL divergence, top-1 agreement and paired statistics agree with an exact float64 computation."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from conftest import make_settings
from scipy import stats
from scipy.special import logsumexp

from sweep.pipeline.point import record, run_point
from sweep.pipeline.reference import open_reference
from sweep.quant.apply import applied
from sweep.quant.formats import make_format
from sweep.quant.targets import resolve
from sweep.report.ranking import format_ranking
from sweep.scoring.generation import Completion, first_departure
from sweep.scoring.metrics import EarlyStop, StopRule, blocked_stderr, delta_nll_p, summarize
from sweep.scoring.window_math import BaselineWindow, WindowMath
from sweep.store.records import Store, add_q_values


def full_logprobs(backend, windows) -> np.ndarray:
    """Exact float64 log-softmax of every scored position (a full logit dump)."""
    dumps = [backend.decode_window(w, windows.output_mask).astype(np.float64) for w in windows.tokens]
    return np.stack([d - logsumexp(d, axis=1, keepdims=True) for d in dumps])


def exact_metrics(ref, target, fmt):
    base = full_logprobs(ref.backend, ref.windows)
    with applied(ref.backend, target, fmt):
        run = full_logprobs(ref.backend, ref.windows)
    kld = (np.exp(base) * (base - run)).sum(axis=-1)
    top1 = (base.argmax(-1) == run.argmax(-1)).astype(float)
    targets = ref.windows.targets
    pick = lambda lp: -np.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]  # noqa: E731
    return kld, top1, pick(run) - pick(base)


CASES = [("weight", "ffn_down", 1, make_format("int8")), ("activation", "l_out", 0, make_format("fp8_e4m3")),
         ("weight", "attn_q", 2, make_format("bf16"))]


@pytest.mark.parametrize("kind, tensor, layer, fmt", CASES)
def test_kld_top1_dnll_match_exact_float64_on_the_tiny_model(kind, tensor, layer, fmt, tiny_model, wikitext,
                                                             cache_dir, tmp_path, monkeypatch):
    ref = open_reference(make_settings(tiny_model, wikitext, 64, 4, "f32", cache_dir))
    target = resolve(kind, tensor, layer, ref.info, ref.backend.nodes)
    out = run_point(ref, target, fmt, progress=False, store=Store(tmp_path))  # the baseline goes through disk
    assert isinstance(out.baseline.logits, np.memmap) and str(tmp_path) in str(out.baseline.logits.filename)
    kld, top1, dnll = exact_metrics(ref, target, fmt)
    assert out.score.kld is not None
    np.testing.assert_allclose(out.score.kld, kld, rtol=1e-3, atol=1e-9)
    rec = record(ref, target, fmt, out)
    assert rec["kld_mean"] == pytest.approx(kld.mean(), rel=1e-4)
    assert rec["kld_p99"] == pytest.approx(np.percentile(kld, 99), rel=1e-3, abs=1e-9)  # resolution ~1e-9
    assert rec["top1_agree"] == pytest.approx(top1.mean(), abs=1e-12)
    # llama-perplexity's NLL (float32 exponentials) vs float64: ~1e-8 absolute on the mean
    assert rec["delta_nll"] == pytest.approx(dnll.mean(), rel=1e-4, abs=1e-8)
    assert rec["delta_nll_stderr"] == pytest.approx(dnll.mean(axis=1).std(ddof=1) / 2, rel=1e-3)


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.parametrize("kind, tensor, layer, fmt", [("weight", "ffn_down", 5, make_format("bf16")),
                                                      ("activation", "l_out", 10, make_format("int8"))])
def test_kld_matches_exact_float64_on_the_real_model(kind, tensor, layer, fmt, wikitext, cache_dir, tmp_path,
                                                     monkeypatch):
    ref = open_reference(make_settings(None, wikitext, 512, 2, "f32", cache_dir))
    target = resolve(kind, tensor, layer, ref.info, ref.backend.nodes)
    out = run_point(ref, target, fmt, progress=False, store=Store(tmp_path))
    assert isinstance(out.baseline.logits, np.memmap) and str(tmp_path) in str(out.baseline.logits.filename)
    kld, top1, _ = exact_metrics(ref, target, fmt)
    assert kld.mean() < 2e-3  # small perturbations: the regime where rounding could drown the signal
    assert out.score.kld.mean() == pytest.approx(kld.mean(), rel=1e-3)
    assert record(ref, target, fmt, out)["top1_agree"] == pytest.approx(top1.mean(), abs=1e-12)


def test_identical_model_has_zero_kld_and_full_agreement(tiny_model, wikitext, cache_dir):
    ref = open_reference(make_settings(tiny_model, wikitext, 64, 3, "f32", cache_dir))
    target = resolve("activation", "l_out", 1, ref.info, ref.backend.nodes)
    out = run_point(ref, target, make_format("none"), progress=False)
    assert out.status == "no-op"
    assert np.abs(out.score.kld).max() < 1e-12 and (out.score.argmax == out.baseline.argmax).all()


def test_significance_uses_t_quantiles_over_windows():
    rng = np.random.default_rng(0)
    noise = {"dnll": rng.normal(0, 1e-3, (16, 255)), "kld": np.abs(rng.normal(0, 1e-6, (16, 255))),
             "top1": np.ones((16, 255))}
    assert not summarize(noise, 0.05)["significant"]
    shifted = {**noise, "dnll": noise["dnll"] + 1e-3}
    s = summarize(shifted, 0.05)
    assert s["significant"] and "kld_significant" not in s  # "KL = 0" is no hypothesis: any change rejects it
    assert s["delta_nll_stderr"] == pytest.approx(blocked_stderr(shifted["dnll"]))
    means = shifted["dnll"].mean(axis=1)
    t = means.mean() / (means.std(ddof=1) / 4)
    assert s["delta_nll_p"] == pytest.approx(2 * stats.t.sf(abs(t), 15), rel=1e-9)
    assert summarize(shifted, 1e-300)["significant"] is False  # an absurdly strict level rejects nothing
    stopped = summarize(shifted, 0.05, stopped_early=True)  # the same windows, chosen by a stopping rule
    assert stopped["significant"] is False and math.isnan(stopped["delta_nll_p"])
    assert delta_nll_p(np.zeros(8)) == 1.0 and delta_nll_p(np.full(8, 1e-3)) == 0.0  # no spread: exact answers


def stopping_windows(rule: StopRule, window_means: np.ndarray) -> np.ndarray:
    """Windows each simulated point scores under `rule`: asked after every window but the last, as
    perplexity.score asks it."""
    n_points, n = window_means.shape
    stop = np.full(n_points, n)
    for k in range(1, n):
        newly = (stop == n) & rule.settled_means(window_means[:, :k])
        stop[newly] = k
    return stop


def flagged(window_means: np.ndarray, stop: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """The `significant` flag that summarize gives each simulated point, on the windows it scored."""
    return np.array([summarize({"dnll": m[:k, None]}, alpha, stopped_early=k < n)["significant"]
                     for m, k in zip(window_means, stop)])


def test_significant_keeps_its_level_under_early_stopping():
    """A zero effect, 3000 simulated points of 16 windows each: the flag's false-positive rate stays at alpha (within
    3 binomial standard errors) under every stopping rule -- the rule that waits for the sign (rtol=1), a rule that
    stops negligible points (atol), a rule driven by another metric, and none."""
    rng = np.random.default_rng(5)
    n_points, n, alpha = 3000, 16, 0.05
    means = rng.normal(0.0, 1e-3, (n_points, n))  # per-window mean ΔNLL of points without any effect
    se = math.sqrt(alpha * (1 - alpha) / n_points)

    sign = stopping_windows(StopRule("delta_nll", EarlyStop(min_windows=4, rtol=1.0)), means)
    assert (sign < n).mean() > 0.15  # the rule stops a zero effect often ...
    stopped_at = np.array([delta_nll_p(m[:k]) for m, k in zip(means, sign)])
    assert (stopped_at < alpha).mean() > alpha + 10 * se  # ... with its interval off 0: no test (about 19%)
    assert flagged(means, sign, n, alpha).mean() <= alpha + 3 * se

    negligible = stopping_windows(StopRule("delta_nll", EarlyStop(min_windows=4, rtol=1.0, atol=5e-4)), means)
    assert (negligible < n).mean() > 0.5
    assert flagged(means, negligible, n, alpha).mean() <= alpha + 3 * se

    # stopping on an independent quantity (KL) keeps exactly the full points' own level: alpha * P(full)
    kld = rng.gamma(4.0, 2.5e-4, (n_points, n))  # per-window mean KL: positive, mean 1e-3, sd 5e-4
    by_kld = stopping_windows(StopRule("kld_mean", EarlyStop(min_windows=4, rtol=0.25)), kld)
    full = (by_kld == n).mean()
    assert 0.2 < full < 0.8
    rate, expected = flagged(means, by_kld, n, alpha).mean(), alpha * full
    assert abs(rate - expected) <= 3 * math.sqrt(expected * (1 - expected) / n_points)

    rate = flagged(means, np.full(n_points, n), n, alpha).mean()  # no early stopping: the plain t-test's level
    assert abs(rate - alpha) <= 3 * se


def test_first_departure():
    base = Completion("p", (1, 2, 3), "abc")
    assert first_departure(Completion("p", (1, 2, 3), "abc"), base) is None
    assert first_departure(Completion("p", (1, 5, 3), "a?c"), base) == 1
    assert first_departure(Completion("p", (1, 2), "ab"), base) == 2


def test_generation_is_recorded_on_the_tiny_model(tiny_model, wikitext, cache_dir):
    ref = open_reference(make_settings(tiny_model, wikitext, 64, 2, "f32", cache_dir))
    target = resolve("activation", "ffn_norm", 0, ref.info, ref.backend.nodes)
    zero = run_point(ref, target, make_format("zero"), progress=False, prompts=("Hello",), max_new_tokens=8)
    same = run_point(ref, target, make_format("none"), progress=False, prompts=("Hello",), max_new_tokens=8)
    assert same.generation["gen_departed"] == 0 and same.generation["gen_first_departure"] is None
    assert zero.generation["gen_departed"] == 1 and zero.generation["gen_first_departure"] == 0
    assert math.isfinite(record(ref, target, make_format("zero"), zero)["kld_mean"])


@pytest.mark.parametrize("offset", [0.0, 100.0, -60.0])
def test_window_math_is_exact_in_float64_terms_on_one_or_two_threads(offset):
    """KL from logit differences, for tiny divergences and for a token the baseline gives no probability at all
    (p underflows to 0 in float32, so the run's mass there must come from the log-sum-exps). Logits around 0 take
    the exponentials unshifted, logits far above or below 0 (offset) shifted by the row's max or lse."""
    rng = np.random.default_rng(1)
    y = (rng.normal(size=(37, 1000)) * 4 + offset).astype(np.float32)
    y[:, 7] = -300.0 + offset
    z = y + (rng.normal(size=y.shape) * 1e-3).astype(np.float32)
    z[:5, 7] = 50.0 + offset  # the run makes token 7 by far the most likely in five rows
    targets = rng.integers(0, 1000, 37)
    lp_y = y - logsumexp(y.astype(np.float64), axis=1, keepdims=True)
    lp_z = z - logsumexp(z.astype(np.float64), axis=1, keepdims=True)
    exact_kld = (np.exp(lp_y) * (lp_y - lp_z)).sum(axis=1)
    exact_nll = -lp_z[np.arange(37), targets]
    lse_y = logsumexp(y.astype(np.float64), axis=1)
    base_nll = -lp_y[np.arange(37), targets]
    baseline = BaselineWindow(y, lse_y, base_nll)
    with WindowMath(1) as one_thread, WindowMath(2) as two_threads:
        one, two = (m(z.copy(), targets, None, baseline) for m in (one_thread, two_threads))
        unpaired = two_threads(z.copy(), targets)
    for key in ("kld", "nll", "lse", "argmax"):
        np.testing.assert_array_equal(one[key], two[key])
    assert exact_kld[:5].min() > 1 and exact_kld[5:].max() < 1e-5  # both regimes are present
    np.testing.assert_allclose(one["kld"], exact_kld, rtol=1e-3, atol=1e-9)
    np.testing.assert_allclose(one["nll"], exact_nll, rtol=1e-6)
    np.testing.assert_allclose(unpaired["nll"], exact_nll, rtol=1e-6)  # no reference
    assert (one["argmax"][:5] == 7).all()


def test_early_stop_rule_settles_clear_effects_and_negligible_ones_but_not_noise():
    rng = np.random.default_rng(2)
    clear = {"dnll": rng.normal(0.05, 0.01, (16, 255))}
    noise = {"dnll": rng.normal(0, 1e-3, (16, 255))}
    rule = StopRule("delta_nll", EarlyStop(min_windows=4, rtol=0.5))
    assert not rule.settled({"dnll": clear["dnll"][:3]})  # never before min_windows
    assert rule.settled({"dnll": clear["dnll"][:4]})
    assert not any(rule.settled({"dnll": noise["dnll"][:k]}) for k in range(2, 17))  # a mean near 0 is never known
    # ... to 50% of itself, but it is confidently below 1e-3
    assert StopRule("delta_nll", EarlyStop(atol=1e-3)).settled(noise)
    disagree = {"top1": (rng.random((16, 255)) > 0.2).astype(float)}  # the rule watches 1 - agreement
    assert StopRule("top1_agree", EarlyStop(rtol=0.5)).settled(disagree)
    # one window has no interval
    assert not StopRule("top1_agree", EarlyStop(rtol=0.5)).settled({"top1": disagree["top1"][:1]})
    assert StopRule("kld_p99").key()["per_token"] == "kld"
    assert StopRule("delta_ppl").key() == StopRule("delta_nll").key()


def test_an_early_stopped_point_is_the_full_point_cut_short_and_paired(tiny_model, wikitext, cache_dir):
    ref = open_reference(make_settings(tiny_model, wikitext, 64, 8, "f32", cache_dir))
    target = resolve("activation", "l_out", 1, ref.info, ref.backend.nodes)
    full = run_point(ref, target, make_format("int4"), progress=False)
    stopped = run_point(ref, target, make_format("int4"), progress=False,
                        stop=StopRule("delta_nll", EarlyStop(min_windows=3, rtol=1.0)))
    k = stopped.score.n_windows
    assert stopped.score.stopped_early and 3 <= k < 8 and not full.score.stopped_early
    np.testing.assert_array_equal(stopped.score.nll, full.score.nll[:k])
    np.testing.assert_array_equal(stopped.score.kld, full.score.kld[:k])
    np.testing.assert_array_equal(stopped.baseline.nll, full.baseline.nll[:k])  # paired with the same windows
    rec = record(ref, target, make_format("int4"), stopped)
    assert rec["n_windows"] == k and rec["stopped_early"]
    assert rec["significant"] is False and math.isnan(rec["delta_nll_p"])  # stopped by a rule: untested


def test_q_values_are_benjamini_hochberg_over_the_tested_points_and_mark_the_ranking():
    """BH by hand: m = 5 tested points (four p-values and an early-stopped point, untested, counted as p = 1);
    sorted p = .008 .03 .04 .2 1 -> p * m / rank = .04 .075 .0667 .25 1 -> running minimum from the top:
    q = .04 .0667 .0667 .25 (1). Diverged and no-op points are no tests."""
    df = pd.DataFrame({
        "status": ["ok", "ok", "ok", "ok", "ok", "diverged", "no-op"],
        "delta_nll_p": [0.04, 0.008, 0.2, 0.03, math.nan, math.nan, 1.0],
        "stopped_early": [False, False, False, False, True, False, False],
    })
    df["significant"] = df["delta_nll_p"] < 0.05
    q = add_q_values(df.copy())["delta_nll_q"].to_numpy()
    np.testing.assert_allclose(q[:4], [1 / 15, 0.04, 0.25, 1 / 15], rtol=1e-12)
    assert np.isnan(q[4:]).all()
    # the ranking marks by q: p = .008 (q .04) gets a star; p = .03 and .04 are significant on their own but not
    # at a 5% false discovery rate
    df = add_q_values(df).assign(kind="activation", tensor="l_out", layers=[str(i) for i in range(7)], fmt="int8",
                                 ppl=10.0, baseline_ppl=10.0, delta_ppl=[4.0, 3.0, 2.0, 1.0, 0.5, math.inf, 0.0],
                                 delta_ppl_stderr=0.1, alpha=0.05, reason="x")
    lines = format_ranking(df, "delta_ppl").splitlines()
    assert "* ΔNLL q <= 0.05" in lines[0] and "over the 5 ok points" in lines[0]
    starred = [line.split()[3] for line in lines[1:7] if " * " in line]
    assert starred == ["L1"] and "untested" in next(line for line in lines if " L4 " in line)


def test_default_ranking_is_by_kl_with_delta_ppl_beside_and_says_when_nothing_is_resolved():
    """The default ranking orders by KL (resolved on a few windows) and shows ΔPPL ± its stderr beside each point; when
    no point's ΔNLL is distinguishable from zero its header says so; points without KL fall back to ΔPPL."""
    df = pd.DataFrame({"status": "ok", "kind": "weight", "tensor": "ffn_norm", "layers": ["0", "1", "2"],
                       "fmt": "bf16", "ppl": 10.0, "baseline_ppl": 10.0, "alpha": 0.05,
                       "delta_ppl": [0.03, -0.01, 0.02], "delta_ppl_stderr": 0.05, "delta_nll_p": [0.5, 0.7, 0.6],
                       "kld_mean": [1e-5, 3e-5, 2e-5], "kld_stderr": 1e-6, "top1_agree": 0.99})
    df = add_q_values(df)
    lines = format_ranking(df).splitlines()
    assert lines[0].startswith("most sensitive first by kld_mean (ΔPPL ± stderr beside)")
    assert "no point's ΔNLL is distinguishable from zero (every q > 0.05)" in lines[0]
    assert [line.split()[3] for line in lines[1:]] == ["L1", "L2", "L0"]  # by KL, not by ΔPPL
    assert "ΔPPL -0.01 ± 0.05" in lines[1]
    no_kl = format_ranking(df.drop(columns=["kld_mean", "kld_stderr", "top1_agree"])).splitlines()
    assert "by delta_ppl" in no_kl[0] and "no kld_mean in these points" in no_kl[0]
    assert [line.split()[3] for line in no_kl[1:]] == ["L0", "L2", "L1"]


def test_the_tail_percentile_is_numpys_on_the_same_per_token_kld():
    """kld_p999 (the validation tables' tail beside the mean): numpy's 99.9th percentile of the per-token KLD."""
    rng = np.random.default_rng(3)
    kld = rng.lognormal(-6, 2, size=(16, 255))
    tokens = {"kld": kld, "top1": rng.random((16, 255)) < 0.9}
    out = summarize(tokens, 0.05)
    assert out["kld_p999"] == np.percentile(kld, 99.9) and out["kld_p999"] > out["kld_p99"] > out["kld_mean"]
