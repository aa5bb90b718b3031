"""The `expert` axis of a Mixture-of-Experts model: one expert of a layer as the target, and what cannot be one.

A MoE block stores its experts as 3-D stacks (`ffn_{gate,up,down}_exps`: experts x rows x columns) and computes
per-expert activations as tokens x selected experts x features (`ffn_moe_gate`, `ffn_moe_down`, ...: row (t, j)
belongs to the j-th expert selected for token t). `expert=K` applies the format to slice K of a stack, or to the
activation rows routed to expert K in that very decode (sweep/llama/routing.py reads the routing); a granularity
is per expert (a per-tensor scale of one expert is that expert's). Nothing here is per architecture: stacks are found
by shape (3-D, one matrix per expert of `<arch>.expert_count`), expert rows by the probe's node shapes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from omegaconf import OmegaConf

from ..errors import SweepError
from ..llama.backend import PROBE_TOKENS, NodeOccurrence
from ..llama.ggml_tensor import GGML_TYPE_F32
from ..llama.gguf_names import in_block
from ..llama.model_file import ModelInfo
from .ggml_types import is_ggml, quantizable
from .indices import parse_indices

if TYPE_CHECKING:
    from .formats import Format

ALL, EACH = "all", "each"
# The float nodes that decide the routing, in graph order (llama-graph.cpp, build_moe_ffn): what to target instead of
# the integer expert ids.
ROUTING_FLOAT_NODES = ("ffn_moe_logits", "ffn_moe_logits_biased", "ffn_moe_probs", "ffn_moe_probs_biased",
                       "ffn_moe_probs_masked")
_LAYER = re.compile(r"-(\d+)$")


def parse_experts(expert, info: ModelInfo) -> tuple[int, ...]:
    """`expert` as configured: "all" (the whole stack: ()), an int, or a list of ints, each < expert_count."""
    if OmegaConf.is_config(expert):
        expert = OmegaConf.to_object(expert)
    if expert is None or expert == ALL:
        return ()
    if expert == EACH:
        raise SweepError("expert=each cannot be combined with this sweep; give the experts explicitly")
    if not info.n_experts:
        raise SweepError(f"expert={expert} needs a Mixture-of-Experts model; {info.path.name} ({info.arch}) has no "
                         f"{info.arch}.expert_count: drop expert=")
    return parse_indices(expert, info.n_experts, "expert", "an expert number", "[0,1]",
                         f"expert {{item}} is out of range: {info.path.name} has {info.n_experts} experts per layer "
                         f"(experts 0..{info.n_experts - 1})", also="each, ")


def label(experts: tuple[int, ...]) -> str:
    return ALL if not experts else ",".join(map(str, experts))


def is_expert_stack(name: str, info: ModelInfo) -> bool:
    """A weight holding one matrix per expert: 3-D, its outermost ggml dimension the model's expert count."""
    ne = info.tensor_shapes.get(name, ())
    return bool(info.n_experts) and len(ne) == 3 and ne[2] == info.n_experts


def expert_row_node(occurrence: NodeOccurrence, info: ModelInfo) -> bool:
    """An activation whose rows belong to experts: tokens x selected experts x features in the probe."""
    shape = occurrence.shape
    return bool(info.n_experts_used) and len(shape) == 3 and shape[0] == PROBE_TOKENS and \
        shape[1] == info.n_experts_used and occurrence.name.startswith("ffn_moe_")


def check_target(kind: str, tensor: str, names: Sequence[str], experts: tuple[int, ...], info: ModelInfo,
                 occurrences: Sequence[NodeOccurrence] = ()) -> None:
    """expert=K on a tensor that has no experts: one line naming the ones that do."""
    if not experts:
        return
    if kind == "weight":
        bad = [n for n in names if not is_expert_stack(n, info)]
        stacks = sorted({in_block(n).removesuffix(".weight") for n in info.tensor_types
                         if is_expert_stack(n, info)})
        if bad:
            raise SweepError(f"expert={label(experts)}: weight {tensor!r} ({bad[0]}) is not a stack of experts; "
                             f"expert stacks of {info.path.name}: {', '.join(stacks)} (or drop expert=)")
    else:
        rowless = [o for o in occurrences if not expert_row_node(o, info)]
        if rowless:
            raise SweepError(f"expert={label(experts)}: graph node {rowless[0].name!r} ({rowless[0].describe}) has no "
                             f"rows per expert; nodes that do are tokens x {info.n_experts_used} selected experts x "
                             f"features, e.g. ffn_moe_gate, ffn_moe_up, ffn_moe_down (or drop expert=)")


def refuse_integer_node(base: str, layers: tuple[int, ...], nodes: Mapping[str, Sequence[NodeOccurrence]]) -> None:
    """A node of integer expert ids (argsort, top-k) cannot be rounded: refused with the float nodes that decide
    the routing, before the view check would point from the top-k view to its integer argsort. `base`: the node's
    name without its `@` selector."""
    for name in ([f"{base}-{i}" for i in layers] or [base]):
        occurrences = nodes.get(name, ())
        if occurrences and all(o.ggml_type != GGML_TYPE_F32 for o in occurrences):
            layer = _LAYER.search(name)
            floats = [n for n in ROUTING_FLOAT_NODES if not layer or f"{n}-{layer.group(1)}" in nodes]
            raise SweepError(f"graph node {name!r} holds integer expert ids ({occurrences[0].describe}), not values "
                             f"that can be rounded: the routing is decided by the float nodes "
                             f"{', '.join(floats)} -- target those (e.g. tensor={floats[0]})")


def refuse_unquantized_type(fmt: Format, names: Sequence[str], info: ModelInfo) -> None:
    """A GGUF type on a tensor llama.cpp's quantizer keeps as it is (routers, norms, 1-D tensors: the rule of
    ggml_types.quantizable): its size in that type would be false, so it is refused before any job."""
    if not is_ggml(fmt.name):
        return
    kept = [n for n in names if n in info.tensor_shapes and not quantizable(n, info.tensor_shapes[n])]
    if kept:
        raise SweepError(f"fmt={fmt.name} on {kept[0]}: llama.cpp's quantizer never stores this tensor as {fmt.name} "
                         f"(it keeps routers, norms and 1-D tensors in their source type, here "
                         f"{info.tensor_types[kept[0]]}); measure it with a float format such as fmt=bf16, or leave "
                         f"it out")


def round_experts(original: np.ndarray, experts: tuple[int, ...], own: Format, name: str, threads: int) -> np.ndarray:
    """The stack with slices `experts` in the format and the others untouched. A GGUF type is applied to the whole
    stack and the slices taken (ggml quantizes row by row, with the imatrix row of each expert: exactly what it
    stores for that expert); any other format to each slice alone, so its scales are that expert's."""
    rounded = original.copy()
    if is_ggml(own.name):
        whole = own(original, tensor=name, threads=threads)
        for k in experts:
            rounded[k] = whole[k]
    else:
        for k in experts:
            rounded[k] = own(original[k].copy(), tensor=name, threads=threads)
    return rounded


def round_expert_rows(x: np.ndarray, ids: np.ndarray, experts: tuple[int, ...],
                      fmt: Format) -> tuple[np.ndarray, np.ndarray]:
    """An activation of tokens x selected experts x features with the rows routed to each expert of `experts`
    rounded, expert by expert (a per-tensor scale is that expert's); `ids` the decode's selected ids (tokens x
    n_used). Returns the new array and the mask of the rows touched."""
    if ids.shape != x.shape[:2]:
        raise SweepError(f"the routing read ({'x'.join(map(str, ids.shape))}) does not match the node's rows "
                         f"({'x'.join(map(str, x.shape[:2]))})")
    y, touched = x.copy(), np.zeros(ids.shape, dtype=bool)
    for k in experts:
        rows = ids == k
        if rows.any():
            y[rows] = fmt(np.ascontiguousarray(x[rows]))
            touched |= rows
    return y, touched


def layer_of(node_name: str) -> int:
    """The layer of a per-layer node (`ffn_moe_gate-3` -> 3)."""
    m = _LAYER.search(node_name)
    if m is None:
        raise ValueError(f"graph node {node_name!r} is not per layer (no -N suffix)")
    return int(m.group(1))
