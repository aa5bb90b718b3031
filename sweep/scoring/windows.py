"""llama-perplexity's windows (tools/perplexity/perplexity.cpp): the whole text tokenized once, cut into
non-overlapping windows of n_ctx with the tail dropped; when the vocab adds BOS, the first token of each window is
replaced by BOS. Of each window only the second half is scored: the logits of positions n_ctx/2 ... n_ctx-2 predict
tokens n_ctx/2+1 ... n_ctx-1.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..errors import SweepError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Windows:
    tokens: np.ndarray  # (n_windows, n_ctx) int32, BOS already in place when the vocab asks for it
    n_ctx: int

    @property
    def first(self) -> int:
        return self.n_ctx // 2

    @property
    def n_windows(self) -> int:
        return len(self.tokens)

    @property
    def n_scored(self) -> int:
        """Tokens scored per window (255 for n_ctx 512)."""
        return self.n_ctx - 1 - self.first

    @property
    def output_mask(self) -> np.ndarray:
        """Positions whose logits are needed: exactly the scored ones."""
        mask = np.zeros(self.n_ctx, dtype=np.int8)
        mask[self.first:self.n_ctx - 1] = 1
        return mask

    @property
    def targets(self) -> np.ndarray:
        """(n_windows, n_scored) ids of the tokens being predicted."""
        return self.tokens[:, self.first + 1:]


def make_windows(tokens: np.ndarray, n_ctx: int, n_windows: int, bos: int | None) -> Windows:
    """`n_windows` windows of `n_ctx` tokens (all the text gives when n_windows <= 0)."""
    if n_ctx < 4 or n_ctx % 2:
        raise SweepError(f"data.n_ctx={n_ctx} must be an even number of at least 4 (llama.cpp's default is 512)")
    n_max = len(tokens) // n_ctx
    if n_max < 2:
        raise SweepError(f"the text gives {len(tokens)} tokens but 2 windows of data.n_ctx={n_ctx} need "
                         f"{2 * n_ctx}: use a longer text or a smaller data.n_ctx")
    n = n_max if n_windows <= 0 else min(n_windows, n_max)
    if 0 < n_max < n_windows:
        log.warning("data.n_windows=%d but the text has only %d windows of %d tokens; scoring %d",
                    n_windows, n_max, n_ctx, n)
    windows = np.array(tokens[: n * n_ctx], dtype=np.int32).reshape(n, n_ctx)
    if bos is not None:
        windows[:, 0] = bos
    return Windows(windows, n_ctx)
