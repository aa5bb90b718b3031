"""GGUF quant types as weight formats: bit-exact to llama.cpp's own quantizer, for every offered type.

The reference is llama.cpp's `llama_model_quantize` (what llama-quantize runs) on an all-F32 tiny model, with one
type override for the target tensors and every other tensor kept F32; the tensor is read back from the written
GGUF with gguf's reader. The fake-quant side is the sweep's own path: the weight read from the loaded model,
rounded by the format, written into the model and read back from it.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from llama_cpp._ggml import libggml

from sweep.errors import SweepError
from sweep.llama import ggml_tensor, gguf_reader
from sweep.llama import quantize as be
from sweep.llama.backend import Backend
from sweep.llama.container import compute_settings
from sweep.quant import ggml_types
from sweep.quant.apply import applied
from sweep.quant.formats import FORMATS, make_format
from sweep.quant.imatrix_file import Imatrix, load, write_gguf
from sweep.quant.targets import Target
from sweep.testing.tiny_model import write_tiny_model

# Rows of 256 (ffn_gate: n_embd) suit every block; rows of 384 (ffn_down: n_ff) are no multiple of 256, so every
# 256-block type takes llama.cpp's fallback there.
N_EMBD, N_FF = 256, 384
TENSORS = ("blk.1.ffn_gate.weight", "blk.1.ffn_down.weight")


@pytest.fixture(scope="module")
def f32_model(tmp_path_factory, smollm2):
    return write_tiny_model(tmp_path_factory.mktemp("ggml") / "tiny-f32.gguf", smollm2, n_embd=N_EMBD, n_ff=N_FF,
                            matmul_type=GGMLQuantizationType.F32, embd_type=GGMLQuantizationType.Q8_0)


@pytest.fixture(scope="module")
def loaded(f32_model):
    with Backend(f32_model, 32, 2, writable_weights=True, settings=compute_settings("f32")) as b:
        yield b


@pytest.fixture(scope="module")
def importance(tmp_path_factory):
    """An imatrix file (GGUF form) with positive, uneven importance per column, and its values."""
    rng = np.random.default_rng(7)
    im = Imatrix(chunk_count=3, chunk_size=512, datasets=["test"])
    for name, n in zip(TENSORS, (N_EMBD, N_FF)):
        im.sums[name] = (rng.gamma(0.5, 2.0, size=(1, n)) * 1536).astype(np.float32)
        im.counts[name] = np.array([1536], dtype=np.int64)
    path = write_gguf(tmp_path_factory.mktemp("imatrix") / "im.gguf", im)
    return path, load(path)


def llama_cpp_quantized(src, dst, type_name: str, imatrix: dict | None) -> dict[str, tuple[str, np.ndarray]]:
    """llama.cpp's quantizer with TENSORS overridden to `type_name`, the rest kept as they are (token_embd stays
    Q8_0: same type, copied; everything else F32); tensors read back."""
    type_id = ggml_types.TYPES[type_name].type_id
    be.llama_quantize_file(src, dst, [(r"^token_embd\.weight$", 8), (r"^blk\.1\.ffn_(gate|down)\.weight$", type_id),
                                      (".*", 0)], imatrix=imatrix, n_threads=2)
    out = {}
    for name in TENSORS:  # ggml's own gguf reader: gguf-py 0.19 does not know q1_0, q2_0 (types 41, 42)
        stored, shape, raw = gguf_reader.read_gguf_tensor(dst, name)
        out[name] = (be.ggml_type_facts(stored)["name"], raw, be.ggml_dequantize(raw, stored, shape))
    # gguf-py's reader sees the same bytes (checked on two types only: it parses the 49k-token vocabulary slowly)
    checked = (type_name, imatrix) == ("q4_K", None)
    known = {t.name: t for t in GGUFReader(dst).tensors if t.name in TENSORS} if checked else {}
    for name, t in known.items():
        assert np.array_equal(np.frombuffer(t.data.tobytes(), dtype=np.uint8), out[name][1])
    return out


def test_type_table_matches_libggml():
    for t in ggml_types.TYPES.values():
        facts = be.ggml_type_facts(t.type_id)
        assert facts["name"] == ggml_types.GGML_NAME[t.name]
        assert (facts["block_size"], facts["type_size"], facts["is_quantized"]) == (t.block_size, t.type_size, True)
        assert facts["has_to_float"]
        assert not facts["ggml_requires_imatrix"] or t.needs_imatrix  # ggml's own list is a subset of llama.cpp's
    libggml.ggml_op_name.restype = ctypes.c_char_p
    libggml.ggml_op_name.argtypes = [ctypes.c_int]
    assert libggml.ggml_op_name(ggml_tensor.GGML_OP_MUL_MAT) == b"MUL_MAT"
    assert libggml.ggml_op_name(ggml_tensor.GGML_OP_MUL_MAT_ID) == b"MUL_MAT_ID"
    assert libggml.ggml_op_name(ggml_tensor.GGML_OP_GET_ROWS) == b"GET_ROWS"


@pytest.mark.slow
def test_bit_exact_to_llama_quantize_for_every_type(f32_model, loaded, importance, tmp_path, capsys):
    imatrix_path, imatrix_values = importance
    rows, problems = [], []
    for name, t in ((s.name, s.ggml) for s in FORMATS.values() if s.ggml is not None):  # every registered type
        for with_imatrix in (False, True):
            fmt = make_format(name, imatrix=str(imatrix_path) if with_imatrix else None)
            if t.needs_imatrix and not with_imatrix:
                with pytest.raises(SweepError, match="fmt.imatrix"):
                    ggml_types.preflight(fmt, "weight", TENSORS)
                continue
            ref = llama_cpp_quantized(f32_model, tmp_path / f"{name}-{with_imatrix}.gguf", name,
                                      imatrix_values if with_imatrix else None)
            target = Target("weight", "ffn", (1,), TENSORS)
            with applied(loaded, target, fmt) as proof:
                ours = {n: loaded.read_weight(n) for n in TENSORS}
            for info, n in zip(proof.storage, TENSORS):
                stored_type, raw, values = ref[n]
                x = loaded.read_weight(n)
                got_type, asked = ggml_types.type_for_rows(name, x.shape[-1])
                ours_raw = be.ggml_quantize(x, got_type.type_id, imatrix_values[n] if with_imatrix else None, 2)
                diff = float(np.abs(ours[n].astype(np.float64) - values.astype(np.float64)).max())
                same_bits = np.array_equal(ours[n].view(np.uint32), values.view(np.uint32))
                same_bytes = np.array_equal(ours_raw, raw)
                rows.append((name, "yes" if with_imatrix else "no", n, x.shape[-1], stored_type,
                             asked or "", diff, same_bytes))
                expected_type = ggml_types.GGML_NAME[got_type.name] if got_type.name in ggml_types.GGML_NAME \
                    else got_type.name
                if not (same_bits and same_bytes and stored_type == expected_type
                        and info["ggml_type"] == got_type.name and info["bytes"] == raw.size):
                    problems.append(rows[-1])
    with capsys.disabled():
        print("\n  type        imatrix  tensor                  row  stored as  fallback_from  max|diff|  same bytes")
        for r in rows:
            print(f"  {r[0]:<11} {r[1]:<8} {r[2]:<23} {r[3]:>4} {r[4]:<10} {r[5]:<14} {r[6]:<10.3g} {r[7]}")
    assert not problems, f"not bit-exact to llama.cpp's quantizer: {problems}"
    assert len({r[0] for r in rows}) == len(ggml_types.TYPES)


def test_fallback_follows_llama_cpp():
    assert ggml_types.type_for_rows("q4_K", 576)[0].name == "q5_0"
    assert ggml_types.type_for_rows("q6_K", 576) == (ggml_types.TYPES["q8_0"], "q6_K")
    assert ggml_types.type_for_rows("q3_K", 576)[0].name == "q4_0"
    assert ggml_types.type_for_rows("iq4_xs", 576)[0].name == "iq4_nl"
    assert ggml_types.type_for_rows("q4_K", 1536) == (ggml_types.TYPES["q4_K"], None)
    assert ggml_types.type_for_rows("q8_0", 48)[0].name == "f16"  # no 32-multiple: llama.cpp stores F16
    with pytest.raises(SweepError, match="no fallback"):
        ggml_types.type_for_rows("q1_0", 576)


def test_activations_and_missing_imatrix_fail_before_any_job():
    with pytest.raises(SweepError, match="activations"):
        ggml_types.preflight(make_format("q4_K"), "activation", ("ffn_out-1",))
    with pytest.raises(SweepError, match="python -m sweep.imatrix"):
        ggml_types.preflight(make_format("iq2_xxs"), "weight", ("blk.0.ffn_down.weight",))
    ggml_types.preflight(make_format("q4_K"), "weight", ("blk.0.ffn_down.weight",))  # no imatrix needed


def test_rows_split_over_threads_change_nothing():
    x = np.random.default_rng(1).standard_normal((37, 512)).astype(np.float32)
    for name in ("q4_K", "iq4_xs", "q8_0"):
        t = ggml_types.TYPES[name].type_id
        assert np.array_equal(be.ggml_quantize(x, t, None, 1), be.ggml_quantize(x, t, None, 4))


def test_storage_and_labels(importance):
    with_imatrix = make_format("q4_K", imatrix=str(importance[0]))
    assert ggml_types.storage(with_imatrix, TENSORS[0], (384, 256), "F32")["imatrix_used"] is True
    assert ggml_types.storage(with_imatrix, "token_embd.weight", (10, 256), "F32")["imatrix_used"] is False
    # a point over several tensors (a joint point) names the ones the imatrix lacks
    from sweep.pipeline.point import storage_columns

    both = [ggml_types.storage(with_imatrix, n, (384, 256), "F32") for n in (TENSORS[0], "token_embd.weight")]
    assert storage_columns(both, 0.0)["imatrix_missing"] == "token_embd.weight"
    assert "imatrix_missing" not in storage_columns(both[:1], 0.0)
    fmt = make_format("q6_K")
    s = ggml_types.storage(fmt, "blk.0.attn_v.weight", (192, 576), "Q4_1")
    assert (s["ggml_type"], s["fallback_from"]) == ("q8_0", "q6_K")
    assert s["bytes"] == 192 * 576 // 32 * 34 and s["bytes_orig"] == 192 * 576 // 32 * 20
    assert make_format("q4_K", imatrix="x.gguf").label == "q4_K/imatrix"
    assert make_format("q4_K").label == "q4_K" and make_format("q4_K").applies_to == ("weight",)
    assert ggml_types.storage(make_format("int8"), "t", (4, 64), None)["bytes"] == 4 * 64 * (8 + 32 / 64) / 8
    assert ggml_types.storage(make_format("mxfp4"), "t", (4, 64), None)["bytes"] == 4 * 64 * (4 + 8 / 32) / 8
    assert ggml_types.storage(make_format("none"), "t", (4, 64), "Q8_0")["bytes"] == 4 * 64 * 8.5 / 8
    assert make_format("bf16", imatrix="x.gguf").imatrix is None  # unused parameters reset


@pytest.mark.slow
def test_sweep_records_fallback_and_sizes_and_refuses_misuse(tiny_model, tmp_path, env):
    """End to end on the tiny model (rows of 64 and 128: every 256-block type falls back)."""
    import subprocess
    import sys

    import pandas as pd
    from test_sweep import ROOT, run_sweep, tiny_args

    proc = run_sweep(tiny_args(tiny_model, tmp_path, "layer=0", "tensor=ffn_down", "kind=weight", "fmt=q4_0,q4_K",
                               "metrics.generate=false"), env)
    assert "L0 q4_K (stored as q5_0: q4_K's block does not divide the rows)" in proc.stdout
    df = pd.read_parquet(tmp_path / "sweep" / "results.parquet").set_index("fmt")
    assert df.loc["q4_K", "ggml_type"] == "q5_0" and df.loc["q4_K", "fallback_from"] == "q4_K"
    assert df.loc["q4_0", "ggml_type"] == "q4_0" and pd.isna(df.loc["q4_0", "fallback_from"])
    assert df.loc["q4_0", "bpw"] == 4.5 and df.loc["q4_K", "bpw"] == 5.5 and (df["bpw_orig"] == 5.0).all()
    assert df.loc["q4_0", "bytes"] == 64 * 128 // 32 * 18 and (df["bytes_orig"] == 64 * 128 // 32 * 20).all()
    assert df.loc["q4_0", "kld_per_bit_saved"] == pytest.approx(df.loc["q4_0", "kld_mean"] / 0.5)
    assert pd.isna(df.loc["q4_K", "kld_per_bit_saved"])  # 5.5 bits: nothing saved against Q4_1
    for axes, message in ((["kind=activation", "tensor=ffn_out", "fmt=q4_K"], "cannot round activations"),
                          (["kind=weight", "tensor=ffn_down", "fmt=iq2_xxs"], "python -m sweep.imatrix")):
        bad = subprocess.run([sys.executable, "-m", "sweep", *tiny_args(tiny_model, tmp_path, "layer=0", *axes)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert bad.returncode == 2 and message in bad.stderr and bad.stderr.startswith("error: "), bad.stderr[-2000:]


def test_tensor_all_with_a_gguf_type_is_what_llama_cpp_quantizes(f32_model, tmp_path, wikitext):
    """`tensor=all` with a GGUF type: the quantizable tensors (llama-quant.cpp's rule), not the norms; with a float
    format every tensor. An iq2_xxs point over a whole block no longer stops on a norm the imatrix cannot cover."""
    from sweep.llama.model_file import model_info
    from sweep.pipeline.grid import plan
    from sweep.quant.targets import resolve

    info = model_info(f32_model)
    every = resolve("weight", "all", 1, info).names
    quantized = resolve("weight", "all", 1, info, quantized_only=True).names
    assert "blk.1.attn_norm.weight" in every and not any("_norm" in n for n in quantized)
    assert set(quantized) == {n for n in every if ggml_types.quantizable(n, info.tensor_shapes[n])} >= set(TENSORS)
    im = Imatrix(chunk_count=1, chunk_size=64, datasets=["test"])
    for name in quantized:
        im.sums[name] = np.ones((1, info.tensor_shapes[name][0]), dtype=np.float32)
        im.counts[name] = np.array([1], dtype=np.int64)
    path = write_gguf(tmp_path / "block1.imatrix.gguf", im)
    grid = plan([f"model.path={f32_model}", f"data.path={wikitext}", "data.n_ctx=64", "data.n_windows=2",
                 "layer=1", "tensor=all", "kind=weight", "fmt=iq2_xxs", f"fmt.imatrix={path}",
                 f"run.store={tmp_path / 'store'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert grid.points[0][1].names == quantized
