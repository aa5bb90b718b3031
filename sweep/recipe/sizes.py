"""Bytes: what each tensor of a source GGUF occupies in each ggml type, exactly as llama.cpp's quantizer writes it.

llama.cpp's `llama_model_quantize` (src/llama-quant.cpp of the vendored llama.cpp) decides per tensor:
  * `tensor_allows_quantization`: only 2-D/3-D tensors whose name ends in "weight" and is no norm
    ("_norm.weight"), no MoE router ("ffn_gate_inp.weight"), no positional/token-type embedding, ... are
    quantized; everything else is copied in its source type;
  * `tensor_type_fallback`: rows whose length the type's block does not divide take another type
    (sweep/quant/ggml_types.type_for_rows makes the same decision);
  * a tensor stores ne[1]*ne[2] rows of `ggml_row_size(type, ne[0])` bytes, padded to the file's alignment.
The file is its header (metadata and tensor infos, up to the data offset; llama.cpp adds
general.quantization_version and general.file_type to the source's) plus the padded tensor data.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ..errors import SweepError
from ..llama.gguf_reader import gguf_tensor_table, quantized_header_bytes
from ..llama.quantize import ggml_type_facts
from ..quant.ggml_types import TYPES, GGMLType, quantizable, type_for_rows


def padded(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class SourceTensor:
    name: str
    ne: tuple[int, ...]  # ggml order (row length first)
    type_name: str  # its type in the source file
    nbytes: int  # its bytes in the source file

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.ne:
            n *= d
        return n

    @property
    def quantizable(self) -> bool:
        return quantizable(self.name, self.ne)

    def stored_as(self, type_name: str) -> GGMLType:
        """The type llama.cpp stores this tensor in when asked for `type_name` (its row fallback applied)."""
        return type_for_rows(type_name, self.ne[0])[0]

    def bytes_as(self, type_name: str) -> int:
        t = self.stored_as(type_name)
        return self.n_elements // self.ne[0] * (self.ne[0] // t.block_size * t.type_size)


class SourceModel:
    """The tensors of the GGUF a recipe is built from (read with ggml's own gguf reader)."""

    def __init__(self, path: Path, metadata: Sequence[tuple[str, str | int]] = ()):

        self.path = Path(path)
        infos, self.source_header_bytes, self.alignment = gguf_tensor_table(self.path)
        # the written file's header: the source's metadata with the keys llama.cpp's quantizer sets and removes, and
        # `metadata` it is given (an imatrix's provenance: imatrix_file.provenance)
        self.header_bytes = quantized_header_bytes(self.path, 7, metadata)
        self.tensors = [SourceTensor(i.name, i.ne, ggml_type_facts(i.type_id)["name"], i.nbytes)
                        for i in infos]
        self.by_name = {t.name: t for t in self.tensors}

    @cached_property
    def n_elements(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    def tensor(self, name: str) -> SourceTensor:
        if name not in self.by_name:
            raise SweepError(f"{self.path} has no tensor {name!r}: the tables were measured on another model "
                             f"(give the source the tables were measured on with --source)")
        return self.by_name[name]

    def file_bytes(self, tensor_bytes: dict[str, int]) -> int:
        """Size of the file llama.cpp's quantizer writes with these tensor bytes (missing names: their source
        bytes): its header plus every tensor padded to the alignment."""
        return self.header_bytes + sum(padded(tensor_bytes.get(t.name, t.nbytes), self.alignment)
                                       for t in self.tensors)


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'90MB' (10^6), '85.5MiB' (2^20), '123456789' (bytes) -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise SweepError(f"--size {text!r}: give a number with a unit among B, KB, MB, GB, KiB, MiB, GiB "
                         f"(e.g. 90MB), a GGUF file whose size to match, or a preset name such as Q4_K_M")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def check_type(name: str) -> str:
    if name not in TYPES:
        raise SweepError(f"unknown GGUF type {name!r}; valid: {', '.join(TYPES)}")
    return name
