"""A weight point on a quantized tensor of the file as it is (the native container), with no copy of the model.

A quantized tensor cannot hold fmt(W)'s values, so the point keeps W as the file stores it and adds the difference
to what W computes: llama.cpp runs its own kernel on W, and the eval callback adds (fmt(W) - W)·x, in float32, to
the output of every node that multiplies by W (MUL_MAT; MUL_MAT_ID for the selected experts' rows) or gathers its
rows (GET_ROWS: the token embedding). W here is the tensor dequantized exactly from the bytes llama.cpp holds. So a
point measures the file's own computation plus the float32 effect of replacing W by fmt(W), against the file's own
baseline -- one baseline for every point of the sweep. The ways this differs from a model that stores fmt(W)
(whose kernel would also requantize x for the fmt(W)·x product): docs/scale.md.

Why not llama.cpp's LoRA path (W·x + B·(A·x) with A = the delta, B = identity): it needs an adapter file of the
tensor's size per point and a rank-min(n_in, n_out) identity matmul; the callback needs neither, and reads and
writes through ggml_backend_tensor_get/set as every hook here does, so it also runs on GPU and RPC devices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from llama_cpp._ggml import libggml

from .ggml_tensor import GGML_OP_GET_ROWS, GGML_OP_MUL_MAT, GGML_OP_MUL_MAT_ID, GGMLTensor, strided

CONSUMER_OPS = (GGML_OP_MUL_MAT, GGML_OP_MUL_MAT_ID, GGML_OP_GET_ROWS)


@dataclass
class WeightDelta:
    """fmt(W) - W of one weight: `matrix` for a 2-D weight, or `experts` (expert -> its slice's delta) for a MoE
    stack, of which only the targeted experts differ. `on_call` runs each time a node's output is corrected."""

    matrix: np.ndarray | None = None
    experts: dict[int, np.ndarray] = field(default_factory=dict)
    on_call: Callable[[], None] | None = None

    @property
    def whole(self) -> np.ndarray:
        """`matrix`, for a node that uses the whole weight (MUL_MAT, GET_ROWS)."""
        if self.matrix is None:
            raise RuntimeError("the delta of an expert stack has no whole matrix")
        return self.matrix

    @property
    def nbytes(self) -> int:
        return (self.matrix.nbytes if self.matrix is not None else 0) + sum(d.nbytes for d in self.experts.values())


def consumed_weight(t: GGMLTensor) -> str | None:
    """The name of the weight a node multiplies by or gathers from (its src[0]), or None for any other node."""
    if t.op not in CONSUMER_OPS or not t.src[0]:
        return None
    return t.src[0].contents.name.decode("utf-8", "replace")


def _output(t_ptr, t: GGMLTensor) -> np.ndarray:
    y = np.empty(tuple(reversed([int(n) for n in t.ne])), dtype=np.float32)
    libggml.ggml_backend_tensor_get(t_ptr, y.ctypes.data, 0, y.nbytes)
    return y


def add_delta(t_ptr, t: GGMLTensor, d: WeightDelta) -> None:
    """Add the delta's contribution to the node's output, in place on its backend."""
    if not libggml.ggml_is_contiguous(t_ptr):  # every matmul and get_rows output is a fresh contiguous tensor
        raise RuntimeError(f"node {t.name.decode()!r}: output not contiguous")
    y = _output(t_ptr, t)  # numpy (ne3, ne2, ne1, ne0)
    if t.op == GGML_OP_GET_ROWS:  # y[token] = W[ids[token]]
        ids = strided(t.src[1].contents, np.int32).reshape(-1)
        y.reshape(-1, y.shape[-1])[:] += d.whole[ids]
    elif t.op == GGML_OP_MUL_MAT:  # y = x @ W.T over every leading axis
        x = strided(t.src[1].contents, np.float32)
        y.reshape(-1, y.shape[-1])[:] += x.reshape(-1, x.shape[-1]) @ d.whole.T
    else:  # MUL_MAT_ID: y[token, slot] = x[token, slot or 0] @ W[ids[token, slot]].T
        x = strided(t.src[1].contents, np.float32)[0]  # (tokens, 1 or slots, n_in)
        ids = strided(t.src[2].contents, np.int32)[0, 0]  # (tokens, slots)
        out = y[0]  # (tokens, slots, n_out)
        for expert, delta in d.experts.items():
            tok, slot = np.nonzero(ids == expert)
            if tok.size:
                out[tok, slot] += x[tok, slot if x.shape[1] > 1 else 0] @ delta.T
    libggml.ggml_backend_tensor_set(t_ptr, y.ctypes.data, 0, y.nbytes)
    if d.on_call is not None:
        d.on_call()
