"""Large vocabularies: the baseline recomputed alongside each point equals the stored one; stored logits are read
without mapping them; the generation check of only the worst points after the sweep."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_settings
from scipy.special import logsumexp

from sweep.errors import SweepError
from sweep.pipeline.grid import plan
from sweep.pipeline.point import record, run_point
from sweep.pipeline.reference import open_reference
from sweep.quant.formats import make_format
from sweep.quant.targets import resolve
from sweep.scoring.generation import generation_mode
from sweep.scoring.window_math import BaselineWindow, StoredLogits, WindowMath
from sweep.store.records import Store

ROOT = Path(__file__).resolve().parents[1]
PAIRED = ("kld_mean", "kld_p99", "top1_agree", "delta_nll", "delta_nll_stderr", "ppl", "baseline_ppl")


@pytest.mark.parametrize("kind, tensor, layer, fmt", [("weight", "ffn_down", 1, "int4"),
                                                      ("activation", "l_out", 0, "fp8_e4m3")])
def test_recomputed_baseline_gives_the_stored_modes_numbers_bit_for_bit(kind, tensor, layer, fmt, tiny_model,
                                                                        wikitext, cache_dir, tmp_path):
    ref = open_reference(make_settings(tiny_model, wikitext, 64, 4, "f32", cache_dir))
    target = resolve(kind, tensor, layer, ref.info, ref.backend.nodes)
    stored = run_point(ref, target, make_format(fmt), progress=False, store=Store(tmp_path))
    weights_before = {n: ref.backend.read_weight(n) for n in target.names} if kind == "weight" else {}
    again = run_point(ref, target, make_format(fmt), progress=False, baseline_logits="recompute")
    for name, w in weights_before.items():  # the per-window switching restored the model exactly
        np.testing.assert_array_equal(ref.backend.read_weight(name), w)
    assert stored.baseline.logits is not None and again.baseline.logits is None  # nothing kept beyond a window
    for field in ("nll", "kld", "argmax"):
        np.testing.assert_array_equal(getattr(again.score, field), getattr(stored.score, field))
    for field in ("nll", "argmax"):
        np.testing.assert_array_equal(getattr(again.baseline, field), getattr(stored.baseline, field))
    assert again.proof.hook_calls == stored.proof.hook_calls and again.proof.n_changed == stored.proof.n_changed
    a, b = record(ref, target, make_format(fmt), again), record(ref, target, make_format(fmt), stored)
    assert a["kld_mean"] > 0 and all(a[k] == b[k] for k in PAIRED)
    assert (a["baseline_logits"], b["baseline_logits"]) == ("recompute", "store")
    assert not (tmp_path / "baselines").exists() or \
        len(list((tmp_path / "baselines").glob("*.logits.npy"))) == 1  # recompute wrote no logits


def test_stored_logits_are_read_as_the_file_holds_them(tmp_path):
    data = np.random.default_rng(0).standard_normal((3, 5, 7)).astype(np.float32)
    np.save(tmp_path / "x.npy", data)
    stored = StoredLogits(np.load(tmp_path / "x.npy", mmap_mode="r"))
    buf = np.empty((4, 7), np.float32)
    stored.will_need(2)  # a hint to the kernel: changes nothing read
    np.testing.assert_array_equal(stored[2].read(slice(1, 4), buf), data[2, 1:4])
    (tmp_path / "x.npy").write_bytes((tmp_path / "x.npy").read_bytes()[:-8])  # a truncated file is one clear error
    with pytest.raises(SweepError, match="truncated"):
        stored[2].read(slice(3, 5), buf)


@pytest.mark.parametrize("n_vocab", [5000, 140_000])  # chunks of coarse and fine rows together; one row a chunk
def test_coarse_rows_take_the_two_log_sum_exps_in_float64_bit_for_bit(n_vocab):
    """Rows where the run makes a token likely that the baseline gave no probability (or non-finite ones) take
    log Z = lse(z) - lse(y) in float64; computed in reused per-thread rows, the numbers are the formula's exactly."""
    rng = np.random.default_rng(3)
    y = (rng.normal(size=(9, n_vocab)) * 3).astype(np.float32)
    y[:, 11] = -300.0
    z = y + (rng.normal(size=y.shape) * 1e-3).astype(np.float32)
    z[::2, 11] = 45.0  # rows 0, 2, 4, 6, 8: coarse; the others are not
    targets = rng.integers(0, n_vocab, 9)
    y_lse = logsumexp(y.astype(np.float64), axis=1)
    with WindowMath(2) as math:
        got = math(z, targets, None, BaselineWindow(y, y_lse, np.zeros(9)))
    zc = z[::2].astype(np.float64)
    top = zc.max(axis=1)
    np.testing.assert_array_equal(got["lse"][::2], y_lse[::2] + (top + np.log(np.exp(zc - top[:, None]).sum(axis=1))
                                                                - y_lse[::2]))
    assert (got["argmax"][::2] == 11).all() and np.isfinite(got["kld"]).all()


@pytest.mark.parametrize("value, n", [(True, None), (False, 0), ("top:3", 3), ("TOP:1", 1), ("true", None)])
def test_generation_mode(value, n):
    assert generation_mode(value) == n


@pytest.mark.parametrize("override, message", [("metrics.generate=top:0", "top:N"),
                                               ("metrics.generate=sometimes", "top:N"),
                                               ("metrics.baseline_logits=disk", "store, recompute")])
def test_bad_generation_or_baseline_mode_is_one_line_before_any_job(override, message, tiny_model, wikitext):
    with pytest.raises(SweepError, match=message) as e:
        plan([f"model.path={tiny_model}", f"data.path={wikitext}", "layer=0", override])
    assert "\n" not in str(e.value)


def test_generation_check_of_the_worst_points_only_after_the_sweep(tiny_model, wikitext, env, tmp_path):
    args = [f"model.path={tiny_model}", "data.n_ctx=64", "data.n_windows=2", "run.progress=false",
            f"run.store={tmp_path / 'store'}", f"hydra.sweep.dir={tmp_path / 'sweep'}", "layer=0,1,2",
            "kind=activation", "tensor=l_out", "fmt=int4,bf16", "metrics.generate=top:2", "metrics.max_new_tokens=4",
            "metrics.baseline_logits=recompute", "metrics.rank_by=kld_mean"]
    proc = subprocess.run([sys.executable, "-m", "sweep", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the check ran on the model the jobs had loaded, still open in this process: one load, never a second copy
    # (the jobs log to stderr, the end-of-sweep callback through Hydra's own logging to stdout)
    assert (proc.stdout + proc.stderr).count("loading ") == 1, proc.stdout[-3000:]
    df = pd.read_parquet(tmp_path / "sweep" / "results.parquet")
    assert len(df) == 6 and (df["baseline_logits"] == "recompute").all()
    checked = df[df["generation_checked"].notna()]
    worst = df.sort_values("kld_mean", ascending=False).head(2)
    assert set(checked["key"]) == set(worst["key"])  # exactly the two that rank worst
    for gens in checked["generations"]:
        assert len(json.loads(gens)) == 2  # both default prompts, compared with the baseline's completions
    records = [json.loads(p.read_text()) for p in (tmp_path / "sweep").rglob("record.json")]
    assert sum("generations" in r for r in records) == 2  # the job records carry it too
    assert not list((tmp_path / "store" / "baselines").glob("*.logits.npy"))  # recompute: no logits on disk
