"""A stage model seen as the full model: what scoring and `quant.apply` use in place of a Backend when a point
reuses the unperturbed prefix (sweep/prefix/reuse.py).

Names stay the full model's on this side: a weight `blk.L.x` is the stage's `blk.(L-S).x`, a node `l_out-L` the
stage's `l_out-(L-S)`, so targets, proofs, recipes and importance matrices never see the stage's numbering. A window
of tokens is decoded from the residual stream the baseline captured for it (`l_out-(S-1)`, all positions).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, MutableMapping
from typing import TYPE_CHECKING, TypeAlias

import numpy as np

from .embd import EmbeddingBackend
from .gguf_names import block_name, split_block
from .stage_file import stage_name

if TYPE_CHECKING:
    from .backend import Backend

_NODE = re.compile(r"^(?P<base>.+)-(?P<layer>\d+)$")


def node_in_stage(name: str, start: int) -> str:
    m = _NODE.match(name)
    if m is None or int(m["layer"]) < start:
        raise ValueError(f"node {name!r} is not inside the stage starting at block {start}")
    return f"{m['base']}-{int(m['layer']) - start}"


def node_in_model(name: str, start: int) -> str:
    m = _NODE.match(name)
    return f"{m['base']}-{int(m['layer']) + start}" if m else name


class Renamed(MutableMapping):
    """A stage's dict keyed by tensor names, read and written under the full model's names."""

    def __init__(self, inner: dict, start: int):
        self.inner, self.start = inner, start

    def __getitem__(self, name):
        try:
            return self.inner[stage_name(name, self.start)]
        except ValueError:  # a block before the stage: not in it
            raise KeyError(name) from None

    def __setitem__(self, name, value) -> None:
        self.inner[stage_name(name, self.start)] = value

    def __delitem__(self, name) -> None:
        del self.inner[stage_name(name, self.start)]

    def __iter__(self):
        return (k if (split := split_block(k)) is None else block_name(split[0] + self.start, split[1])
                for k in self.inner)

    def __len__(self) -> int:
        return len(self.inner)


class StageView:
    """The stage backend starting at block `start`, fed `residuals[i]` (n_ctx x n_embd) for window i."""

    # slots: setting any other attribute (a Backend field) fails loudly instead of doing nothing
    __slots__ = ("stage", "start", "residuals", "_index")

    def __init__(self, stage: EmbeddingBackend, start: int, residuals: np.ndarray, windows: np.ndarray):
        self.stage, self.start, self.residuals = stage, start, residuals
        # a window is known by its tokens: scoring hands over tokens, the residuals are stored by window index
        self._index = {w.tobytes(): i for i, w in reversed(list(enumerate(windows)))}

    # what scoring reads
    n_ctx = property(lambda self: self.stage.n_ctx)
    n_threads = property(lambda self: self.stage.n_threads)
    n_vocab = property(lambda self: self.stage.n_vocab)
    n_layers = property(lambda self: self.stage.n_layers + self.start)
    settings = property(lambda self: self.stage.settings)
    decode_seconds = property(lambda self: self.stage.decode_seconds)

    def decode_window(self, tokens: np.ndarray, output_mask: np.ndarray) -> np.ndarray:
        i = self._index.get(np.ascontiguousarray(tokens).tobytes())
        if i is None:
            raise KeyError("this window is not one of the captured ones: its prefix was never decoded")
        return self.stage.decode_rows(np.asarray(self.residuals[i, :len(tokens)], dtype=np.float32), output_mask)

    # weights, by the full model's names
    def read_weight(self, name: str) -> np.ndarray:
        return self.stage.read_weight(stage_name(name, self.start))

    def read_weight_bytes(self, name: str) -> bytes:
        return self.stage.read_weight_bytes(stage_name(name, self.start))

    def read_weight_raw(self, name: str) -> np.ndarray:
        return self.stage.read_weight_raw(stage_name(name, self.start))

    def write_weight(self, name: str, data: np.ndarray) -> None:
        self.stage.write_weight(stage_name(name, self.start), data)

    def weight_copies(self, name: str) -> int:
        return self.stage.weight_copies(stage_name(name, self.start))

    def holds_f32(self, name: str) -> bool:
        return self.stage.holds_f32(stage_name(name, self.start))

    def weight_layout(self, name: str) -> tuple[int, tuple[int, ...]]:
        return self.stage.weight_layout(stage_name(name, self.start))

    # a quantized weight's delta (llama/weight_delta.py) and the nodes that use it, by the full model's names
    weight_deltas = property(lambda self: Renamed(self.stage.weight_deltas, self.start))
    consumers = property(lambda self: Renamed(self.stage.consumers, self.start))

    # node observers and replacements (sweep/llama/observe.py), by the full model's node names; MoE points, whose
    # routing is tracked, never reuse a prefix
    def observe_nodes(self, nodes, fn: Callable):
        return self.stage.observe_nodes(self._in_stage(nodes), self._in_model(fn))

    def replace_nodes(self, nodes: Collection[tuple[str, int]], fn: Callable):
        return self.stage.replace_nodes(self._in_stage(nodes), self._in_model(fn))

    def replacements_paused(self):
        return self.stage.replacements_paused()

    def observe_matmuls(self, observer):
        raise TypeError("a stage's matmuls carry the stage's weight names: no point that observes them decodes a stage")

    def _in_stage(self, nodes):
        if callable(nodes):
            return lambda name: nodes(node_in_model(name, self.start))
        return frozenset((node_in_stage(n, self.start), i) for n, i in nodes)

    def _in_model(self, fn: Callable) -> Callable:
        return lambda name, x: fn(node_in_model(name, self.start), x)

    def placement(self) -> dict:
        return self.stage.placement()


# What scoring and quant.apply decode with: the full model, or a stage of it seen as the full model.
Decoder: TypeAlias = "Backend | StageView"
