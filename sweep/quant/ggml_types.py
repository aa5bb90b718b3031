"""GGUF quant types (q8_0 ... q2_K, iq4_xs, iq2_xxs, ...) as weight formats, computed by ggml's own code.

A point with `fmt=q4_K` quantizes the target weight with the `ggml_quantize_chunk` of the libggml that llama_cpp
loads and dequantizes it with that type's `to_float` (sweep/llama/quantize.py does both; nothing is re-implemented
here):
the values are exactly what llama.cpp's quantizer would store (tests/test_ggml_formats.py checks this bit for bit
against `llama_model_quantize` for every type below).

What this module adds is llama.cpp's *policy*, read from src/llama-quant.cpp of the vendored llama.cpp:
  * rows whose length the type's block does not divide fall back to another type (`tensor_type_fallback`); the
    record names the type used (`ggml_type`) and the one asked for (`fallback_from`), never silently;
  * the types llama.cpp refuses to make without an importance matrix (`tensor_requires_imatrix`);
  * the importance values handed to the quantizer are the imatrix file's sums divided by its counts
    (sweep/quant/imatrix_file.py).
Activations cannot take these types: llama.cpp quantizes activations only inside its matmul kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypedDict

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..cores import available_cores
from ..errors import SweepError
from .imatrix_file import load


@dataclass(frozen=True)
class GGMLType:
    name: str  # ggml_type_name(), the name llama-quantize's --tensor-type takes
    type_id: int  # enum ggml_type (ggml.h)
    block_size: int  # elements per block
    type_size: int  # bytes per block
    needs_imatrix: bool = False  # llama.cpp's tensor_requires_imatrix: refuses to quantize without one

    @property
    def bpw(self) -> float:
        return 8 * self.type_size / self.block_size


# The quantized types ggml_quantize_chunk implements (ggml.c), in decreasing bits per weight; ids, block sizes and
# bytes per block come from gguf's GGMLQuantizationType and GGML_QUANT_SIZES (ggml-common.h's figures).
# tests/test_ggml_formats.py checks every figure against the loaded libggml's type traits.
_NAMES = ["q8_0", "q6_K", "q5_K", "q5_1", "q5_0", "q4_K", "q4_1", "q4_0", "nvfp4", "iq4_nl", "iq4_xs", "mxfp4_ggml",
          "q3_K", "iq3_s", "iq3_xxs", "q2_K", "iq2_s", "iq2_xs", "q2_0", "iq2_xxs", "tq2_0", "iq1_m", "tq1_0", "iq1_s",
          "q1_0"]
# llama.cpp's tensor_requires_imatrix: the types it refuses to quantize without an importance matrix
_NEEDS_IMATRIX = {"iq3_xxs", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s"}
# (id, block size, bytes per block) of the types that this llama.cpp has and gguf 0.19 does not know yet
_NEWER_THAN_GGUF = {"q2_0": (42, 64, 18)}


def _ggml_type(name: str) -> GGMLType:
    if name in _NEWER_THAN_GGUF:
        type_id, block_size, type_size = _NEWER_THAN_GGUF[name]
        return GGMLType(name, type_id, block_size, type_size, name in _NEEDS_IMATRIX)
    t = GGMLQuantizationType["MXFP4" if name == "mxfp4_ggml" else name.upper()]
    return GGMLType(name, int(t), *GGML_QUANT_SIZES[t], needs_imatrix=name in _NEEDS_IMATRIX)


_TYPES = [_ggml_type(name) for name in _NAMES]
TYPES: dict[str, GGMLType] = {t.name: t for t in _TYPES}
# ggml calls its MXFP4 "mxfp4"; this project's `mxfp4` is the OCP MX format on ml_dtypes (formats.py), hence the suffix.
GGML_NAME = {t.name: ("mxfp4" if t.name == "mxfp4_ggml" else t.name) for t in _TYPES}
F16 = GGMLType("f16", int(GGMLQuantizationType.F16), *GGML_QUANT_SIZES[GGMLQuantizationType.F16])
_BY_ID = {t.type_id: t for t in [*_TYPES, F16]}

# llama-quant.cpp, tensor_type_fallback: the type used when a row's length is not a multiple of the block.
FALLBACK = {
    **dict.fromkeys(["iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq4_xs"], "iq4_nl"),
    **dict.fromkeys(["q2_0", "q2_K", "q3_K", "tq1_0", "tq2_0"], "q4_0"),
    "q4_K": "q5_0", "q5_K": "q5_1", "q6_K": "q8_0",
}


_NOT_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
                  "per_layer_model_proj", "position_embd.weight", "token_types.weight")


def quantizable(name: str, ne: tuple[int, ...]) -> bool:
    """llama-quant.cpp's tensor_allows_quantization (with quantize_output_tensor, the default)."""
    return len(ne) >= 2 and name.endswith("weight") and not any(s in name for s in _NOT_QUANTIZED)


def is_ggml(name: str) -> bool:
    return name in TYPES


def ggml_type_by_name(name: str) -> GGMLType:
    """A file's tensor type as gguf names it ("Q4_1", "F32", "Q8_0") or as ggml does ("q4_K")."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    qt = GGMLQuantizationType[name.upper()]
    block, size = GGML_QUANT_SIZES[qt]
    return _BY_ID.get(qt.value) or GGMLType(name.lower(), qt.value, block, size)


def type_for_rows(name: str, n_per_row: int) -> tuple[GGMLType, str | None]:
    """The type llama.cpp's quantizer stores rows of `n_per_row` in when asked for `name`, and the type asked for
    when that differs (None otherwise). Same decisions as llama-quant.cpp's tensor_type_fallback."""
    want = TYPES[name]
    if n_per_row % want.block_size == 0:
        return want, None
    if name in FALLBACK:
        got = TYPES[FALLBACK[name]]
    elif want.block_size <= 32:
        got = want
    else:
        raise SweepError(f"{name}: rows of {n_per_row} are not a multiple of its block of {want.block_size} and "
                         f"llama.cpp defines no fallback for it (its quantizer refuses this tensor); choose another "
                         f"type")
    if n_per_row % got.block_size:
        got = F16  # llama.cpp: "must use F16 due to unusual shape"
    return got, name


def needs_imatrix(name: str, tensor: str | None = None) -> bool:
    """Whether llama.cpp refuses `name` without an importance matrix for this tensor (it exempts the token
    embedding and output tensors, unless ggml itself cannot quantize the type without one)."""
    t = TYPES.get(name)
    if t is None or not t.needs_imatrix:
        return False
    if tensor is not None and (tensor.startswith("token_embd.") or tensor.startswith("output.")):
        return name in ("iq2_xxs", "iq2_xs", "iq1_s")  # ggml_quantize_requires_imatrix (ggml.c)
    return True


def fake_quant(x: np.ndarray, fmt, tensor: str | None = None, threads: int | None = None) -> np.ndarray:
    """x (float32, rows = last axis) stored in fmt's ggml type and read back, by ggml's own code."""
    from ..llama import quantize  # deferred: listing and validating formats needs no llama.cpp library

    got, _ = type_for_rows(fmt.name, x.shape[-1] if x.ndim else 1)
    imat = None
    if fmt.imatrix:
        if tensor is None:
            raise SweepError(f"{fmt.label}: an importance matrix applies per tensor; name the tensor")
        imat = load(fmt.imatrix).get(tensor)
        if imat is not None and imat.size % x.shape[-1]:
            raise SweepError(f"importance matrix {fmt.imatrix} has {imat.size} values for {tensor}, whose rows have "
                             f"{x.shape[-1]} elements: it was computed on another model")
    if imat is None and needs_imatrix(fmt.name, tensor):
        where = f" has no entry for {tensor}" if fmt.imatrix else " was given"
        raise SweepError(f"{fmt.name} needs an importance matrix and none{where}: add fmt.imatrix=PATH (a llama.cpp "
                         f"imatrix file; make one with `python -m sweep.imatrix out=PATH`)")
    n = threads or available_cores()
    shape = x.shape if x.ndim else (1,)
    data = quantize.ggml_quantize(x.reshape(shape), got.type_id, imat, n)
    return quantize.ggml_dequantize(data, got.type_id, shape, n).reshape(x.shape)


class Storage(TypedDict, total=False):
    """What one tensor occupies in a format (a proof's `storage` entries)."""

    tensor: str
    n_elements: int
    ggml_type: str | None  # the GGUF type used (None: not a GGUF type)
    fallback_from: str | None  # the GGUF type asked for, where its blocks did not fit the rows
    bytes: float
    imatrix_used: bool  # the importance matrix covers this tensor
    bytes_orig: int  # in its type in the user's file


def storage(fmt, tensor: str, shape: tuple[int, ...], orig_type: str | None) -> Storage:
    """What `tensor` of `shape` occupies in `fmt` (and in its original file type): type actually used, bytes."""
    n = int(np.prod(shape)) if shape else 1
    n_per_row = shape[-1] if shape else 1
    info: Storage = {"tensor": tensor, "n_elements": n, "ggml_type": None, "fallback_from": None}
    if is_ggml(fmt.name):
        got, asked = type_for_rows(fmt.name, n_per_row)
        info["ggml_type"], info["fallback_from"] = got.name, asked
        info["bytes"] = n // got.block_size * got.type_size
        if fmt.imatrix:  # a tensor the imatrix does not cover is quantized without one, as llama.cpp does: say so
            info["imatrix_used"] = tensor in load(fmt.imatrix)
    else:  # the format's nominal bits per element (unchanged: the file's) and its scales (sweep/quant/formats.py)
        bits = fmt.bits
        if bits is None:
            bits = ggml_type_by_name(orig_type).bpw if orig_type else math.nan
        info["bytes"] = n * (bits + fmt.scale_bits(shape)) / 8
    if orig_type:
        t = ggml_type_by_name(orig_type)
        info["bytes_orig"] = n // t.block_size * t.type_size
    return info


def check_kind(fmt, kind: str) -> None:
    """A format on a kind it does not apply to (a GGUF type or a recipe on activations) fails before its target is
    looked for."""
    if kind not in fmt.applies_to and is_ggml(fmt.name):
        raise SweepError(f"fmt={fmt.name} is a GGUF weight type and cannot round activations (llama.cpp quantizes "
                         f"activations only inside its matmul kernels); use kind=weight, or a float format for "
                         f"activations")
    if kind not in fmt.applies_to:
        raise SweepError(f"fmt={fmt.name} applies to {' and '.join(fmt.applies_to)}s only, not to kind={kind}: "
                         f"add kind={fmt.applies_to[0]}")


def preflight(fmt, kind: str, names: tuple[str, ...]) -> None:
    """Before any job: a format on a kind it does not apply to (a GGUF type on activations), or a GGUF type that
    needs an importance matrix without one, fails here; a recipe, for the format of each of its tensors."""
    check_kind(fmt, kind)
    if fmt.recipe is not None:
        recipe = fmt.recipe_file()
        if bool(recipe.imatrix) != bool(fmt.imatrix):
            raise SweepError(f"the recipe {fmt.recipe} was made " + (
                f"with the importance matrix {recipe.imatrix}: add fmt.imatrix={recipe.imatrix}" if recipe.imatrix
                else "without an importance matrix: drop fmt.imatrix"))
        for name in names:
            preflight(fmt.for_tensor(name), kind, (name,))
        return
    if not is_ggml(fmt.name):
        return
    if fmt.imatrix:
        have = load(fmt.imatrix)
        missing = [n for n in names if n not in have and needs_imatrix(fmt.name, n)]
        if missing:
            raise SweepError(f"{fmt.name} needs importance data for {', '.join(missing)}, which {fmt.imatrix} lacks: "
                             f"compute the imatrix on this model (`python -m sweep.imatrix out=PATH`)")
    elif any(needs_imatrix(fmt.name, n) for n in names):
        raise SweepError(f"{fmt.name} needs an importance matrix (llama.cpp refuses it without one): add "
                         f"fmt.imatrix=PATH, a llama.cpp imatrix file; make one with "
                         f"`python -m sweep.imatrix out=PATH`")
