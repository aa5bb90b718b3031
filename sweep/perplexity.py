"""llama-perplexity's protocol (tools/perplexity/perplexity.cpp), on top of the backend.

Tokenize the whole text once; cut it into non-overlapping windows of n_ctx and drop the tail; when the vocab adds
BOS, the first token of each window is replaced by BOS. Of each window only the second half is scored: the logits
of positions n_ctx/2 ... n_ctx-2 predict tokens n_ctx/2+1 ... n_ctx-1. PPL = exp(mean NLL); its standard error is
llama-perplexity's: PPL * sqrt(var(NLL) / (count - 1)).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from .errors import SweepError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Windows:
    tokens: np.ndarray  # (n_windows, n_ctx) int32, BOS already in place when the vocab asks for it
    n_ctx: int
    n_available: int  # tokens the whole text gave

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


def make_windows(tokens: np.ndarray, n_ctx: int, n_chunks: int, bos: int | None) -> Windows:
    """`n_chunks` windows of `n_ctx` tokens (all the text gives when n_chunks <= 0)."""
    if n_ctx < 4 or n_ctx % 2:
        raise SweepError(f"data.n_ctx={n_ctx} must be an even number of at least 4 (llama.cpp's default is 512)")
    n_max = len(tokens) // n_ctx
    if n_max < 2:
        raise SweepError(f"the text gives {len(tokens)} tokens but 2 windows of data.n_ctx={n_ctx} need "
                         f"{2 * n_ctx}: use a longer text or a smaller data.n_ctx")
    n = n_max if n_chunks <= 0 else min(n_chunks, n_max)
    if 0 < n_max < n_chunks:
        log.warning("data.n_chunks=%d but the text has only %d windows of %d tokens; scoring %d",
                    n_chunks, n_max, n_ctx, n)
    windows = np.array(tokens[: n * n_ctx], dtype=np.int32).reshape(n, n_ctx)
    if bos is not None:
        windows[:, 0] = bos
    return Windows(windows, n_ctx, len(tokens))


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row, as llama-perplexity computes it: max-shifted in float32,
    exponentials summed in float64. Works in place: `logits` (llama.cpp's output buffer) is overwritten."""
    top = logits.max(axis=1)
    picked = (logits[np.arange(len(targets)), targets] - top).astype(np.float64)
    logits -= top[:, None]
    np.exp(logits, out=logits)
    return np.log(logits.sum(axis=1, dtype=np.float64)) - picked


@dataclass(frozen=True)
class Score:
    nll: np.ndarray  # (n_windows, n_scored) per-token negative log-likelihood
    n_ctx: int
    seconds: float
    diverged: str | None = None  # where non-finite logits were first seen; scoring stops there

    @property
    def n_windows(self) -> int:
        return self.nll.shape[0]

    @property
    def n_tokens(self) -> int:
        return self.nll.size

    @property
    def ppl(self) -> float:
        return math.exp(float(self.nll.mean()))

    @property
    def ppl_stderr(self) -> float:
        v = self.nll.ravel()
        var = float(np.mean(v * v) - np.mean(v) ** 2)
        return self.ppl * math.sqrt(var / (v.size - 1)) if var > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Tokens decoded (whole windows) per second of scoring."""
        return self.n_windows * self.n_ctx / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        return (f"PPL = {self.ppl:.4f} ± {self.ppl_stderr:.5f} "
                f"({self.n_windows} windows, {self.n_tokens} tokens, {self.n_ctx} ctx)")


def score(backend, windows: Windows, progress: bool = True, desc: str = "scoring") -> Score:
    """Score every window on `backend` (whose hooks/weights define the perturbation, if any)."""
    mask, targets = windows.output_mask, windows.targets
    nll = np.empty((windows.n_windows, windows.n_scored), dtype=np.float64)
    t0 = time.perf_counter()
    bar = tqdm(total=windows.n_windows, desc=desc, unit="win", disable=not progress, leave=False)
    with bar:
        for i, window in enumerate(windows.tokens):
            logits = backend.decode_window(window, mask)
            nll[i] = token_nll(logits, targets[i])
            if not np.isfinite(nll[i]).all():  # NaN/inf logits: the rest would only repeat it
                pos = windows.first + int(np.argmin(np.isfinite(nll[i])))
                return Score(nll[: i + 1], windows.n_ctx, time.perf_counter() - t0,
                             diverged=f"non-finite logits in window {i} at position {pos}")
            bar.update()
            bar.set_postfix_str(f"ppl {math.exp(nll[: i + 1].mean()):.4f}")
    return Score(nll, windows.n_ctx, time.perf_counter() - t0)
