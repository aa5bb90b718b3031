"""GGUF quant types through ggml's own code (used by sweep/quant/ggml_types.py, sweep/recipe/, tests).

Nothing here re-implements a quantizer: rows go through `ggml_quantize_chunk` and back through the type traits'
`to_float` of the libggml that llama_cpp loads; whole files through llama.cpp's `llama_model_quantize`.
Signatures: ggml/include/ggml.h and include/llama.h of the llama.cpp vendored by llama-cpp-python 0.3.36.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import llama_cpp
import numpy as np
from llama_cpp._ggml import libggml

from ..errors import SweepError
from .backend import _init_once, _recent_errors
from .ggml_tensor import GGML_TYPE_F32

if TYPE_CHECKING:
    from .stage_view import Decoder

GGML_TYPE_COUNT = 43  # enum ggml_type's GGML_TYPE_COUNT in that ggml.h


class _GGMLTypeTraits(ctypes.Structure):
    """`struct ggml_type_traits` (ggml.h)."""

    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)
_FloatPtr = ctypes.POINTER(ctypes.c_float)

for _fn, _args, _res in [
    ("ggml_quantize_chunk", [ctypes.c_int, _FloatPtr, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                             ctypes.c_int64, _FloatPtr], ctypes.c_size_t),
    ("ggml_quantize_init", [ctypes.c_int], None),
    ("ggml_quantize_requires_imatrix", [ctypes.c_int], ctypes.c_bool),
    ("ggml_get_type_traits", [ctypes.c_int], ctypes.POINTER(_GGMLTypeTraits)),
    ("ggml_row_size", [ctypes.c_int, ctypes.c_int64], ctypes.c_size_t),
    ("ggml_blck_size", [ctypes.c_int], ctypes.c_int64),
    ("ggml_type_size", [ctypes.c_int], ctypes.c_size_t),
    ("ggml_type_name", [ctypes.c_int], ctypes.c_char_p),
]:
    getattr(libggml, _fn).argtypes, getattr(libggml, _fn).restype = _args, _res


def ggml_type_facts(type_id: int) -> dict:
    """What ggml says about one type: name, block size, bytes per block, quantized, needs an imatrix in ggml."""
    tr = libggml.ggml_get_type_traits(type_id).contents
    return {"name": (tr.type_name or b"").decode(), "block_size": int(tr.blck_size), "type_size": int(tr.type_size),
            "is_quantized": bool(tr.is_quantized), "has_to_float": bool(tr.to_float),
            "ggml_requires_imatrix": bool(libggml.ggml_quantize_requires_imatrix(type_id))}


def ggml_row_size(type_id: int, n_per_row: int) -> int:
    return int(libggml.ggml_row_size(type_id, n_per_row))


def _row_spans(n_rows: int, n_threads: int) -> list[tuple[int, int]]:
    n = max(1, min(n_threads, n_rows))
    edges = np.linspace(0, n_rows, n + 1).astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _parallel(spans, work) -> None:
    """Run work(a, b) for every span, on threads (ctypes releases the GIL inside ggml's C code)."""
    if len(spans) == 1:
        work(*spans[0])
        return
    with ThreadPoolExecutor(len(spans)) as pool:
        for f in [pool.submit(work, a, b) for a, b in spans]:
            f.result()


def ggml_quantize(x: np.ndarray, type_id: int, imatrix: np.ndarray | None = None, n_threads: int = 1) -> np.ndarray:
    """The bytes of `x` (float32, rows = last axis) stored as ggml type `type_id`: `ggml_quantize_chunk` on row
    spans split across `n_threads` threads. Every ggml quantizer works row by row, so the split changes nothing.
    `imatrix`: one importance value per column, or shape (n_mat, n_per_row) for a stack of n_mat matrices (rows of
    matrix m use imatrix[m], as llama.cpp's quantizer does for expert tensors)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_per_row = x.shape[-1] if x.ndim else 1
    n_rows = x.size // n_per_row
    if n_per_row % libggml.ggml_blck_size(type_id):
        raise SweepError(f"rows of {n_per_row} are not a multiple of {ggml_type_facts(type_id)['name']}'s block "
                         f"of {libggml.ggml_blck_size(type_id)}")
    imat = None
    if imatrix is not None:
        imat = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1, n_per_row)
        if n_rows % imat.shape[0]:
            raise SweepError(f"importance matrix of {imat.shape[0]} x {n_per_row} does not fit {n_rows} rows")
    elif libggml.ggml_quantize_requires_imatrix(type_id):  # ggml would abort the process
        raise SweepError(f"{ggml_type_facts(type_id)['name']} cannot be quantized without an importance matrix")
    row_size = ggml_row_size(type_id, n_per_row)
    out = np.empty(n_rows * row_size, dtype=np.uint8)
    rows_per_mat = n_rows // imat.shape[0] if imat is not None else n_rows
    libggml.ggml_quantize_init(type_id)  # thread-safe, but initialise once before the threads
    src, dst = x.reshape(n_rows, n_per_row), out.reshape(n_rows, row_size)

    def work(a: int, b: int) -> None:
        while a < b:  # never cross a matrix boundary: each matrix has its own importance row
            end = min(b, (a // rows_per_mat + 1) * rows_per_mat)
            imp = imat[a // rows_per_mat].ctypes.data_as(_FloatPtr) if imat is not None else None
            libggml.ggml_quantize_chunk(type_id, src[a:end].ctypes.data_as(_FloatPtr), dst[a:end].ctypes.data,
                                        0, end - a, n_per_row, imp)
            a = end

    _parallel(_row_spans(n_rows, n_threads), work)
    return out


def ggml_dequantize(data: np.ndarray, type_id: int, shape: tuple[int, ...], n_threads: int = 1) -> np.ndarray:
    """float32 array of `shape` from ggml type `type_id` bytes, through the type traits' `to_float`."""
    n_per_row = shape[-1] if shape else 1
    n_rows = int(np.prod(shape)) // n_per_row
    row_size = ggml_row_size(type_id, n_per_row)
    data = np.ascontiguousarray(data, dtype=np.uint8).reshape(n_rows, row_size)
    if type_id == GGML_TYPE_F32:
        return data.view(np.float32).reshape(shape).copy()
    to_float = _TO_FLOAT(libggml.ggml_get_type_traits(type_id).contents.to_float)
    out = np.empty((n_rows, n_per_row), dtype=np.float32)

    def work(a: int, b: int) -> None:
        to_float(data[a:b].ctypes.data, out[a:b].ctypes.data_as(_FloatPtr), (b - a) * n_per_row)

    _parallel(_row_spans(n_rows, n_threads), work)
    return out.reshape(shape)


def dequantized_weight(backend: Decoder, name: str) -> np.ndarray:
    """A weight of any type as float32, dequantized by ggml's own `to_float` from the bytes llama.cpp holds."""
    type_id, shape = backend.weight_layout(name)
    return ggml_dequantize(backend.read_weight_raw(name), type_id, shape, backend.n_threads)


def rows_reader(backend: Decoder, name: str) -> Callable[[int, int], np.ndarray]:
    """A function (a, b) -> rows a..b-1 of a weight (its last axis a row) as float32, dequantized by ggml from the
    bytes llama.cpp holds, read once: a large tensor is never whole in float32."""
    type_id, shape = backend.weight_layout(name)
    n = shape[-1]
    row = ggml_row_size(type_id, n)
    raw = backend.read_weight_raw(name).reshape(-1, row)

    def read(a: int, b: int) -> np.ndarray:
        return ggml_dequantize(raw[a:b], type_id, (b - a, n), backend.n_threads)

    return read


_KV_STR_BYTES = 127  # llama_model_kv_override.val_str is char[128]; llama-quantize strncpy's 127 bytes


def _kv_str(value: str) -> str:
    """A string value as llama.cpp's kv override keeps it (its first 127 bytes, no broken character)."""
    return value.encode()[:_KV_STR_BYTES].decode(errors="ignore")


def llama_quantize_file(src: Path, dst: Path, overrides: list[tuple[str, int]], ftype: int = 7, pure: bool = True,
                        imatrix: dict[str, np.ndarray] | None = None, n_threads: int = 1,
                        metadata: Sequence[tuple[str, str | int]] = ()) -> None:
    """llama.cpp's own quantizer (`llama_model_quantize`, what llama-quantize runs) from `src` to `dst`, with
    per-tensor type overrides (regex pattern -> ggml type, first match wins) and importance data per tensor name
    (the values llama-quantize passes: sums / counts). The overrides apply only when `ftype` is a quantized type
    (default 7 = LLAMA_FTYPE_MOSTLY_Q8_0); with `pure`, a final (".*", F32) keeps every other tensor F32.
    `metadata`: header keys to write (str, or int as llama.cpp writes them: u32), as llama-quantize's kv overrides."""
    _init_once()
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread, params.ftype, params.pure = n_threads, ftype, pure
    keep: list[object] = []  # the C side reads these during the call: keep them referenced
    if metadata:
        kv = (llama_cpp.llama_model_kv_override * (len(metadata) + 1))()  # zero-filled: the last key is empty
        for i, (key, value) in enumerate(metadata):
            kv[i].key = key.encode()
            union: llama_cpp.llama_model_kv_override_value = kv[i].value  # type: ignore[assignment]  # stub: a scalar
            if isinstance(value, str):
                kv[i].tag, union.val_str = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, _kv_str(value).encode()
            else:
                kv[i].tag, union.val_i64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, int(value)
        keep.append(kv)
        params.kv_overrides = kv
    tt = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
    for i, (pattern, type_id) in enumerate(overrides):
        encoded = pattern.encode()
        keep.append(encoded)
        tt[i].pattern, tt[i].type = encoded, type_id
    tt[len(overrides)].pattern = None
    params.tt_overrides = tt
    if imatrix:
        im = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            v = np.ascontiguousarray(values, dtype=np.float32)
            encoded = name.encode()
            keep += [encoded, v]
            im[i].name, im[i].data, im[i].size = encoded, v.ctypes.data_as(_FloatPtr), v.size
        im[len(imatrix)].name = None
        params.imatrix = im
    _recent_errors.clear()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        why = _recent_errors[-1] if _recent_errors else "see llama.cpp's log"
        raise SweepError(f"llama_model_quantize failed ({rc}) on {src}: {why}")
