"""GGUF files read through ggml's own gguf reader (the C API; it knows every type this llama.cpp writes, the Python
`gguf` package may lag behind): one tensor's bytes, the tensor table, the header llama_model_quantize would write."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from llama_cpp._ggml import libggml

from ..errors import SweepError
from .backend import _init_once, _recent_errors
from .ggml_tensor import GGML_MAX_DIMS
from .quantize import _kv_str


class _GGUFInitParams(ctypes.Structure):
    """`struct gguf_init_params` (ggml/include/gguf.h)."""

    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


def _declare(signatures: list[tuple[str, list[type], type | None]]) -> None:
    """Declare libggml functions' C signatures: (name, argument types, result type or None for void)."""
    for fn, args, res in signatures:
        getattr(libggml, fn).argtypes, getattr(libggml, fn).restype = args, res


_declare([
    ("gguf_init_from_file", [ctypes.c_char_p, _GGUFInitParams], ctypes.c_void_p),
    ("gguf_free", [ctypes.c_void_p], None),
    ("gguf_find_tensor", [ctypes.c_void_p, ctypes.c_char_p], ctypes.c_int64),
    ("gguf_get_data_offset", [ctypes.c_void_p], ctypes.c_size_t),
    ("gguf_get_tensor_offset", [ctypes.c_void_p, ctypes.c_int64], ctypes.c_size_t),
    ("gguf_get_tensor_ne", [ctypes.c_void_p, ctypes.c_int64], ctypes.POINTER(ctypes.c_int64)),
    ("gguf_get_tensor_type", [ctypes.c_void_p, ctypes.c_int64], ctypes.c_int),
    ("gguf_get_tensor_size", [ctypes.c_void_p, ctypes.c_int64], ctypes.c_size_t),
])


def read_gguf_tensor(path: Path, name: str) -> tuple[int, tuple[int, ...], np.ndarray]:
    """(ggml type, numpy shape, stored bytes) of one tensor of a GGUF file, through ggml's own gguf reader (it
    knows every type this llama.cpp writes; the Python `gguf` package may lag behind)."""
    ctx = libggml.gguf_init_from_file(str(path).encode(), _GGUFInitParams(True, None))
    if not ctx:
        raise SweepError(f"ggml cannot read {path} as GGUF")
    try:
        tid = libggml.gguf_find_tensor(ctx, name.encode())
        if tid < 0:
            raise SweepError(f"{path} has no tensor {name!r}")
        offset = libggml.gguf_get_data_offset(ctx) + libggml.gguf_get_tensor_offset(ctx, tid)
        size = libggml.gguf_get_tensor_size(ctx, tid)
        ne = libggml.gguf_get_tensor_ne(ctx, tid)
        shape = tuple(int(ne[i]) for i in range(GGML_MAX_DIMS))
        type_id = int(libggml.gguf_get_tensor_type(ctx, tid))
    finally:
        libggml.gguf_free(ctx)
    while len(shape) > 1 and shape[-1] == 1:
        shape = shape[:-1]
    return type_id, tuple(reversed(shape)), np.fromfile(path, dtype=np.uint8, count=size, offset=offset)


_declare([
    ("gguf_get_n_tensors", [ctypes.c_void_p], ctypes.c_int64),
    ("gguf_get_tensor_name", [ctypes.c_void_p, ctypes.c_int64], ctypes.c_char_p),
    ("gguf_get_alignment", [ctypes.c_void_p], ctypes.c_size_t),
])


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    type_id: int  # enum ggml_type as stored
    ne: tuple[int, ...]  # ggml order: ne[0] is the row length; trailing 1s dropped
    nbytes: int  # stored bytes (without alignment padding)
    offset: int = 0  # from the start of the data section


def gguf_tensor_table(path: Path) -> tuple[list[GGUFTensorInfo], int, int]:
    """Every tensor of a GGUF file as ggml's gguf reader lists it (fast: no metadata values are parsed in Python),
    with the file's data offset (header bytes) and alignment."""
    ctx = libggml.gguf_init_from_file(str(path).encode(), _GGUFInitParams(True, None))
    if not ctx:
        raise SweepError(f"ggml cannot read {path} as GGUF")
    try:
        return _tensor_table(ctx)
    finally:
        libggml.gguf_free(ctx)


def _tensor_table(ctx) -> tuple[list[GGUFTensorInfo], int, int]:
    """`gguf_tensor_table` of an open gguf context."""
    out = []
    for i in range(libggml.gguf_get_n_tensors(ctx)):
        ne_ptr = libggml.gguf_get_tensor_ne(ctx, i)
        ne = [int(ne_ptr[k]) for k in range(GGML_MAX_DIMS)]
        while len(ne) > 1 and ne[-1] == 1:
            ne.pop()
        out.append(GGUFTensorInfo(libggml.gguf_get_tensor_name(ctx, i).decode(),
                                  int(libggml.gguf_get_tensor_type(ctx, i)), tuple(ne),
                                  int(libggml.gguf_get_tensor_size(ctx, i)),
                                  int(libggml.gguf_get_tensor_offset(ctx, i))))
    return out, int(libggml.gguf_get_data_offset(ctx)), int(libggml.gguf_get_alignment(ctx))


_declare([
    ("gguf_set_val_u32", [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32], None),
    ("gguf_set_val_str", [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p], None),
    ("gguf_remove_key", [ctypes.c_void_p, ctypes.c_char_p], ctypes.c_int64),
    ("gguf_get_meta_size", [ctypes.c_void_p], ctypes.c_size_t),
])


def quantized_header_bytes(path: Path, ftype: int, metadata: Sequence[tuple[str, str | int]] = ()) -> int:
    """Bytes before the tensor data in the file llama_model_quantize writes from `path`: the source's metadata with
    the keys src/llama-quant.cpp sets (general.quantization_version, general.file_type, the kv overrides:
    `metadata`) and removes (split.*), measured by ggml's own gguf writer (tensor infos do not change size with the
    type)."""
    ctx = libggml.gguf_init_from_file(str(path).encode(), _GGUFInitParams(True, None))
    if not ctx:
        raise SweepError(f"ggml cannot read {path} as GGUF")
    try:
        libggml.gguf_set_val_u32(ctx, b"general.quantization_version", 2)  # GGML_QNT_VERSION
        libggml.gguf_set_val_u32(ctx, b"general.file_type", ftype)
        for split_key in (b"split.no", b"split.count", b"split.tensors.count"):
            libggml.gguf_remove_key(ctx, split_key)
        for key, value in metadata:
            if isinstance(value, str):
                libggml.gguf_set_val_str(ctx, key.encode(), _kv_str(value).encode())
            else:
                libggml.gguf_set_val_u32(ctx, key.encode(), abs(int(value)))
        return int(libggml.gguf_get_meta_size(ctx))
    finally:
        libggml.gguf_free(ctx)


# ---- the header: metadata and tensor table through ggml's reader (a tokenizer's arrays are never parsed in Python) -

_declare([
    ("gguf_get_n_kv", [ctypes.c_void_p], ctypes.c_int64),
    ("gguf_get_key", [ctypes.c_void_p, ctypes.c_int64], ctypes.c_char_p),
    ("gguf_get_kv_type", [ctypes.c_void_p, ctypes.c_int64], ctypes.c_int),
    ("gguf_get_arr_type", [ctypes.c_void_p, ctypes.c_int64], ctypes.c_int),
    ("gguf_get_arr_n", [ctypes.c_void_p, ctypes.c_int64], ctypes.c_size_t),
    ("gguf_get_arr_data", [ctypes.c_void_p, ctypes.c_int64], ctypes.c_void_p),
    ("gguf_get_arr_str", [ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t], ctypes.c_char_p),
    ("gguf_get_val_data", [ctypes.c_void_p, ctypes.c_int64], ctypes.c_void_p),
    ("gguf_get_val_str", [ctypes.c_void_p, ctypes.c_int64], ctypes.c_char_p),
    ("ggml_type_name", [ctypes.c_int], ctypes.c_char_p),
])

# enum gguf_type (ggml/include/gguf.h) -> numpy dtype; 7 is bool, 8 string, 9 array
_GGUF_DTYPES = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
                7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_NOT_PARSED = "tokenizer."  # arrays under these keys (vocabularies, merges: 262k entries) keep only their length


@dataclass(frozen=True)
class GGUFHeader:
    """A GGUF file's metadata and tensor table, read by ggml's own reader: values as Python scalars, strings and
    lists (what gguf-py's `contents()` gives), except the tokenizer's arrays, of which only the length is kept."""

    meta: dict  # key -> value (tokenizer arrays left out)
    array_lengths: dict[str, int]  # every array key -> its number of elements
    tensors: tuple[GGUFTensorInfo, ...]

    def type_name(self, tensor: GGUFTensorInfo) -> str:
        """The ggml type's name as gguf-py spells it ("Q4_1", "F32", "BF16")."""
        from gguf import GGMLQuantizationType  # deferred: gguf-py's import is only needed for the name

        try:
            return GGMLQuantizationType(tensor.type_id).name
        except ValueError:  # a type newer than gguf-py: ggml's own name
            return libggml.ggml_type_name(tensor.type_id).decode().upper()


def _value(ctx, i: int, kind: int, key: str):
    if kind == _GGUF_STRING:
        return libggml.gguf_get_val_str(ctx, i).decode("utf-8", errors="replace")
    if kind != _GGUF_ARRAY:
        dtype = np.dtype(_GGUF_DTYPES[kind])
        return np.frombuffer(ctypes.string_at(libggml.gguf_get_val_data(ctx, i), dtype.itemsize), dtype)[0].item()
    n, item = int(libggml.gguf_get_arr_n(ctx, i)), int(libggml.gguf_get_arr_type(ctx, i))
    if key.startswith(_NOT_PARSED):
        return None
    if item == _GGUF_STRING:
        return [libggml.gguf_get_arr_str(ctx, i, k).decode("utf-8", errors="replace") for k in range(n)]
    dtype = np.dtype(_GGUF_DTYPES[item])
    return np.frombuffer(ctypes.string_at(libggml.gguf_get_arr_data(ctx, i), n * dtype.itemsize), dtype).tolist()


def gguf_header(path: Path) -> GGUFHeader:
    """The metadata and tensor table of a GGUF file (milliseconds where gguf-py's reader takes seconds on a
    tokenizer's arrays); a file ggml cannot read is one SweepError line."""
    _init_once()  # ggml's messages go to the log callback, not to stderr: the user sees one line
    _recent_errors.clear()
    ctx = libggml.gguf_init_from_file(str(path).encode(), _GGUFInitParams(True, None))
    if not ctx:
        why = _recent_errors[0] if _recent_errors else "ggml's reader refuses it"
        raise SweepError(f"cannot read GGUF file {path}: {why} (is it complete and uncorrupted?)")
    try:
        meta, lengths = {}, {}
        for i in range(libggml.gguf_get_n_kv(ctx)):
            key, kind = libggml.gguf_get_key(ctx, i).decode(), int(libggml.gguf_get_kv_type(ctx, i))
            if kind == _GGUF_ARRAY:
                lengths[key] = int(libggml.gguf_get_arr_n(ctx, i))
            value = _value(ctx, i, kind, key)
            if value is not None:
                meta[key] = value
        tensors, data_offset, _ = _tensor_table(ctx)  # the same open header: the file is read once
    finally:
        libggml.gguf_free(ctx)
    # ggml reads the header only: a file cut short (a copy or a download that stopped) is found by its size
    end = data_offset + max((t.offset + t.nbytes for t in tensors), default=0)
    if (size := path.stat().st_size) < end:
        raise SweepError(f"cannot read GGUF file {path}: it has {size:,} bytes but its tensors end at byte {end:,} "
                         f"(is it complete and uncorrupted?)")
    return GGUFHeader(meta, lengths, tuple(tensors))
