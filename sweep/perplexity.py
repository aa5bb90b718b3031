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
    return process_window(logits, targets)["nll"]


def process_window(logits: np.ndarray, targets: np.ndarray, keep: np.ndarray | None = None,
                   ref_logits: np.ndarray | None = None, ref_lse: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Everything a window's logits are needed for, in one pass (they are overwritten in place).

    nll: per-token NLL; argmax: the most likely token; lse: log-sum-exp of each row (float64). keep: an array
    that receives the raw logits (a baseline's, for later KL). ref_logits/ref_lse: a baseline's raw logits and
    log-sum-exps for the same positions; then kld = KL(baseline || these logits) per row, computed from the logit
    differences d = z - z' so that tiny divergences are not lost to rounding (q_i = p_i e^-d_i / sum p e^-d):
        KL = sum_i p_i d_i + log1p(sum_i p_i expm1(-d_i)),   p = softmax(z) of the baseline.
    """
    rows = np.arange(len(targets))
    argmax = logits.argmax(axis=1)
    top = logits[rows, argmax]
    out = {"argmax": argmax}
    picked = (logits[rows, targets] - top).astype(np.float64)
    if keep is not None:
        keep[...] = logits
    if ref_logits is not None:
        diff = np.subtract(ref_logits, logits)  # small where the perturbation is small: exact in float32
    logits -= top[:, None]
    np.exp(logits, out=logits)
    log_sum = np.log(logits.sum(axis=1, dtype=np.float64))
    out["nll"] = log_sum - picked
    out["lse"] = top + log_sum
    if ref_logits is not None:
        p = np.exp(ref_logits - ref_lse[:, None].astype(np.float32))
        total = p.sum(axis=1, dtype=np.float64)
        shift = (p * diff).sum(axis=1, dtype=np.float64) / total
        np.expm1(np.negative(diff, out=diff), out=diff)
        spread = (p * diff).sum(axis=1, dtype=np.float64) / total
        out["kld"] = np.maximum(shift + np.log1p(spread), 0.0)  # rounding may leave -1e-15 at equality
    return out


@dataclass(frozen=True)
class Score:
    nll: np.ndarray  # (n_windows, n_scored) per-token negative log-likelihood
    n_ctx: int
    seconds: float
    diverged: str | None = None  # where non-finite logits were first seen; scoring stops there
    argmax: np.ndarray | None = None  # (n_windows, n_scored) most likely token
    lse: np.ndarray | None = None  # (n_windows, n_scored) log-sum-exp of the logits
    logits: np.ndarray | None = None  # (n_windows, n_scored, n_vocab) raw logits, kept for baselines (memmap)
    kld: np.ndarray | None = None  # (n_windows, n_scored) KL(reference || this), when a reference was given

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


def score(backend, windows: Windows, progress: bool = True, desc: str = "scoring", keep_logits=None,
          reference: Score | None = None) -> Score:
    """Score every window on `backend` (whose hooks/weights define the perturbation, if any).

    keep_logits: an array of shape (n_windows, n_scored, n_vocab) (a memmap for a baseline) that receives the
    raw logits. reference: a baseline scored with keep_logits; KL(reference || this run) is then computed.
    """
    mask, targets = windows.output_mask, windows.targets
    n, m = windows.n_windows, windows.n_scored
    nll = np.empty((n, m), dtype=np.float64)
    lse = np.empty((n, m), dtype=np.float64)
    argmax = np.empty((n, m), dtype=np.int32)
    with_kl = reference is not None and reference.logits is not None
    kld = np.empty((n, m), dtype=np.float64) if with_kl else None
    t0 = time.perf_counter()
    bar = tqdm(total=n, desc=desc, unit="win", disable=not progress, leave=False)
    with bar:
        for i, window in enumerate(windows.tokens):
            logits = backend.decode_window(window, mask)
            w = process_window(logits, targets[i], keep_logits[i] if keep_logits is not None else None,
                               reference.logits[i] if with_kl else None, reference.lse[i] if with_kl else None)
            nll[i], lse[i], argmax[i] = w["nll"], w["lse"], w["argmax"]
            if with_kl:
                kld[i] = w["kld"]
            if not np.isfinite(nll[i]).all():  # NaN/inf logits: the rest would only repeat it
                pos = windows.first + int(np.argmin(np.isfinite(nll[i])))
                return Score(nll[: i + 1], windows.n_ctx, time.perf_counter() - t0,
                             diverged=f"non-finite logits in window {i} at position {pos}")
            bar.update()
            bar.set_postfix_str(f"ppl {math.exp(nll[: i + 1].mean()):.4f}")
    return Score(nll, windows.n_ctx, time.perf_counter() - t0, argmax=argmax, lse=lse, logits=keep_logits, kld=kld)
