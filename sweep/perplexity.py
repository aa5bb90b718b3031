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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import cache

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


def _split(n_rows: int, parts: int) -> list[slice]:
    edges = np.linspace(0, n_rows, max(1, min(parts, n_rows)) + 1).astype(int)
    return [slice(lo, hi) for lo, hi in zip(edges[:-1], edges[1:])]


class WindowMath:
    """Everything a window's logits are needed for, computed over row blocks on `threads` threads.

    Per window the work is a handful of passes over n_scored x n_vocab floats (50 MB for SmolLM2); numpy releases
    the GIL on them, so the blocks run in parallel while llama.cpp's threads are idle between decodes. Scratch
    buffers are allocated once and reused: a fresh 50 MB array costs ~12k page faults, more than the math on it.
    """

    def __init__(self, threads: int = 1):
        self.threads = max(1, threads)
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        self._scratch: dict[str, np.ndarray] = {}

    def _buffer(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        buf = self._scratch.get(name)
        if buf is None or buf.shape != shape:
            buf = self._scratch[name] = np.empty(shape, dtype=np.float32)
        return buf

    def __call__(self, logits: np.ndarray, targets: np.ndarray, keep: np.ndarray | None = None,
                 ref_logits: np.ndarray | None = None, ref_lse: np.ndarray | None = None,
                 ref_nll: np.ndarray | None = None) -> dict[str, np.ndarray]:
        n = len(targets)
        out = {"argmax": np.empty(n, np.int64), "nll": np.empty(n), "lse": np.empty(n)}
        if ref_logits is not None:
            out["kld"] = np.empty(n)
            diff, p = self._buffer("diff", logits.shape), self._buffer("p", logits.shape)
        blocks = _split(n, self.threads)

        def block(r: slice) -> None:
            parts = {k: v[r] for k, v in out.items()}
            if ref_logits is None:
                _window_block(logits[r], targets[r], parts, keep[r] if keep is not None else None)
            else:
                _window_block(logits[r], targets[r], parts, keep[r] if keep is not None else None,
                              ref_logits[r], ref_lse[r], ref_nll[r], diff[r], p[r])

        if self._pool is None or len(blocks) == 1:
            block(blocks[0])
        else:
            for f in [self._pool.submit(block, r) for r in blocks]:
                f.result()
        return out


@cache
def _block(n: int) -> int:
    """The largest divisor of n up to 512: row sums are taken in blocks of it (see _row_dot)."""
    return next(b for b in range(min(n, 512), 0, -1) if n % b == 0)


def _row_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sum(a * b) per row, in float64. Float32 partial sums over short blocks (as fast as one einsum over the row)
    keep rounding ~1e-7 relative where accumulating a whole 49k-long row in float32 drifts to ~1e-5."""
    bs = _block(a.shape[1])
    partial = np.einsum("ij,ij->i", a.reshape(-1, bs), b.reshape(-1, bs))
    return partial.reshape(a.shape[0], -1).sum(axis=1, dtype=np.float64)


@cache
def window_math(threads: int) -> WindowMath:
    """One per thread count and process, so its scratch buffers serve every point."""
    return WindowMath(threads)


def _window_block(z, targets, out, keep=None, ref=None, ref_lse=None, ref_nll=None, diff=None, p=None) -> None:
    """Rows of one window; `z` (llama.cpp's output buffer) is overwritten.

    Without a reference, nll is llama-perplexity's: max-shifted float32 exponentials summed in float64.
    With one (a baseline's raw logits y, their log-sum-exps and NLLs), everything paired comes from the logit
    differences d = z - y, which are small where the perturbation is small, so tiny changes are not lost to
    rounding. With p = softmax(y), q = p e^d / Z:
        KL = log Z - u,   ΔNLL = log Z - d[target],   u = sum p d,   log Z = log1p(u + v),
        v = sum p (expm1(d) - d) >= 0.
    An error in u enters KL only times (u + v), and v is a sum of non-negative terms, so float32 products summed
    in short blocks suffice.
    Where p underflows for tokens that the run makes likely, log1p(u + v) misses their mass; there (and only
    for large divergences, where cancellation is harmless) log Z = lse(z) - lse(y) is used instead.
    """
    rows = np.arange(len(targets))
    argmax = z.argmax(axis=1)
    top = z[rows, argmax]
    picked = z[rows, targets].astype(np.float64) - top
    if keep is not None:
        keep[...] = z
    if ref is not None:
        np.subtract(z, ref, out=diff)
    z -= top[:, None]
    np.exp(z, out=z)
    # With a reference, lse only serves large divergences: a float32 sum (~1e-7 relative) is three times faster.
    log_sum = np.log(z.sum(axis=1, dtype=np.float64) if ref is None else z.sum(axis=1).astype(np.float64))
    out["argmax"][...] = argmax
    out["lse"][...] = top + log_sum
    if ref is None:
        out["nll"][...] = log_sum - picked
        return
    np.subtract(ref, ref_lse[:, None].astype(np.float32), out=p)
    np.exp(p, out=p)
    u = _row_dot(p, diff)
    work = z  # z is spent: reuse its memory
    with np.errstate(over="ignore", invalid="ignore"):
        np.expm1(diff, out=work)
        work -= diff
        v = _row_dot(p, work)
        fine = np.log1p(u + v)
    coarse = out["lse"] - ref_lse
    log_z = np.where(np.abs(fine - coarse) < 1e-4, fine, coarse)
    out["kld"][...] = np.maximum(log_z - u, 0.0)  # rounding may leave -1e-15 at equality
    out["nll"][...] = ref_nll + (log_z - diff[np.arange(len(targets)), targets])


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
    stopped_early: bool = False  # scoring stopped before the last window because the question was settled

    @property
    def n_windows(self) -> int:
        return self.nll.shape[0]

    def first(self, k: int) -> Score:
        """The score of the first k windows (a baseline, paired with a run that stopped early)."""
        if k >= self.n_windows:
            return self
        cut = {f: getattr(self, f)[:k] for f in ("argmax", "lse", "kld") if getattr(self, f) is not None}
        return replace(self, nll=self.nll[:k], logits=None, **cut)

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
          reference: Score | None = None, settled: Callable[[Score], bool] | None = None) -> Score:
    """Score every window on `backend` (whose hooks/weights define the perturbation, if any).

    keep_logits: an array of shape (n_windows, n_scored, n_vocab) (a memmap for a baseline) that receives the
    raw logits. reference: a baseline scored with keep_logits; KL(reference || this run) is then computed.
    settled: asked after each window with the score so far; True stops scoring there (early stopping).
    """
    mask, targets = windows.output_mask, windows.targets
    process_window = window_math(backend.n_threads)
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
                               *((reference.logits[i], reference.lse[i], reference.nll[i]) if with_kl else ()))
            nll[i], lse[i], argmax[i] = w["nll"], w["lse"], w["argmax"]
            if with_kl:
                kld[i] = w["kld"]
            if not np.isfinite(nll[i]).all():  # NaN/inf logits: the rest would only repeat it
                pos = windows.first + int(np.argmin(np.isfinite(nll[i])))
                return Score(nll[: i + 1], windows.n_ctx, time.perf_counter() - t0,
                             diverged=f"non-finite logits in window {i} at position {pos}")
            bar.update()
            bar.set_postfix_str(f"ppl {math.exp(nll[: i + 1].mean()):.4f}")
            if settled is not None and i + 1 < n:
                so_far = Score(nll[: i + 1], windows.n_ctx, time.perf_counter() - t0, argmax=argmax[: i + 1],
                               lse=lse[: i + 1], kld=kld[: i + 1] if with_kl else None, stopped_early=True)
                if settled(so_far):
                    log.info("%s: settled after %d of %d windows", desc, i + 1, n)
                    return so_far
    return Score(nll, windows.n_ctx, time.perf_counter() - t0, argmax=argmax, lse=lse, logits=keep_logits, kld=kld)
