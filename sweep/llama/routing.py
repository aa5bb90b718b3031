"""Which experts the scored tokens used: llama.cpp's own routing decision, read during the decode.

A MoE block (llama.cpp src/llama-graph.cpp, build_moe_ffn) computes the router's probabilities (`ffn_moe_probs-N`,
float, tokens x experts), sorts them (`ffn_moe_argsort-N`, integer expert ids, best first) and keeps the first
expert_used_count ids of each token (`ffn_moe_topk-N`, a view of the argsort). Both nodes are read through the eval
callback (a node observer, `Backend.observe_nodes` in sweep/llama/observe.py), so the counts are those of the decode
that was scored -- with the point's perturbation applied -- not a re-computation.

Only scored tokens count (the logit mask of the window: positions n_ctx/2 .. n_ctx-2); in the last block llama.cpp
computes only those rows, elsewhere every token's row, and the mask picks the scored ones.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

ARGSORT, PROBS = "ffn_moe_argsort", "ffn_moe_probs"
_ROUTING_NODE = re.compile(rf"^(?P<base>{ARGSORT}|{PROBS})-(?P<layer>\d+)$")


class RoutingTracker:
    """The routing of every decode while installed: `current[layer]` holds the expert ids, best first (tokens x
    experts; the first n_used are the selected ones), of the decode in progress (what a per-expert activation point
    needs), and the scored tokens' ids and router probabilities are collected per layer, in decode order, for the
    record."""

    def __init__(self, n_used: int):
        self.n_used = n_used
        self.current: dict[int, np.ndarray] = {}  # layer -> expert ids best first, every computed row, this decode
        self.selected: dict[int, list[np.ndarray]] = {}  # layer -> [scored rows x n_used] per scored decode
        self.probs: dict[int, list[np.ndarray]] = {}  # layer -> [scored rows x n_experts] per scored decode
        self.window_experts: dict[int, set[int]] = {}  # layer -> experts selected by any computed row (counted)
        self.counting = True

    def wants(self, name: str) -> bool:
        return _ROUTING_NODE.match(name) is not None

    def __call__(self, name: str, data: np.ndarray, output_mask: np.ndarray | None) -> None:
        m = _ROUTING_NODE.match(name)
        if m is None:  # the backend hands over only the nodes it `wants`
            raise ValueError(f"graph node {name!r} is not a routing node")
        layer = int(m["layer"])
        rows = data.reshape(data.shape[0], -1) if data.ndim > 1 else data.reshape(1, -1)
        if m["base"] == ARGSORT:
            self.current[layer] = rows
        if output_mask is None or not self.counting:
            return
        scored = _scored_rows(rows, output_mask)
        if m["base"] == ARGSORT:
            self.window_experts.setdefault(layer, set()).update(np.unique(rows[:, :self.n_used]).tolist())
            self.selected.setdefault(layer, []).append(np.sort(scored[:, :self.n_used], axis=1))
        else:
            self.probs.setdefault(layer, []).append(scored.astype(np.float64))

    def layer_ids(self, layer: int) -> np.ndarray | None:
        """Selected expert ids of every scored token of `layer` (tokens x n_used, each row sorted), or None."""
        parts = self.selected.get(layer)
        return np.concatenate(parts) if parts else None

    def summary(self, layers, experts) -> dict:
        """Per layer, per expert: scored tokens routed to it and its share of the router weight given to the
        selected experts (its probability where selected, over the sum of the selected experts' probabilities)."""
        out = {}
        for layer in layers:
            ids = self.layer_ids(layer)
            if ids is None:
                continue
            probs = np.concatenate(self.probs[layer]) if self.probs.get(layer) else None
            chosen = np.take_along_axis(probs, ids, axis=1) if probs is not None else None
            total = float(chosen.sum()) if chosen is not None else 0.0
            out[str(layer)] = {str(k): {"routed_tokens": int((ids == k).any(axis=1).sum()),
                                        "router_share": float(chosen[ids == k].sum() / total)
                                        if chosen is not None and total else None}
                               for k in experts}
        return out


def _scored_rows(rows: np.ndarray, output_mask: np.ndarray) -> np.ndarray:
    if rows.shape[0] == len(output_mask):
        return rows[output_mask.astype(bool)]
    return rows  # the last block: only the rows that produce logits were computed


@contextmanager
def tracking(backend, n_used: int, counting: bool = True) -> Iterator[RoutingTracker]:
    """Within the block, `backend` reports its routing to the tracker yielded (`counting`: False keeps only the
    decode in progress's ids, `current`). Trackers stack: each one sees every decode of its block."""
    tracker = RoutingTracker(n_used)
    tracker.counting = counting
    with backend.observe_nodes(tracker.wants, lambda name, data: tracker(name, data, backend.output_mask)):
        yield tracker


def changed_tokens(run: RoutingTracker, base: RoutingTracker) -> tuple[dict[int, int], int]:
    """Scored tokens whose set of selected experts differs from the baseline's, per layer and in any layer (the
    same windows in order; a run stopped early is compared on its windows). Rows are scored tokens in every layer,
    so they line up across layers."""
    per_layer, any_layer = {}, None
    for layer in sorted(run.selected):
        a, b = run.layer_ids(layer), base.layer_ids(layer)
        if a is None or b is None:
            continue
        n = min(len(a), len(b))
        differs = (a[:n] != b[:n]).any(axis=1)
        per_layer[layer] = int(differs.sum())
        any_layer = differs if any_layer is None else any_layer[:n] | differs[:len(any_layer)]
    return per_layer, int(any_layer.sum()) if any_layer is not None else 0


def routing_columns(summary: dict, changed: tuple[dict[int, int], int] | None, n_scored: int) -> dict:
    """The record's routing columns: the whole summary (JSON), and scalars over the targeted layers and experts --
    tokens routed to each targeted expert (summed over experts and layers: for one expert of one layer, its count),
    the targeted experts' router share (mean over layers), and the scored tokens whose selected experts changed in
    any layer (absent without a comparison)."""
    if not summary:
        return {}
    routed = sum(int(np.sum([e["routed_tokens"] for e in per.values()])) for per in summary.values())
    shares = [sum(e["router_share"] or 0.0 for e in per.values()) for per in summary.values()]
    cols = {"routing": json.dumps(summary, sort_keys=True), "routed_tokens": routed,
            "router_share": float(np.mean(shares)), "scored_tokens": n_scored}
    if changed is not None:
        per_layer, any_layer = changed
        cols["routing_changed"] = any_layer
        cols["routing_changed_by_layer"] = json.dumps({str(k): v for k, v in sorted(per_layer.items())})
    return cols


def baseline_routing(session, backend, windows, matched: tuple[str, ...], n_used: int) -> RoutingTracker:
    """The unperturbed routing of the scored windows on `backend`: decoded once per loaded model (and matched
    copy), kept with the session (nothing of a session outlives it, sweep/pipeline/session.py)."""
    key = (str(backend.path), tuple(sorted(matched)), windows.n_ctx, windows.n_windows)
    if key not in session.routing:
        with tracking(backend, n_used) as tracker:
            for window in windows.tokens:
                backend.decode_window(window, windows.output_mask)
        session.routing[key] = tracker
    return session.routing[key]


def never_routed(base: RoutingTracker, target) -> str | None:
    """A weight point whose experts no token of the scored windows selects, context tokens included (in the
    unperturbed model: a layer's routing is decided before its experts run, so a perturbed expert of that layer
    cannot change it, and an expert no row uses computes nothing that is read): why it is a no-op, or None."""
    if target.kind != "weight" or not target.experts or any(layer not in base.window_experts
                                                              for layer in target.layers):
        return None
    if any(k in base.window_experts[layer] for layer in target.layers for k in target.experts):
        return None
    return (f"expert {','.join(map(str, target.experts))} of layer {target.layer_label} is never selected by any "
            f"token of the scored windows (routed_tokens 0): its weights cannot change the output")
