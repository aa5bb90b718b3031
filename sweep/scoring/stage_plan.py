"""Which stages a sweep's layers call for (prefix reuse: sweep/scoring/prefix.py).

A point whose first perturbed block is L decodes blocks S..N-1 of the latest stage S <= L, or all N blocks when no
stage starts at or before L. A stage costs its identity check (one window through its N-S blocks) and its load
(measured on SmolLM2's F32 stages: about as long again), so a stage pays only where enough points follow it.
`plan_stages` picks at most `max_stages` starts among the points' first layers that minimise the decoding, in
block-windows (one block over one window):

    sum over points of windows x (N - S)  +  STAGE_COST_WINDOWS x (N - S) per stage,

exactly, by dynamic programming over the candidate starts (O(C^2 K) for C candidates and K stages). The output
layer's share is the same for every point and does not move the choice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

STAGE_COST_WINDOWS = 2  # a stage's identity window + its load, in windows through its blocks


@dataclass(frozen=True)
class StagePlan:
    starts: tuple[int, ...]
    cost: float  # block-windows decoded by the points plus the stages' identity checks and loads
    full_cost: float  # block-windows the same points decode without reuse

    @property
    def ratio(self) -> float:
        return self.cost / self.full_cost if self.full_cost else 1.0


def spread_starts(n_layers: int, n_stages: int) -> tuple[int, ...]:
    """`n_stages` block numbers spread evenly over 1..n_layers-1 (fewer when the model has fewer blocks): the
    stages of a point run without a plan of the whole sweep (the Python API, a lone job)."""
    spread = {round(i * n_layers / (n_stages + 1)) for i in range(1, n_stages + 1)}
    return tuple(sorted(spread & set(range(1, n_layers))))


def plan_stages(n_layers: int, points: Mapping[int, float], max_stages: int,
                fits: Callable[[tuple[int, ...]], bool] = lambda starts: True) -> StagePlan:
    """The cheapest starts for `points` ({first perturbed block: windows decoded by the points that start there})
    among at most `max_stages`, the most stages whose files `fits` (the disk) allows."""
    n = n_layers
    full_cost = float(sum(w * n for w in points.values()))
    cands = sorted(layer for layer in points if 0 < layer < n)
    weight = [float(points[c]) for c in cands]
    # best[k][i]: cost of the points from cands[i] on, with a stage at cands[i] and at most k stages in all from
    # there; nxt[k][i]: the next stage's index (None: the last one)
    best: list[list[float]] = [[0.0] * len(cands)]
    nxt: list[list[int | None]] = [[None] * len(cands)]
    for k in range(1, max(max_stages, 0) + 1):
        row, links = [0.0] * len(cands), [None] * len(cands)
        for i in reversed(range(len(cands))):
            blocks = n - cands[i]
            own, tail = STAGE_COST_WINDOWS * blocks, 0.0  # tail: the points from cands[i] to the next stage
            row[i], links[i] = own + blocks * sum(weight[i:]), None
            for j in range(i + 1, len(cands)):
                tail += weight[j - 1] * blocks
                if k > 1 and (c := own + tail + best[k - 1][j]) < row[i]:
                    row[i], links[i] = c, j
        best.append(row)
        nxt.append(links)

    def starts_of(k: int, i: int) -> tuple[int, ...]:
        out = []
        while i is not None:
            out.append(cands[i])
            i, k = nxt[k][i], k - 1
        return tuple(out)

    before_any = float(sum(w * n for layer, w in points.items() if layer not in cands))  # layer 0: no stage there
    for k in range(min(max(max_stages, 0), len(cands)), 0, -1):
        head, options = before_any, []
        for i in range(len(cands)):  # the points before the first stage decode every block
            options.append((head + best[k][i], i))
            head += weight[i] * n
        cost, i = min(options)
        if cost >= full_cost:
            break  # no stage pays for itself
        if fits(starts := starts_of(k, i)):
            return StagePlan(starts, cost, full_cost)
    return StagePlan((), full_cost, full_cost)

