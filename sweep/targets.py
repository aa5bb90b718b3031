"""Which tensor: resolve (kind, tensor, layer) to the exact weight tensors or graph nodes of *this* model.

Everything is validated against what the model really has -- weight names from the GGUF file, node names from
llama.cpp's graph -- so an unknown name is an error listing the valid ones, never a silent no-op.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import SweepError
from .model_file import ModelInfo

KINDS = ("weight", "activation")
_LAYER_SUFFIX = re.compile(r"^(?P<base>.+)-(?P<layer>\d+)$")
# A weight's short name is its GGUF name without the block prefix and without ".weight"; any other tensor keeps its
# suffix (qwen2's `blk.N.attn_q.bias` is `attn_q.bias`), so biases can be targeted too and never pass for weights.
_BLOCK_WEIGHT = re.compile(r"^blk\.(?P<layer>\d+)\.(?P<base>.+?)(\.weight)?$")
# Graph nodes that are not meaningful targets: views/permutes of named nodes, unnamed nodes, KV-cache views.
_NOT_A_TARGET = re.compile(r"\(|^node_\d+$|^cache_|^leaf_")


@dataclass(frozen=True)
class Target:
    kind: str  # "weight" | "activation"
    tensor: str  # short name: "ffn_norm", "token_embd", "l_out", ...
    layers: tuple[int, ...]  # () for tensors outside the blocks
    names: tuple[str, ...]  # what is touched: GGUF tensor names or graph node names

    @property
    def layer_label(self) -> str:
        if not self.layers:
            return "-"
        return str(self.layers[0]) if len(self.layers) == 1 else ",".join(map(str, self.layers))


def parse_layers(layer, n_layers: int) -> tuple[int, ...]:
    """`layer` as given in the config: an int, a list of ints, "all", or None (tensors outside the blocks)."""
    if layer is None or layer == "none":
        return ()
    if layer == "all":
        return tuple(range(n_layers))
    items = list(layer) if isinstance(layer, (list, tuple)) or hasattr(layer, "__iter__") and not isinstance(
        layer, str) else [layer]
    layers = []
    for item in items:
        try:
            value = int(item)
        except (TypeError, ValueError):
            raise SweepError(f"layer={item!r} is not a layer number; use an int 0..{n_layers - 1}, "
                             f"a list like [0,1,2], or all") from None
        if not 0 <= value < n_layers or str(item).strip() != str(value):
            raise SweepError(f"layer {item} is out of range: the model has {n_layers} blocks (layers 0..{n_layers - 1})")
        layers.append(value)
    if not layers:
        raise SweepError("layer=[] selects nothing; give a layer number, a list, or all")
    return tuple(dict.fromkeys(layers))


def block_weight_names(info: ModelInfo) -> list[str]:
    """Short names of the weights found in the model's blocks (from the GGUF, not from a list per architecture)."""
    names = {m["base"] for n in info.tensor_types if (m := _BLOCK_WEIGHT.match(n))}
    return sorted(names)


def global_weight_names(info: ModelInfo) -> list[str]:
    return sorted(n.removesuffix(".weight") for n in info.tensor_types if not n.startswith("blk."))


def _tensor_name(prefix: str, short: str, info: ModelInfo) -> str:
    """The GGUF name of a short name: `attn_q` -> `blk.3.attn_q.weight`, `attn_q.bias` -> `blk.3.attn_q.bias`."""
    return f"{prefix}{short}.weight" if f"{prefix}{short}.weight" in info.tensor_types else f"{prefix}{short}"


def block_node_names(node_names: Iterable[str]) -> list[str]:
    """Short names of per-layer graph nodes (`ffn_norm` for `ffn_norm-3`)."""
    return sorted({m["base"] for n in node_names if not _NOT_A_TARGET.search(n) and (m := _LAYER_SUFFIX.match(n))})


def global_node_names(node_names: Iterable[str]) -> list[str]:
    return sorted(n for n in node_names if not _NOT_A_TARGET.search(n) and not _LAYER_SUFFIX.match(n))


def resolve(kind: str, tensor: str, layer, info: ModelInfo, node_names: Iterable[str] | None = None) -> Target:
    """The concrete tensors/nodes for one point of the grid; raises SweepError naming the valid choices."""
    if kind not in KINDS:
        raise SweepError(f"unknown kind={kind!r}; valid: {', '.join(KINDS)}")
    layers = parse_layers(layer, info.n_layers)
    if kind == "weight":
        return _resolve_weight(tensor, layers, info)
    if node_names is None:
        raise ValueError("activation targets need the graph's node names")
    return _resolve_activation(tensor, layers, set(node_names))


def _resolve_weight(tensor: str, layers: tuple[int, ...], info: ModelInfo) -> Target:
    block, outside = block_weight_names(info), global_weight_names(info)
    valid = f"block tensors: {', '.join(block)}; outside the blocks (layer=null): {', '.join(outside)}"
    if tensor in outside and tensor not in block:
        if layers:
            raise SweepError(f"weight {tensor!r} is not in a block: set layer=null for it ({valid})")
        return Target("weight", tensor, (), (_tensor_name("", tensor, info),))
    if tensor not in block:
        hint = ""
        if tensor == "output" and "token_embd.weight" in info.tensor_types:
            hint = " (this model ties its output layer to token_embd: target token_embd)"
        raise SweepError(f"unknown weight tensor {tensor!r} in {info.path.name}{hint}; {valid}")
    if not layers:
        raise SweepError(f"weight {tensor!r} lives in every block: give layer=N, layer=[..] or layer=all")
    names = tuple(_tensor_name(f"blk.{i}.", tensor, info) for i in layers)
    missing = [n for n in names if n not in info.tensor_types]
    if missing:
        raise SweepError(f"{info.path.name} has no tensor {missing[0]}; {valid}")
    return Target("weight", tensor, layers, names)


def _resolve_activation(tensor: str, layers: tuple[int, ...], node_names: set[str]) -> Target:
    block, outside = block_node_names(node_names), global_node_names(node_names)
    valid = f"per-layer nodes: {', '.join(block)}; outside the blocks (layer=null): {', '.join(outside)}"
    if not layers:
        if tensor not in outside:
            raise SweepError(f"unknown graph node {tensor!r} outside the blocks; {valid}")
        return Target("activation", tensor, (), (tensor,))
    names = tuple(f"{tensor}-{i}" for i in layers)
    missing = [n for n in names if n not in node_names]
    if missing:
        raise SweepError(f"the graph has no node {missing[0]!r}; {valid}")
    return Target("activation", tensor, layers, names)
