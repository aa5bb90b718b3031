"""Weight points on the quantized tensors of the file as it is (model.container=native): the file's own kernel plus
(fmt(W) - W)·x added in F32 to every node that uses W (sweep/llama/weight_delta.py), with no model copy and one
baseline for the sweep."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
from conftest import make_settings

from sweep.llama import container
from sweep.llama.quantize import dequantized_weight
from sweep.pipeline.point import record, run_point
from sweep.pipeline.reference import open_reference
from sweep.quant.apply import applied
from sweep.quant.formats import make_format
from sweep.quant.targets import resolve
from sweep.store.records import Store

N_CTX = 64


@pytest.fixture(scope="module")
def native_ref(tiny_model, wikitext, cache_dir):
    with open_reference(make_settings(tiny_model, wikitext, N_CTX, 3, "native", cache_dir)) as ref:
        yield ref


def test_the_delta_is_exactly_what_the_matmul_adds(native_ref):
    """The ffn_down matmul's output (ffn_out-1) moves by ffn_swiglu-1 @ (fmt(W) - W).T, the block's input being
    the same; nothing upstream moves."""
    b, name = native_ref.backend, "blk.1.ffn_down.weight"
    assert not b.holds_f32(name) and b.consumers[name] == 1
    seen = {}

    def keep(node, x):
        seen[node] = x.copy()

    nodes = {("ffn_swiglu-1", 0), ("ffn_out-1", 0), ("l_out-0", 0)}
    tokens, mask = native_ref.windows.tokens[0], native_ref.windows.output_mask
    with b.observe_nodes(nodes, keep):
        b.decode_window(tokens, mask)
        before = dict(seen)
        fmt = make_format("int4")
        with applied(b, resolve("weight", "ffn_down", 1, native_ref.info), fmt) as proof:
            b.decode_window(tokens, mask)
        after = dict(seen)
        b.decode_window(tokens, mask)  # the delta is gone with the block
        again = dict(seen)
    w = dequantized_weight(b, name)
    delta = fmt(w, tensor=name) - w
    assert np.array_equal(before["l_out-0"], after["l_out-0"])
    assert np.array_equal(before["ffn_swiglu-1"], after["ffn_swiglu-1"])
    expected = before["ffn_swiglu-1"].astype(np.float64) @ delta.T.astype(np.float64)
    moved = after["ffn_out-1"].astype(np.float64) - before["ffn_out-1"]
    assert np.abs(expected).max() > 1e-3  # int4 of a Q4_1 tensor changes it
    np.testing.assert_allclose(moved, expected, atol=1e-5 * np.abs(expected).max() + 1e-6)
    assert np.array_equal(again["ffn_out-1"], before["ffn_out-1"])
    assert proof.delta_calls == 1 and proof.hook_calls == 1 and proof.n_changed > 0


def test_a_native_weight_point_writes_no_model_and_shares_the_sweeps_baseline(native_ref, tmp_path, monkeypatch):
    def no_copy(*a, **k):
        raise AssertionError("a model copy was written")

    monkeypatch.setattr(container, "tensors_to_f32", no_copy)
    monkeypatch.setattr(container, "write_gguf_copy", no_copy)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    store = Store(tmp_path / "store")
    points = [("weight", "ffn_down", 1, "int4"), ("weight", "attn_v", 0, "q4_K"), ("activation", "l_out", 1, "int8"),
              ("weight", "token_embd", None, "int4")]
    recs = []
    for kind, tensor, layer, fmt in points:
        target = resolve(kind, tensor, layer, native_ref.info, native_ref.backend.nodes)
        out = run_point(native_ref, target, make_format(fmt), progress=False, store=store)
        recs.append(record(native_ref, target, make_format(fmt), out))
    assert [r["status"] for r in recs] == ["ok"] * 4, [r["reason"] for r in recs]
    assert list(scratch.iterdir()) == []
    assert len(list((tmp_path / "store" / "baselines").glob("*.npz"))) == 1  # one baseline: the file as it is
    assert len({r["baseline_ppl"] for r in recs}) == 1
    n = recs[0]["n_windows"]
    # ffn_down and attn_v: one matmul each per decode; token_embd (tied): the lookup and the output matmul
    assert [r["delta_calls"] for r in recs] == [n, n, 0, 2 * n]
    assert all(r["kld_mean"] > 0 for r in recs)
    assert "kept in Q4_1 with (fmt(W) - W)·x added in F32" in recs[0]["baseline"]
    assert recs[0]["native_weights"] == "delta"


def test_delta_and_copy_measure_nearly_the_same_model(native_ref, tiny_model, wikitext, cache_dir):
    """The copy (the target dequantized to F32, rounded, in a second model) and the delta differ only by the file's
    kernel requantizing the input of W·x: far less than the perturbation itself."""
    target = resolve("weight", "ffn_down", 1, native_ref.info)
    fmt = make_format("int4")
    delta = run_point(native_ref, target, fmt, progress=False)
    with open_reference(make_settings(tiny_model, wikitext, N_CTX, 3, "native", cache_dir,
                                 "model.native_weights=copy")) as ref:
        copy = run_point(ref, target, fmt, progress=False)
    assert "dequantized to F32" in copy.container_note and copy.proof.delta_calls == 0
    gap = np.abs(delta.score.nll - copy.score.nll).mean()
    effect = np.abs(copy.score.nll - copy.baseline.nll).mean()
    assert effect > 0 and gap < 0.25 * effect, (gap, effect)


def test_recompute_mode_switches_the_delta_off_for_the_baseline_decodes(native_ref):
    target = resolve("weight", "ffn_down", 2, native_ref.info)
    stored = run_point(native_ref, target, make_format("int8"), progress=False)
    again = run_point(native_ref, target, make_format("int8"), progress=False, baseline_logits="recompute")
    assert np.array_equal(stored.score.nll, again.score.nll) and np.array_equal(stored.score.kld, again.score.kld)
    assert again.proof.delta_calls == stored.proof.delta_calls == again.score.n_windows


def test_an_expert_of_a_quantized_moe_stack_through_its_delta(tmp_path_factory, smollm2, wikitext, cache_dir):
    """MUL_MAT_ID: the rows routed to the targeted expert move by x @ (fmt(W_k) - W_k).T, every other row stays."""
    from sweep.testing.tiny_model import write_tiny_model

    model = write_tiny_model(tmp_path_factory.mktemp("moe") / "tiny-qwen3moe.gguf", smollm2, arch="qwen3moe")
    with open_reference(make_settings(model, wikitext, N_CTX, 3, "native", cache_dir)) as ref:
        b, target, fmt = ref.backend, resolve("weight", "ffn_down_exps", 1, ref.info, expert="1"), make_format("int4")
        name = target.names[0]
        assert not b.holds_f32(name)
        seen = {}
        with b.observe_nodes({("ffn_moe_swiglu-1", 0), ("ffn_moe_down-1", 0)},
                             lambda node, x: seen.__setitem__(node, x.copy())):
            tokens, mask = ref.windows.tokens[0], ref.windows.output_mask
            b.decode_window(tokens, mask)
            before = dict(seen)
            with applied(b, target, fmt) as proof:
                b.decode_window(tokens, mask)
        w = dequantized_weight(b, name)[1]
        delta = (fmt(w.copy(), tensor=name) - w).astype(np.float64)
        moved = (seen["ffn_moe_down-1"].astype(np.float64) - before["ffn_moe_down-1"]).reshape(-1, w.shape[0])
        x = before["ffn_moe_swiglu-1"].reshape(-1, w.shape[1]).astype(np.float64)
        routed = np.abs(moved).max(axis=1) > 0
        assert 0 < routed.sum() < len(routed)  # some rows went to expert 1, not all
        expected = x[routed] @ delta.T
        np.testing.assert_allclose(moved[routed], expected, atol=1e-5 * np.abs(expected).max())
        assert proof.delta_calls == 1
        out = run_point(ref, target, fmt, progress=False)
        assert out.status == "ok" and out.proof.delta_calls == out.score.n_windows
