"""Which tensor: resolve (kind, tensor, layer) to the exact weight tensors or graph nodes of *this* model.

Everything is validated against what the model really has -- weight names from the GGUF file, node names from
llama.cpp's graph -- so an unknown name is an error listing the valid ones, never a silent no-op.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from ..choices import Kind
from ..errors import SweepError
from ..llama.backend import PROBE_TOKENS, NodeOccurrence
from ..llama.gguf_names import block_name, block_of, in_block
from ..llama.model_file import ModelInfo
from . import experts as moe
from .ggml_types import quantizable
from .indices import parse_indices

_LAYER_SUFFIX = re.compile(r"^(?P<base>.+)-(?P<layer>\d+)$")
# Graph nodes that are not meaningful targets: views/permutes of named nodes, unnamed nodes, KV-cache views.
_NOT_A_TARGET = re.compile(r"\(|^node_\d+$|^cache_|^leaf_")


# An activation target may pick one of several graph nodes that share a name: `Qcur@rope` (by op) or `norm@1`
# (the second computed node of that name, in graph order).
SELECTOR = "@"


@dataclass(frozen=True)
class Target:
    kind: str  # "weight" | "activation"
    tensor: str  # short name as asked: "ffn_norm", "token_embd", "l_out", "Qcur@rope", ...
    layers: tuple[int, ...]  # () for tensors outside the blocks
    names: tuple[str, ...]  # what is touched: GGUF tensor names or graph node names
    # activations: which occurrence of each name (backend.NodeOccurrence.index), and whether that node's rows
    # (its outermost axis) are tokens
    occurrences: tuple[int, ...] = ()
    token_rows: bool = True
    experts: tuple[int, ...] = ()  # MoE: the experts of each stack or expert-row node touched; () the whole stack

    @property
    def nodes(self) -> frozenset[tuple[str, int]]:
        """The (name, occurrence) pairs an activation point replaces (apply.py)."""
        return frozenset(zip(self.names, self.occurrences))

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
    return parse_indices(layer, n_layers, "layer", "a layer number", "[0,1,2]",
                         f"layer {{item}} is out of range: the model has {n_layers} blocks (layers 0..{n_layers - 1})")


def block_weight_names(info: ModelInfo) -> list[str]:
    """Short names of the weights found in the model's blocks (from the GGUF, not from a list per architecture).
    A weight's short name is its GGUF name without the block and without ".weight"; any other tensor keeps its
    suffix (qwen2's `blk.N.attn_q.bias` is `attn_q.bias`), so biases can be targeted too and never pass for weights."""
    names = {in_block(n).removesuffix(".weight") for n in info.tensor_types if block_of(n) is not None}
    return sorted(names)


def global_weight_names(info: ModelInfo) -> list[str]:
    return sorted(n.removesuffix(".weight") for n in info.tensor_types if block_of(n) is None)


def _tensor_name(name: str, info: ModelInfo) -> str:
    """The GGUF name of a short name: `blk.3.attn_q` -> `blk.3.attn_q.weight`, `blk.3.attn_q.bias` as it is."""
    return f"{name}.weight" if f"{name}.weight" in info.tensor_types else name


def block_node_names(node_names: Iterable[str]) -> list[str]:
    """Short names of per-layer graph nodes (`ffn_norm` for `ffn_norm-3`)."""
    return sorted({m["base"] for n in node_names if not _NOT_A_TARGET.search(n) and (m := _LAYER_SUFFIX.match(n))})


def global_node_names(node_names: Iterable[str]) -> list[str]:
    return sorted(n for n in node_names if not _NOT_A_TARGET.search(n) and not _LAYER_SUFFIX.match(n))


def computed(occurrences: Sequence[NodeOccurrence]) -> list[NodeOccurrence]:
    """The occurrences that compute values; a view shares memory with its source, so rounding it rounds twice."""
    return [o for o in occurrences if not o.view]


def specs(base: str, occurrences: Sequence[NodeOccurrence]) -> list[tuple[str, NodeOccurrence]]:
    """How to name each computed node of one name: `base` when it is the only one, else `base@op`, or `base@k`
    where two share an op as well."""
    nodes = computed(occurrences)
    if len(nodes) == 1:
        return [(base, nodes[0])]
    ops = [o.op for o in nodes]
    return [(f"{base}{SELECTOR}{o.op if ops.count(o.op) == 1 else k}", o) for k, o in enumerate(nodes)]


def advertised_nodes(nodes: Mapping[str, Sequence[NodeOccurrence]], layer: int = 0) -> list[tuple[str, NodeOccurrence]]:
    """Every activation target of one block: (spec, occurrence) by name -- the node list of docs/formats.md."""
    return [(spec, o) for base in block_node_names(nodes) if f"{base}-{layer}" in nodes
            for spec, o in specs(base, nodes[f"{base}-{layer}"])]


def resolve(kind: str, tensor: str, layer, info: ModelInfo, nodes: Mapping[str, Sequence[NodeOccurrence]] | None = None,
            expert="all", quantized_only: bool = False) -> Target:
    """The concrete tensors/nodes for one point of the grid; raises SweepError naming the valid choices.

    `nodes`: the graph's nodes by name, each a list of backend.NodeOccurrence (needed for activations);
    `expert`: the experts of a MoE stack (sweep/quant/experts.py); `quantized_only`: `tensor=all` means the tensors
    llama.cpp's quantizer quantizes (a GGUF type's point: norms and routers stay as they are, as in every GGUF)."""
    if kind not in tuple(Kind):
        raise SweepError(f"unknown kind={kind!r}; valid: {', '.join(Kind)}")
    layers = parse_layers(layer, info.n_layers)
    chosen = moe.parse_experts(expert, info)
    if kind == "weight":
        target = _resolve_weight(tensor, layers, info)
        if quantized_only and tensor == ALL:
            target = replace(target, names=tuple(n for n in target.names
                                                 if quantizable(n, info.tensor_shapes.get(n, ()))))
        moe.check_target(kind, tensor, target.names, chosen, info)
        return replace(target, experts=chosen)
    if nodes is None:
        raise ValueError("activation targets need the graph's nodes")
    moe.refuse_integer_node(tensor.partition(SELECTOR)[0], layers, nodes)
    target = _resolve_activation(tensor, layers, nodes)
    moe.check_target(kind, tensor, target.names, chosen, info,
                     [nodes[n][i] for n, i in zip(target.names, target.occurrences)])
    return replace(target, experts=chosen)


# `tensor=all`: every weight tensor of the chosen blocks, or of the whole file with layer=null -- a joint point
# (a recipe's types at once: fmt=recipe) or a whole block at one format.
ALL = "all"


def _resolve_weight(tensor: str, layers: tuple[int, ...], info: ModelInfo) -> Target:
    block, outside = block_weight_names(info), global_weight_names(info)
    valid = (f"block tensors: {', '.join(block)}; outside the blocks (layer=null): {', '.join(outside)}; "
             f"{ALL}: every tensor of the blocks given, or of the file with layer=null")
    if tensor == ALL:
        in_blocks = set(layers)
        names = tuple(n for n in info.tensor_types if not layers or block_of(n) in in_blocks)
        return Target("weight", ALL, layers, names)
    if tensor in outside and tensor not in block:
        if layers:
            raise SweepError(f"weight {tensor!r} is not in a block: set layer=null for it ({valid})")
        return Target("weight", tensor, (), (_tensor_name(tensor, info),))
    if tensor not in block:
        hint = ""
        if tensor == "output" and "token_embd.weight" in info.tensor_types:
            hint = " (this model ties its output layer to token_embd: target token_embd)"
        raise SweepError(f"unknown weight tensor {tensor!r} in {info.path.name}{hint}; {valid}")
    if not layers:
        raise SweepError(f"weight {tensor!r} lives in every block: give layer=N, layer=[..] or layer=all")
    names = tuple(_tensor_name(block_name(i, tensor), info) for i in layers)
    missing = [n for n in names if n not in info.tensor_types]
    if missing:
        raise SweepError(f"{info.path.name} has no tensor {missing[0]}; {valid}")
    return Target("weight", tensor, layers, names)


def _resolve_activation(tensor: str, layers: tuple[int, ...], nodes: Mapping[str, Sequence[NodeOccurrence]]) -> Target:
    base, _, selector = tensor.partition(SELECTOR)
    block, outside = block_node_names(nodes), global_node_names(nodes)
    valid = f"per-layer nodes: {', '.join(block)}; outside the blocks (layer=null): {', '.join(outside)}"
    if not layers:
        if base not in outside:
            raise SweepError(f"unknown graph node {base!r} outside the blocks; {valid}")
        names: tuple[str, ...] = (base,)
    else:
        names = tuple(f"{base}-{i}" for i in layers)
        missing = [n for n in names if n not in nodes]
        if missing:
            raise SweepError(f"the graph has no node {missing[0]!r}; {valid}")
    chosen = [_one_node(base, selector, name, nodes[name]) for name in names]
    # The probe decodes PROBE_TOKENS tokens: a node whose outermost axis has that length has one row per token.
    token_rows = all(len(o.shape) > 1 and o.shape[0] == PROBE_TOKENS for o in chosen)
    return Target("activation", tensor, layers, names, tuple(o.index for o in chosen), token_rows)


def _one_node(base: str, selector: str, name: str, occurrences: Sequence[NodeOccurrence]) -> NodeOccurrence:
    """Exactly one computed node of `name`, as `selector` says; else an error listing the occurrences."""
    options = specs(base, occurrences)
    listed = "; ".join(f"{spec}: {o.describe}" for spec, o in options)
    every = ", ".join(o.describe for o in occurrences)
    if not options:
        raise SweepError(f"graph node {name!r} is only a view ({every}), never rounded: target the node it views "
                         f"instead")
    if not selector:
        if len(options) > 1:
            raise SweepError(f"{len(options)} computed graph nodes are named {name!r} ({listed}); pick one with "
                             f"tensor={options[0][0]} or tensor={base}{SELECTOR}<index> (views are never rounded)")
        return options[0][1]
    nodes = computed(occurrences)
    if selector.isdigit():
        if int(selector) >= len(nodes):
            raise SweepError(f"{base}{SELECTOR}{selector}: {name!r} has {len(nodes)} computed node(s) ({listed})")
        return nodes[int(selector)]
    matching = [o for o in nodes if o.op == selector]
    if len(matching) != 1:
        raise SweepError(f"{base}{SELECTOR}{selector} matches {len(matching)} computed node(s) named {name!r}; "
                         f"valid: {listed}")
    return matching[0]
