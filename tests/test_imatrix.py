"""The importance matrix: collected from the eval callback as llama-imatrix collects it, and llama.cpp's file forms.

Independent check of the statistic: the input of blk.L.attn_q / attn_k / attn_v is the graph node attn_norm-L and
the input of blk.L.ffn_gate / ffn_up is ffn_norm-L, read here through a node observer (a different path of
the backend); their squared columns summed over the tokens must equal the collector's sums.
(The cross-check against llama-imatrix itself is bench/crosscheck/imatrix_crosscheck.py.)
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from sweep.errors import SweepError
from sweep.imatrix.compute import collect
from sweep.llama.backend import Backend
from sweep.llama.container import compute_settings
from sweep.quant.imatrix_file import Imatrix, load, read, write_gguf

N_CTX = 64


@pytest.fixture(scope="module")
def windows(tiny_model):
    rng = np.random.default_rng(3)
    return rng.integers(100, 5000, size=(2, N_CTX)).astype(np.int32)


def test_collector_sums_squared_inputs_of_every_block_matmul(tiny_model, windows):
    with Backend(tiny_model, N_CTX, 2, settings=compute_settings("f32")) as b:
        col = collect(b, windows, progress=False)
        seen: dict[str, np.ndarray] = {}

        def hook(name, x):
            x = x.astype(np.float64)
            seen[name] = seen.get(name, 0) + (x * x).sum(axis=0)

        with b.observe_nodes({(n, 0) for n in b.nodes if n.startswith(("attn_norm-", "ffn_norm-"))}, hook):
            for w in windows:
                b.decode_window(w, np.ones(N_CTX, dtype=np.int8))
        n_layers = b.n_layers
    names = {f"blk.{i}.{t}.weight" for i in range(n_layers)
             for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(col.sums) == names  # every block matmul, nothing else (token_embd/output are not collected)
    for name in names:
        assert col.counts[name].tolist() == [windows.size]  # one count per token row
    for i in range(n_layers):
        for tensor, node in (("attn_q", "attn_norm"), ("attn_v", "attn_norm"), ("ffn_up", "ffn_norm")):
            ours = col.sums[f"blk.{i}.{tensor}.weight"][0]
            np.testing.assert_allclose(ours, seen[f"{node}-{i}"], rtol=2e-5)


def test_gguf_form_round_trip_and_normalisation(tmp_path):
    im = Imatrix({"blk.0.ffn_down.weight": np.array([[2.0, 4.0, 6.0]], np.float32),
                  "blk.0.ffn_down_exps.weight": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)},
                 {"blk.0.ffn_down.weight": np.array([2]), "blk.0.ffn_down_exps.weight": np.array([1, 0])},
                 chunk_count=1, chunk_size=512, datasets=["wiki.test.raw"])
    path = write_gguf(tmp_path / "im.gguf", im)
    back = read(path)
    assert (back.chunk_count, back.chunk_size, back.datasets, back.legacy) == (1, 512, ["wiki.test.raw"], False)
    for name in im.sums:
        np.testing.assert_array_equal(back.sums[name], im.sums[name])
        np.testing.assert_array_equal(back.counts[name], im.counts[name])
    values = load(path)
    np.testing.assert_array_equal(values["blk.0.ffn_down.weight"], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(values["blk.0.ffn_down_exps.weight"], [1.0, 2.0, 1.0, 1.0])  # count 0: ones


def test_legacy_dat_form(tmp_path):
    """The .dat form llama-imatrix --output-format dat writes: values are sums / count * ncall."""
    name, values, ncall = b"blk.3.attn_v.weight", np.array([3.0, 6.0, 9.0], np.float32), 3
    data = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", ncall, 3) \
        + values.tobytes() + struct.pack("<i", 3) + struct.pack("<i", 4) + b"text"
    (tmp_path / "im.dat").write_bytes(data)
    im = read(tmp_path / "im.dat")
    assert im.legacy and im.chunk_count == 3 and im.datasets == ["text"]
    np.testing.assert_array_equal(load(tmp_path / "im.dat")["blk.3.attn_v.weight"], [1.0, 2.0, 3.0])


def test_bad_imatrix_files(tmp_path):
    with pytest.raises(SweepError, match="does not exist"):
        read(tmp_path / "missing.gguf")
    (tmp_path / "junk.dat").write_bytes(b"\x00\x00\x00\x00")
    with pytest.raises(SweepError, match="no entries"):
        read(tmp_path / "junk.dat")


def test_cli_writes_an_imatrix_the_sweep_reads(tiny_model, tmp_path, env):
    import subprocess
    import sys

    from test_sweep import ROOT

    out = tmp_path / "tiny.imatrix.gguf"
    proc = subprocess.run([sys.executable, "-m", "sweep.imatrix", f"model.path={tiny_model}", "data.n_ctx=64",
                           "data.n_windows=2", "run.progress=false", f"out={out}",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    im = read(out)
    assert (im.chunk_count, im.chunk_size, len(im.sums)) == (2, 64, 21)
    assert all(c.tolist() == [128] for c in im.counts.values())
    assert all((v > 0).all() for v in load(out).values())
