"""ggml's tensor as llama.cpp's graph hands it to the eval callback: `struct ggml_tensor` (ctypes), the libggml
functions that read and write it on any backend, and the matmul observer's view of a matrix multiplication."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
from llama_cpp._ggml import libggml

from ..errors import SweepError

GGML_MAX_DIMS, GGML_MAX_SRC, GGML_MAX_OP_PARAMS, GGML_MAX_NAME = 4, 10, 64, 64
GGML_TYPE_F32 = 0
GGML_TYPE_I32 = 26  # MoE expert ids (ffn_moe_argsort): read for routing, never rounded


class GGMLTensor(ctypes.Structure):
    """`struct ggml_tensor` from ggml/include/ggml.h (the version vendored by llama-cpp-python 0.3.36)."""


GGMLTensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
    ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(GGMLTensor) * GGML_MAX_SRC),
    ("view_src", ctypes.POINTER(GGMLTensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * GGML_MAX_NAME),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]
TensorPtr = ctypes.POINTER(GGMLTensor)

for _fn, _args, _res in [
    ("ggml_op_desc", [ctypes.c_void_p], ctypes.c_char_p),
    ("ggml_backend_tensor_get", [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t], None),
    ("ggml_backend_tensor_set", [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t], None),
    ("ggml_nbytes", [ctypes.c_void_p], ctypes.c_size_t),
    ("ggml_nelements", [ctypes.c_void_p], ctypes.c_int64),
    ("ggml_is_contiguous", [ctypes.c_void_p], ctypes.c_bool),
]:
    getattr(libggml, _fn).argtypes, getattr(libggml, _fn).restype = _args, _res


# ---- the matmul observer: each computed matrix multiplication as an importance-matrix collector sees it ----

# enum ggml_op in ggml.h of that version: NONE = 0, DUP, ADD, ADD_ID, ADD1, ACC, SUB, MUL, DIV, SQR, SQRT, LOG, SIN,
# COS, SUM, SUM_ROWS, CUMSUM, MEAN, ARGMAX, COUNT_EQUAL, REPEAT, REPEAT_BACK, CONCAT, SILU_BACK, NORM, RMS_NORM,
# RMS_NORM_BACK, GROUP_NORM, L2_NORM, MUL_MAT (29), MUL_MAT_ID (30); tests/test_ggml_formats.py checks them with
# ggml_op_name().
GGML_OP_MUL_MAT, GGML_OP_MUL_MAT_ID = 29, 30
GGML_OP_GET_ROWS = 40  # ... OUT_PROD, SCALE, SET, CPY, CONT, RESHAPE, VIEW, PERMUTE, TRANSPOSE, GET_ROWS (40)

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


def strided(t: GGMLTensor, dtype) -> np.ndarray:
    """A tensor's data through ggml_backend_tensor_get, viewed with its own strides (views are not contiguous)."""
    ptr = ctypes.byref(t)
    raw = np.empty(libggml.ggml_nbytes(ptr), dtype=np.uint8)
    libggml.ggml_backend_tensor_get(ptr, raw.ctypes.data, 0, raw.nbytes)
    ne, nb = [int(n) for n in t.ne], [int(n) for n in t.nb]
    if nb[0] != np.dtype(dtype).itemsize:
        raise SweepError(f"tensor {t.name.decode()!r}: elements are not adjacent (nb[0] = {nb[0]})")
    return np.lib.stride_tricks.as_strided(raw.view(dtype), shape=tuple(reversed(ne)),
                                           strides=tuple(reversed(nb))).copy()


def _ne(t: GGMLTensor) -> tuple[int, int, int, int]:
    """A tensor's ne (ggml's GGML_MAX_DIMS = 4 dimensions)."""
    n0, n1, n2, n3 = (int(n) for n in t.ne)
    return n0, n1, n2, n3


def matmul_view(t: GGMLTensor, with_data: bool = True) -> MatMul:
    w, x = t.src[0].contents, t.src[1].contents
    f32 = x.type == GGML_TYPE_F32
    ids = strided(t.src[2].contents, np.int32)[0, 0] if with_data and t.op == GGML_OP_MUL_MAT_ID else None
    return MatMul(int(t.op), w.name.decode("utf-8", "replace"), _ne(w), _ne(x), f32,
                  strided(x, np.float32) if with_data and f32 else None, ids)
