"""Stage files: a GGUF holding only blocks S..N-1 of a model, renumbered from 0, for prefix reuse
(sweep/prefix/reuse.py).

Fed the full model's residual stream after block S-1 (`l_out-(S-1)`) as input embeddings, a stage computes the
remaining blocks as the full model does. What makes that true for llama.cpp's loader:
  * `<arch>.block_count` is N-S and every block tensor `blk.L.*` (L >= S) is written as `blk.(L-S).*`;
  * every per-layer metadata array (an `<arch>.*` array of N entries: head counts, feed-forward lengths, gemma3's
    `attention.sliding_window_pattern`, ...) is sliced to entries S..N-1;
  * an architecture whose sliding-window layers follow a built-in period (gemma3: five sliding, one global) gets
    that pattern written out explicitly, sliced: left to the built-in rule, the period would restart at the stage's
    block 0 and shift every layer's window (NOTES.md, "Prefix reuse by stage files");
  * every other key and tensor (token embedding, output norm, output) is the source's, in the source's own types.
Whatever this misses, the identity check before use catches (the stage's logits must equal the full model's).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import SweepError
from ..files import atomic_path
from .gguf_names import block_name, split_block

if TYPE_CHECKING:
    from gguf import GGUFReader

# llama.cpp's `load_swa_pattern(ml, period, dense_first)` per architecture (src/models/*.cpp), used when the file has
# no per-layer array: layer il slides unless il % period == period - 1 (dense_first: unless il % period == 0).
BUILT_IN_SWA_PERIOD = {"gemma3": (6, False), "gemma2": (2, False), "gemma-embedding": (6, False),
                       "cohere2": (4, False), "gemma3n": (5, False)}


def effective_swa_pattern(arch: str, n_layers: int, fields: dict) -> list[bool] | None:
    """The per-layer sliding-window flags llama.cpp derives for a file with no per-layer array, or None when the
    architecture has no built-in period or the file sets no sliding window."""
    from gguf import Keys

    if arch not in BUILT_IN_SWA_PERIOD or not fields.get(Keys.Attention.SLIDING_WINDOW.format(arch=arch)):
        return None
    period, dense_first = BUILT_IN_SWA_PERIOD[arch]
    # a scalar key overrides it
    period = int(fields.get(Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=arch), period))
    if dense_first:
        return [period == 0 or il % period != 0 for il in range(n_layers)]
    return [period == 0 or il % period < period - 1 for il in range(n_layers)]


def _value(reader: GGUFReader, key: str, path: Path) -> Any:
    """The value of a metadata key the file must have."""
    field = reader.get_field(key)
    if field is None:
        raise SweepError(f"GGUF metadata key {key!r} missing in {path}: not a llama.cpp language model?")
    return field.contents()


def write_stage_file(src: Path, dst: Path, start: int) -> Path:
    """Write the stage of `src` that starts at block `start` to `dst` (atomically); `src` is only read."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, Keys

    reader = GGUFReader(src)
    arch = _value(reader, Keys.General.ARCHITECTURE, src)
    block_count = Keys.LLM.BLOCK_COUNT.format(arch=arch)
    n_layers = int(_value(reader, block_count, src))
    if not 0 < start < n_layers:
        raise SweepError(f"a stage of {src.name} must start inside its blocks (1..{n_layers - 1}), not at {start}")
    scalars = {f.name: f.contents() for f in reader.fields.values() if f.types and f.types[0] != GGUFValueType.ARRAY}
    pattern_key = Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=arch)
    explicit_pattern = None
    if pattern_key not in reader.fields or reader.fields[pattern_key].types[0] != GGUFValueType.ARRAY:
        explicit_pattern = effective_swa_pattern(arch, n_layers, scalars)
    with atomic_path(dst, suffix=".part") as tmp:
        writer = GGUFWriter(tmp, arch)
        for field in reader.fields.values():
            if field.name == Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue  # written by GGUFWriter itself
            if field.name == pattern_key and explicit_pattern is not None:
                continue  # the scalar period is replaced by the explicit array below
            vtype = field.types[0]
            sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
            value = field.contents()
            if field.name == block_count:
                value = n_layers - start
            elif vtype == GGUFValueType.ARRAY and field.name.startswith(f"{arch}.") and len(value) == n_layers:
                value = value[start:]  # a per-layer array
            writer.add_key_value(field.name, value, vtype, sub_type=sub)
        if explicit_pattern is not None:
            writer.add_array(pattern_key, explicit_pattern[start:])

        kept = []
        for t in reader.tensors:
            split = split_block(t.name)
            if split is None:
                kept.append((t.name, t))
            elif split[0] >= start:
                kept.append((block_name(split[0] - start, split[1]), t))
        for name, t in kept:
            writer.add_tensor_info(name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, t in kept:
            writer.write_tensor_data(np.asarray(t.data))
        writer.close()
    return dst


def stage_name(name: str, start: int) -> str:
    """A tensor's name in the stage starting at `start`: `blk.L.x` -> `blk.(L-start).x`; global tensors unchanged."""
    split = split_block(name)
    if split is None:
        return name
    layer = split[0] - start
    if layer < 0:
        raise ValueError(f"{name} is before the stage starting at block {start}")
    return block_name(layer, split[1])
