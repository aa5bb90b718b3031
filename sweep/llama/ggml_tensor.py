"""`struct ggml_tensor` as ctypes sees it, and the libggml calls that read and write a tensor's data (shared by the
context's eval hook, sweep/llama/backend.py, and the matmul observer, sweep/llama/observer.py)."""

from __future__ import annotations

import ctypes

from llama_cpp._ggml import libggml

GGML_MAX_DIMS, GGML_MAX_SRC, GGML_MAX_OP_PARAMS, GGML_MAX_NAME = 4, 10, 64, 64
GGML_TYPE_F32 = 0


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
_TensorPtr = ctypes.POINTER(GGMLTensor)

for _fn, _args, _res in [
    ("ggml_op_desc", [ctypes.c_void_p], ctypes.c_char_p),
    ("ggml_backend_tensor_get", [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t], None),
    ("ggml_backend_tensor_set", [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t], None),
    ("ggml_nbytes", [ctypes.c_void_p], ctypes.c_size_t),
    ("ggml_nelements", [ctypes.c_void_p], ctypes.c_int64),
    ("ggml_is_contiguous", [ctypes.c_void_p], ctypes.c_bool),
]:
    getattr(libggml, _fn).argtypes, getattr(libggml, _fn).restype = _args, _res
