"""Fake quantization applies exactly what it names, provably, and leaves the user's file alone."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from conftest import make_settings

from sweep.errors import SweepError
from sweep.llama.backend import Backend
from sweep.llama.container import compute_settings, f32_container, write_gguf_copy
from sweep.llama.model_file import model_info, sha256
from sweep.pipeline.point import record, run_point
from sweep.pipeline.reference import open_reference
from sweep.quant.formats import make_format
from sweep.quant.targets import resolve
from sweep.scoring.perplexity import score

N_CTX = 64


@pytest.fixture(scope="module")
def tiny_ref(tiny_model, wikitext, cache_dir):
    with open_reference(make_settings(tiny_model, wikitext, N_CTX, 4, "f32", cache_dir)) as ref:
        yield ref


def rewritten_copy_nll(container, names, fmt, windows, dst, baseline):
    """The independent check: the same rounding done by rewriting a GGUF copy, then scoring that file against the
    same baseline (the same arithmetic: equal NLLs then mean equal logits)."""
    write_gguf_copy(container, dst, to_f32=lambda n, t: n in names, transform=lambda n, d: fmt(d))
    with Backend(dst, windows.n_ctx, 2, settings=compute_settings("f32")) as b:
        return score(b, windows, progress=False, reference=baseline).nll


@pytest.mark.parametrize("tensor, layer, fmt", [
    ("ffn_down", 1, make_format("bf16")),
    ("attn_q", [0, 2], make_format("int8", granularity="per_tensor")),
    ("ffn_gate", "all", make_format("int4", group_size=32)),
    ("attn_norm", 0, make_format("fp8_e4m3")),
    ("token_embd", None, make_format("mxfp4")),
])
def test_weight_runs_equal_a_rewritten_gguf_copy(tiny_ref, tensor, layer, fmt, tmp_path):
    target = resolve("weight", tensor, layer, tiny_ref.info)
    out = run_point(tiny_ref, target, fmt, progress=False)
    assert out.status == "ok" and out.proof.n_changed > 0
    expected = rewritten_copy_nll(tiny_ref.backend.path, set(target.names), fmt, tiny_ref.windows,
                                  tmp_path / "rounded.gguf", out.baseline)
    np.testing.assert_array_equal(out.score.nll, expected)
    assert not np.array_equal(out.score.nll, out.baseline.nll)


def test_weights_are_restored_after_a_run(tiny_ref):
    before = score(tiny_ref.backend, tiny_ref.windows, progress=False).nll
    run_point(tiny_ref, resolve("weight", "ffn_up", "all", tiny_ref.info), make_format("zero"), progress=False)
    after = score(tiny_ref.backend, tiny_ref.windows, progress=False).nll
    np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("node, fmt, last_rows", [
    # in the last block llama.cpp computes only the rows that produce logits, after attention
    ("ffn_norm", make_format("int8", granularity="per_token"), N_CTX // 2 - 1),
    ("l_out", make_format("fp8_e5m2", scaled=True), N_CTX // 2 - 1),
    ("attn_norm", make_format("bf16"), N_CTX),
])
def test_activation_is_read_back_equal_to_the_format_of_what_llama_computed(tiny_ref, node, fmt, last_rows):
    target = resolve("activation", node, [0, 2], tiny_ref.info, tiny_ref.backend.nodes)
    with tiny_ref.backend.reading_back() as seen:
        out = run_point(tiny_ref, target, fmt, progress=False)
    assert out.status == "ok"
    assert len(seen) == out.proof.hook_calls == tiny_ref.windows.n_windows * len(target.names)
    assert {name for name, *_ in seen} == set(target.names)
    for _name, computed, written, read_back in seen:
        np.testing.assert_array_equal(read_back, fmt(computed))
        np.testing.assert_array_equal(read_back, written)
    assert {c.shape[0] for name, c, *_ in seen if name.endswith("-2")} == {last_rows}
    assert not np.array_equal(out.score.nll, out.baseline.nll)


def test_no_op_is_reported_with_its_reason(tiny_ref):
    out = run_point(tiny_ref, resolve("weight", "ffn_norm", 1, tiny_ref.info), make_format("none"), progress=False)
    assert out.status == "no-op"
    assert "already exactly representable in none" in out.reason
    rec = record(tiny_ref, resolve("weight", "ffn_norm", 1, tiny_ref.info), make_format("none"), out)
    assert rec["frac_changed"] == 0 and rec["status"] == "no-op"


def test_native_copy_mode_uses_a_matched_baseline(tiny_model, wikitext, cache_dir):
    ref = open_reference(make_settings(tiny_model, wikitext, N_CTX, 3, "native", cache_dir,
                                       "model.native_weights=copy"))
    target = resolve("weight", "ffn_down", 1, ref.info)
    assert ref.info.tensor_types["blk.1.ffn_down.weight"] == "Q4_1"
    out = run_point(ref, target, make_format("bf16"), progress=False)
    assert "dequantized to F32" in out.container_note
    native = score(ref.backend, ref.windows, progress=False)
    assert not np.array_equal(out.baseline.nll, native.nll)  # the matched baseline is not the quantized model


def test_user_model_file_is_never_written(tiny_model, wikitext, cache_dir):
    digest = sha256(tiny_model)
    st = tiny_model.stat()
    for container in ("native", "f32"):
        ref = open_reference(make_settings(tiny_model, wikitext, N_CTX, 2, container, cache_dir))
        for kind, tensor in [("weight", "ffn_norm"), ("weight", "ffn_down"), ("activation", "ffn_out")]:
            target = resolve(kind, tensor, "all", ref.info, ref.backend.nodes)
            run_point(ref, target, make_format("int8"), progress=False)
    assert hashlib.sha256(tiny_model.read_bytes()).hexdigest() == digest
    assert tiny_model.stat().st_mtime == st.st_mtime


def test_unknown_targets_fail_listing_the_valid_ones(tiny_ref):
    info, nodes = tiny_ref.info, tiny_ref.backend.nodes
    with pytest.raises(SweepError, match=r"graph has no node 'ffn_nrom-0'.*per-layer nodes: .*ffn_norm"):
        resolve("activation", "ffn_nrom", 0, info, nodes)
    with pytest.raises(SweepError, match=r"unknown weight tensor 'ffn_nrom'.*block tensors: .*ffn_norm"):
        resolve("weight", "ffn_nrom", 0, info)
    with pytest.raises(SweepError, match=r"ties its output layer to token_embd"):
        resolve("weight", "output", None, info)
    with pytest.raises(SweepError, match=r"layer 40 is out of range: the model has 3 blocks \(layers 0..2\)"):
        resolve("weight", "ffn_norm", 40, info)
    with pytest.raises(SweepError, match=r"unknown kind='weights'; valid: weight, activation"):
        resolve("weights", "ffn_norm", 0, info)


def test_f32_container_is_cached_and_exact(tiny_model, cache_dir):
    path = f32_container(tiny_model, cache_dir)
    assert path.name == f"{sha256(tiny_model)}.f32.gguf"
    mtime = path.stat().st_mtime
    assert f32_container(tiny_model, cache_dir) == path and path.stat().st_mtime == mtime
    assert set(model_info(path).tensor_types.values()) == {"F32"}


# --- the seeds' experiments and the liveness check, on the real model and text ----------------------------------

@pytest.fixture(scope="module")
def real_ref(wikitext, cache_dir):
    with open_reference(make_settings(None, wikitext, 512, 2, "f32", cache_dir)) as ref:
        yield ref


@pytest.mark.real_model
@pytest.mark.slow
def test_seed_weight_ffn_norm_bf16_is_a_no_op(real_ref):
    out = run_point(real_ref, resolve("weight", "ffn_norm", 0, real_ref.info), make_format("bf16"), progress=False)
    assert out.status == "no-op" and out.proof.n_elements == 576
    assert "already exactly representable in bf16" in out.reason


@pytest.mark.real_model
@pytest.mark.slow
def test_seed_activation_ffn_norm_bf16_last_layer_is_applied(real_ref):
    last = real_ref.info.n_layers - 1
    target = resolve("activation", "ffn_norm", last, real_ref.info, real_ref.backend.nodes)
    out = run_point(real_ref, target, make_format("bf16"), progress=False)
    assert out.status == "ok" and out.proof.frac_changed > 0.9
    assert out.proof.hook_calls == 2 and out.proof.n_elements == 2 * 255 * 576
    assert out.score.ppl != out.baseline.ppl


@pytest.mark.real_model
@pytest.mark.slow
def test_zeroing_an_early_activation_destroys_perplexity(real_ref):
    target = resolve("activation", "ffn_norm", 0, real_ref.info, real_ref.backend.nodes)
    out = run_point(real_ref, target, make_format("zero"), progress=False)
    assert out.baseline.ppl < 50 and out.score.ppl > 1e4


@pytest.mark.real_model
@pytest.mark.slow
def test_real_weight_run_equals_rewritten_copy(real_ref, tmp_path):
    fmt = make_format("bf16")
    target = resolve("weight", "ffn_down", 5, real_ref.info)
    out = run_point(real_ref, target, fmt, progress=False)
    expected = rewritten_copy_nll(real_ref.backend.path, set(target.names), fmt, real_ref.windows,
                                  tmp_path / "rounded.gguf", out.baseline)
    np.testing.assert_array_equal(out.score.nll, expected)

