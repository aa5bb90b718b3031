"""Which stages a sweep's layers call for (prefix reuse: sweep/prefix/reuse.py), planned in seconds and bytes.

A point whose first perturbed block is L decodes blocks S..N-1 of the latest stage S <= L, or all N blocks when no
stage starts at or before L. What reuse saves is block time only: every window still goes through the output head
(half of a window at a 262k vocabulary), the per-window math and the weight's delta, with or without a stage. What a
stage costs (`StageCosts`):
  * its preparation: writing the file (when not on disk yet), probing it once in a child process, loading it;
  * its identity check: one window through its N-S blocks *and* the head;
  * once for all stages: the residuals' own decode of every window, when the baseline is already stored (otherwise
    they are read during the baseline's decode, for free);
and it must fit: the disk (stage files) and the memory (the largest stage, the first, beside the model).
`plan_stages` picks at most `max_stages` starts among the points' first layers that minimise

    sum over points of windows x (N - S) x block_s  +  MARGIN x (identity + preparation) per stage  (+ capture)

exactly, by dynamic programming over the candidate starts (O(C^2 K) for C candidates and K stages). The overheads are
estimates (I/O above all), so a stage must save MARGIN times what it is estimated to cost: reuse is never chosen
where it would only break even.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

MARGIN = 1.5  # a stage must save this many times its estimated overhead


@dataclass(frozen=True)
class StageCosts:
    """Seconds (and the fit in bytes) of prefix reuse on one model, from a timed window or its FLOPs."""

    n_layers: int
    block_s: float  # one block over one window
    head_s: float  # the rest of a window's decode: the output head (and the input)
    prepare_s: Callable[[int], float] = lambda start: 0.0  # write (if not on disk) + probe + load of stage S
    capture_s: float = 0.0  # the residuals' own decode of every window (0: read during the baseline's decode)
    allowed: Callable[[int], bool] = lambda start: True  # a stage llama.cpp can run (stage_check.stage_refusal)
    fits: Callable[[tuple[int, ...]], bool] = lambda starts: True  # the disk and the memory
    source: str = ""  # where the seconds come from, in words

    def identity_s(self, start: int) -> float:
        return (self.n_layers - start) * self.block_s + self.head_s

    def overhead_s(self, start: int) -> float:
        return self.identity_s(start) + self.prepare_s(start)


@dataclass(frozen=True)
class StagePlan:
    starts: tuple[int, ...]
    decode_s: float  # block time the points decode with these stages
    full_s: float  # block time the same points decode without reuse
    overhead_s: float  # the stages' identity windows and preparation, and the residuals' capture
    block_ratio: float = 1.0  # block-windows decoded, as a fraction of the full decodes'
    refused: dict[int, str] = field(default_factory=dict)  # candidate starts left out, and why

    @property
    def saving_s(self) -> float:
        return self.full_s - self.decode_s

    @property
    def net_s(self) -> float:
        return self.saving_s - self.overhead_s


def spread_starts(n_layers: int, n_stages: int) -> tuple[int, ...]:
    """`n_stages` block numbers spread evenly over 1..n_layers-1 (fewer when the model has fewer blocks): the
    stages of a point run without a plan of the whole sweep (the Python API, a lone job)."""
    spread = {round(i * n_layers / (n_stages + 1)) for i in range(1, n_stages + 1)}
    return tuple(sorted(spread & set(range(1, n_layers))))


def decoded_blocks(n_layers: int, points: Mapping[int, float], starts: tuple[int, ...]) -> float:
    """Block-windows the points ({first layer: windows}) decode from `starts`."""
    return float(sum(w * (n_layers - max((s for s in starts if s <= layer), default=0))
                     for layer, w in points.items()))


def plan_stages(points: Mapping[int, float], costs: StageCosts, max_stages: int) -> StagePlan:
    """The cheapest starts for `points` ({first perturbed block: windows decoded by the points that start there})
    among at most `max_stages`, the most stages that `costs.fits` allows; none when no stage pays MARGIN times."""
    n, b = costs.n_layers, costs.block_s
    full_blocks = decoded_blocks(n, points, ())
    cands = sorted(layer for layer in points if 0 < layer < n and costs.allowed(layer))
    # weight[i]: windows of the points from cands[i] up to the next candidate (they share whatever stage serves it)
    weight = [float(sum(w for layer, w in points.items() if c <= layer < (cands[i + 1] if i + 1 < len(cands) else n)))
              for i, c in enumerate(cands)]
    own = [MARGIN * costs.overhead_s(c) for c in cands]
    # best[k][i]: cost of the points from cands[i] on, with a stage at cands[i] and at most k stages in all from
    # there; nxt[k][i]: the next stage's index (None: the last one)
    best: list[list[float]] = [[0.0] * len(cands)]
    nxt: list[list[int | None]] = [[None] * len(cands)]
    for k in range(1, max(max_stages, 0) + 1):
        row: list[float] = [0.0] * len(cands)
        links: list[int | None] = [None] * len(cands)
        for i in reversed(range(len(cands))):
            blocks = n - cands[i]
            tail = 0.0  # the points from cands[i] to the next stage
            row[i], links[i] = own[i] + b * blocks * sum(weight[i:]), None
            for j in range(i + 1, len(cands)):
                tail += weight[j - 1] * blocks * b
                if k > 1 and (c := own[i] + tail + best[k - 1][j]) < row[i]:
                    row[i], links[i] = c, j
        best.append(row)
        nxt.append(links)

    def starts_of(k: int, i: int | None) -> tuple[int, ...]:
        out = []
        while i is not None:
            out.append(cands[i])
            i, k = nxt[k][i], k - 1
        return tuple(out)

    refused = {layer: "llama.cpp cannot run it" for layer in points if 0 < layer < n and not costs.allowed(layer)}
    full_s = full_blocks * b
    first = cands[0] if cands else n
    before_any = b * sum(w * n for layer, w in points.items() if layer < first)  # no stage can serve them
    for k in range(min(max(max_stages, 0), len(cands)), 0, -1):
        head, options = before_any, []
        for i in range(len(cands)):  # the points before the first stage decode every block
            options.append((head + best[k][i], i))
            head += weight[i] * n * b
        cost, i = min(options)
        if cost + MARGIN * costs.capture_s >= full_s:
            break  # no stage pays for itself
        if costs.fits(starts := starts_of(k, i)):
            decode = decoded_blocks(n, points, starts)
            overhead = sum(costs.overhead_s(s) for s in starts) + costs.capture_s
            return StagePlan(starts, decode * b, full_s, overhead, decode / full_blocks if full_blocks else 1.0,
                             refused)
    return StagePlan((), full_s, full_s, 0.0, 1.0, refused)
