"""The matmul observer: each computed matrix multiplication as an importance-matrix collector sees it (what
llama-imatrix sees), read from the graph node the context's eval hook hands over (sweep/llama/backend.py)."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
from llama_cpp._ggml import libggml

from ..errors import SweepError
from .ggml_tensor import GGML_TYPE_F32, GGMLTensor

# enum ggml_op in ggml.h of that version: NONE = 0, DUP, ADD, ADD_ID, ADD1, ACC, SUB, MUL, DIV, SQR, SQRT, LOG, SIN,
# COS, SUM, SUM_ROWS, CUMSUM, MEAN, ARGMAX, COUNT_EQUAL, REPEAT, REPEAT_BACK, CONCAT, SILU_BACK, NORM, RMS_NORM,
# RMS_NORM_BACK, GROUP_NORM, L2_NORM, MUL_MAT (29), MUL_MAT_ID (30); tests/test_ggml_formats.py checks them with
# ggml_op_name().
GGML_OP_MUL_MAT, GGML_OP_MUL_MAT_ID = 29, 30

MATMUL_OPS = (GGML_OP_MUL_MAT, GGML_OP_MUL_MAT_ID)


@dataclass
class MatMul:
    """One computed matrix multiplication, as an importance-matrix collector sees it (llama-imatrix's view)."""

    op: int  # GGML_OP_MUL_MAT or GGML_OP_MUL_MAT_ID
    weight: str  # src[0]'s name, e.g. "blk.3.ffn_down.weight"
    weight_ne: tuple[int, int, int, int]  # src[0]->ne
    x_ne: tuple[int, int, int, int]  # src[1]->ne (the input activations)
    x_is_f32: bool  # src[1]->type == F32
    x: np.ndarray | None  # src[1] as float32 of numpy shape (ne3, ne2, ne1, ne0) (None: not F32, or not read)
    ids: np.ndarray | None  # MUL_MAT_ID: src[2], the expert ids, int32 of shape (ne1, ne0) = (n_tokens, n_ids)


def _strided(t: GGMLTensor, dtype) -> np.ndarray:
    """A tensor's data through ggml_backend_tensor_get, viewed with its own strides (views are not contiguous)."""
    ptr = ctypes.byref(t)
    raw = np.empty(libggml.ggml_nbytes(ptr), dtype=np.uint8)
    libggml.ggml_backend_tensor_get(ptr, raw.ctypes.data, 0, raw.nbytes)
    ne, nb = [int(n) for n in t.ne], [int(n) for n in t.nb]
    if nb[0] != np.dtype(dtype).itemsize:
        raise SweepError(f"tensor {t.name.decode()!r}: elements are not adjacent (nb[0] = {nb[0]})")
    return np.lib.stride_tricks.as_strided(raw.view(dtype), shape=tuple(reversed(ne)),
                                           strides=tuple(reversed(nb))).copy()


def matmul(t: GGMLTensor, with_data: bool = True) -> MatMul:
    w, x = t.src[0].contents, t.src[1].contents
    f32 = x.type == GGML_TYPE_F32
    ids = _strided(t.src[2].contents, np.int32)[0, 0] if with_data and t.op == GGML_OP_MUL_MAT_ID else None
    return MatMul(int(t.op), w.name.decode("utf-8", "replace"), tuple(int(n) for n in w.ne),
                  tuple(int(n) for n in x.ne), f32, _strided(x, np.float32) if with_data and f32 else None, ids)
