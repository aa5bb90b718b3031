"""Where a window's decode time goes: through the blocks, or after them (the output head), timed in llama.cpp.

One decode of a window as the scorer decodes it (logits on the scored half), observed at the last block's output
(`l_out-(N-1)`): llama.cpp computes the graph up to that node, calls back, and computes the rest, so the clock read
in the callback splits the decode into the blocks' time and the head's. Observing one node splits the graph once;
its cost is within the noise of a window.
"""

from __future__ import annotations

import time

import numpy as np

from .backend import Backend


def blocks_and_head_seconds(backend: Backend, n_tokens: int) -> tuple[float, float, np.ndarray] | None:
    """(seconds through the blocks, seconds after them, the logits) of one decode of `n_tokens` tokens with logits
    on the scored half, or None when the graph has no `l_out` node for the last block to time at."""
    name = f"l_out-{backend.n_layers - 1}"
    if name not in backend.nodes:
        return None
    n = min(n_tokens, backend.n_ctx)
    mask = np.zeros(n, np.int8)
    mask[n // 2:n - 1] = 1
    tokens = np.full(n, backend.bos if backend.bos >= 0 else 0, np.int32)
    at: list[float] = []
    with backend.observe_nodes({(name, 0)}, lambda _name, _x: at.append(time.perf_counter())):
        t0 = time.perf_counter()
        logits = backend.decode_window(tokens, mask)
        t1 = time.perf_counter()
    if not at:
        return None
    return at[0] - t0, t1 - at[0], logits
