"""Trust on every machine: plain weight buffers, exactly one rounding per targeted node, no hidden no-ops, and store
keys that never pair a run with a baseline computed by other kernels."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_settings
from gguf import GGUFReader

from sweep.errors import SweepError
from sweep.llama.backend import PROBE_TOKENS, Backend
from sweep.llama.container import compute_settings, runtime_identity
from sweep.pipeline import point as run_module
from sweep.pipeline.point import baseline_score, run_point
from sweep.pipeline.reference import open_reference
from sweep.quant.formats import make_format
from sweep.quant.targets import Target, advertised_nodes, resolve
from sweep.store.records import Store

N_CTX = 64


@pytest.fixture
def f32_cfg(tiny_model, wikitext, cache_dir):
    return make_settings(tiny_model, wikitext, N_CTX, 2, "f32", cache_dir)


@pytest.fixture
def f32_ref(f32_cfg):
    with open_reference(f32_cfg) as ref:
        yield ref


# ---- 1. plain buffers: no repacking, every weight readable ---------------------------------------------------------

@pytest.mark.real_model
def test_native_model_uses_plain_buffers_and_every_weight_reads_back_as_in_the_file(smollm2):
    """Where llama.cpp repacks weights (AMX, AArch64 repacks) this crashes or reads other bytes than the file's."""
    with Backend(smollm2, 32, 2, settings=compute_settings("native")) as b:
        assert b.model_params.use_extra_bufts is False
        reader = GGUFReader(smollm2)
        assert set(b._weights) == {t.name for t in reader.tensors}  # every tensor is reached from the graph
        for t in reader.tensors:
            assert b.read_weight_bytes(t.name) == t.data.tobytes(), t.name


READ_BACK = """
import sys
from gguf import GGUFReader
from sweep.llama.backend import Backend
from sweep.llama.container import compute_settings
with Backend(sys.argv[1], 32, 2, settings=compute_settings("native")) as b:
    assert b.model_params.use_extra_bufts is False
    for t in GGUFReader(sys.argv[1]).tensors:
        assert b.read_weight_bytes(t.name) == t.data.tobytes(), t.name
print("read back", len(b._weights))
"""


def test_q4_0_weights_are_not_repacked_on_this_cpu(tmp_path, smollm2):
    """x86 CPUs repack Q4_0 matmul weights when allowed; reading a repacked weight back segfaults (#11115). In a
    subprocess, so that a crash is a failed test and not a dead test session."""
    import subprocess
    import sys

    from sweep.testing.tiny_model import Q, write_tiny_model

    path = write_tiny_model(tmp_path / "q4_0.gguf", smollm2, matmul_type=Q.Q4_0)
    proc = subprocess.run([sys.executable, "-c", READ_BACK, str(path)], capture_output=True, text=True, timeout=120)
    n_tensors = len(GGUFReader(path).tensors)
    assert proc.returncode == 0 and f"read back {n_tensors}" in proc.stdout, (proc.returncode, proc.stderr[-500:])


# ---- 2. one rounding per targeted node ------------------------------------------------------------------------------

def test_probe_records_every_occurrence_with_op_shape_and_views(f32_ref):
    nodes = f32_ref.backend.nodes
    qcur = nodes["Qcur-0"]
    assert [(o.op, o.view) for o in qcur] == [("mul_mat", False), ("reshape", True), ("rope", False)]
    assert qcur[2].shape == (PROBE_TOKENS, 4, 16)  # tokens x heads x head size (tiny model: 4 heads of 16)
    assert [o.op for o in nodes["norm-0"]] == ["rms_norm", "rms_norm"]  # attention's and the FFN's


def test_a_name_shared_by_computed_nodes_must_be_picked(f32_ref):
    info, nodes = f32_ref.info, f32_ref.backend.nodes
    with pytest.raises(SweepError, match=r"2 computed graph nodes are named 'Qcur-0' .*Qcur@mul_mat: mul_mat.*"
                                         r"Qcur@rope: rope.*pick one with tensor=Qcur@mul_mat"):
        resolve("activation", "Qcur", 0, info, nodes)
    with pytest.raises(SweepError, match=r"norm@0: rms_norm.*norm@1: rms_norm"):
        resolve("activation", "norm", 0, info, nodes)
    rope = resolve("activation", "Qcur@rope", [0, 1], info, nodes)
    assert rope.occurrences == (2, 2) and rope.token_rows
    assert resolve("activation", "norm@1", 0, info, nodes).occurrences == (1,)
    assert resolve("activation", "Vcur", 0, info, nodes).occurrences == (0,)  # its view is never a target
    with pytest.raises(SweepError, match=r"Qcur@softmax matches 0 computed node"):
        resolve("activation", "Qcur@softmax", 0, info, nodes)


def test_every_advertised_node_is_rounded_once_per_window(f32_ref):
    """One point per per-layer node of the graph: hook calls = windows x nodes, and never a failed point."""
    seen = []
    for spec, _occurrence in advertised_nodes(f32_ref.backend.nodes):
        target = resolve("activation", spec, [0, 2], f32_ref.info, f32_ref.backend.nodes)
        fmt = make_format("int8", granularity="per_token" if target.token_rows else "per_tensor")
        out = run_point(f32_ref, target, fmt, progress=False)
        assert out.status in ("ok", "no-op"), (spec, out.reason)
        assert out.proof.hook_calls == f32_ref.windows.n_windows * 2, spec
        seen.append(spec)
    assert {"attn_norm", "Qcur@mul_mat", "Qcur@rope", "Vcur", "kqv_out", "ffn_out", "l_out", "norm@0"} <= set(seen)


def test_a_point_whose_hook_ran_a_wrong_number_of_times_fails_with_that_reason(f32_ref):
    # the same node named twice: it is rounded once per window, not twice
    target = Target("activation", "ffn_norm", (0, 0), ("ffn_norm-0", "ffn_norm-0"), (0, 0))
    out = run_point(f32_ref, target, make_format("int8"), progress=False)
    assert out.status == "failed"
    assert out.reason == "the format was applied 2 times, expected 4 (2 node(s) x 2 window(s))"


def test_per_token_means_one_row_per_token_on_3d_nodes(f32_ref):
    target = resolve("activation", "Qcur@rope", 1, f32_ref.info, f32_ref.backend.nodes)
    fmt = make_format("int8", granularity="per_token")
    with f32_ref.backend.reading_back() as seen:
        run_point(f32_ref, target, fmt, progress=False)
    for _, computed, _written, read_back in seen:
        assert computed.ndim == 3
        rows = computed.reshape(computed.shape[0], -1)
        np.testing.assert_array_equal(read_back, fmt(rows).reshape(computed.shape))
        # one scale per token over every head: the largest |value| of each token row is on the grid's end
        assert np.allclose(np.abs(read_back.reshape(len(rows), -1)).max(axis=1), np.abs(rows).max(axis=1))
        assert not np.array_equal(read_back, fmt(computed))  # per (token, head) would differ


# ---- 3. changed values, unchanged output: a no-op -------------------------------------------------------------------

def test_vcur_fp16_is_absorbed_by_the_native_f16_cache(tiny_model, wikitext, cache_dir):
    ref = open_reference(make_settings(tiny_model, wikitext, N_CTX, 2, "native", cache_dir))
    assert ref.backend.settings.kv_type == "f16"
    target = resolve("activation", "Vcur", 1, ref.info, ref.backend.nodes)
    out = run_point(ref, target, make_format("fp16"), progress=False)
    assert out.proof.n_changed > 0 and out.proof.hook_calls == 2
    assert out.status == "no-op" and out.reason.startswith("absorbed downstream")


@pytest.mark.parametrize("node", ["Vcur", "Kcur@rope"])
def test_kv_perturbations_show_their_effect_in_the_f32_container(f32_ref, node):
    assert (f32_ref.backend.settings.kv_type, f32_ref.backend.settings.flash_attn) == ("f32", "off")
    target = resolve("activation", node, 1, f32_ref.info, f32_ref.backend.nodes)
    out = run_point(f32_ref, target, make_format("fp16"), progress=False)
    assert out.status == "ok" and out.score.kld.mean() > 0


# ---- 4. store keys carry the kernels ---------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("system_info", "CPU : AMX_INT8 = 1 |"), ("kv_type", "f16"),
                                          ("flash_attn", "on"), ("n_gpu_layers", -1),
                                          ("llama_cpp_python", "9.9.9"), ("sweep_version", "9.9")])
def test_a_baseline_computed_by_other_kernels_is_never_reused(field, value, f32_ref, f32_cfg, tmp_path,
                                                               monkeypatch):
    store = Store(tmp_path)
    first = baseline_score(f32_ref.backend, f32_ref, False, store)
    assert len(list((tmp_path / "baselines").glob("*.npz"))) == 1
    with open_reference(f32_cfg) as again:  # another session: nothing in memory, the store serves it
        assert baseline_score(again.backend, again, False, store).logits.filename == first.logits.filename
    identity = runtime_identity(f32_ref.backend.settings)
    assert field in identity and identity[field] != value
    monkeypatch.setattr(run_module, "runtime_identity", lambda settings: {**identity, field: value})
    baseline_score(f32_ref.backend, f32_ref, False, store)
    assert len(list((tmp_path / "baselines").glob("*.npz"))) == 2  # a miss: computed and stored apart
