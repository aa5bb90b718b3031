"""GGUF tensor names: a block's tensors are `blk.<L>.<name>` (llama.cpp's LLM_TENSOR_NAMES; gguf-py's
TENSOR_NAMES), every other tensor (`token_embd.weight`, `output_norm.weight`, ...) lies outside the blocks. The one
place that reads or builds the block part of a name; metadata keys come from gguf's own `Keys`."""

from __future__ import annotations

import re

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def split_block(name: str) -> tuple[int, str] | None:
    """`blk.3.ffn_up.weight` -> (3, "ffn_up.weight"); None for a tensor outside the blocks."""
    m = _BLOCK.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def block_of(name: str) -> int | None:
    """The block a tensor belongs to (`blk.3.ffn_up.weight` -> 3); None for a tensor outside the blocks."""
    m = _BLOCK.match(name)
    return int(m.group(1)) if m else None


def block_name(block: int, rest: str) -> str:
    """The name of tensor `rest` of block `block`: (3, "ffn_up.weight") -> `blk.3.ffn_up.weight`."""
    return f"blk.{block}.{rest}"


def in_block(name: str) -> str:
    """A name without its block: `blk.3.ffn_up.weight` -> `ffn_up.weight`; a tensor outside the blocks as it is."""
    split = split_block(name)
    return name if split is None else split[1]
