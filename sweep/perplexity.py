"""llama-perplexity's protocol (tools/perplexity/perplexity.cpp), on top of the backend.

Tokenize the whole text once; cut it into non-overlapping windows of n_ctx and drop the tail; when the vocab adds
BOS, the first token of each window is replaced by BOS. Of each window only the second half is scored: the logits
of positions n_ctx/2 ... n_ctx-2 predict tokens n_ctx/2+1 ... n_ctx-1. PPL = exp(mean NLL); its standard error is
llama-perplexity's: PPL * sqrt(var(NLL) / (count - 1)).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from math import exp, sqrt

import numpy as np
from tqdm.auto import tqdm

from .errors import SweepError

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


def _split(n_rows: int, parts: int) -> list[slice]:
    edges = np.linspace(0, n_rows, max(1, min(parts, n_rows)) + 1).astype(int)
    return [slice(lo, hi) for lo, hi in zip(edges[:-1], edges[1:])]


# Rows are processed in chunks of about this many floats per array, so that the chunk's arrays (the logits, their
# differences, the baseline's probabilities and a work array) stay in cache across the passes over it.
CHUNK_FLOATS = 1 << 18

# Row sums are taken in float32 over blocks of at most this many elements, then in float64 (_row_dot, _row_sum).
SUM_BLOCK = 512

# Where max(d) - sum(p d) stays below this, the tokens whose baseline probability underflows float32 (log-prob
# below -87) carry at most n_vocab * exp(-87 + 40) ~ 1e-15 of the run's mass: the paired form is then exact.
_UNDERFLOW_MARGIN = 40.0

# float32 expm1 overflows above ~88.7: rows where a logit grew by this much or more against the baseline take the
# log-sum-exps instead.
_EXPM1_LIMIT = 80.0

# Exponentials without the max- or lse-shift (a pass fewer, see _window_rows and _paired_rows) where the row's
# shift lies in [0, this]: e^x <= e^shift never overflows float32; with max d below this too, a product
# e^y (e^d - 1 - d) stays below e^(2 * this) and a float32 block sum of 512 of them below float32's max (e^88.7);
# the tokens whose e^x underflows (x < -87) are more than 87 below the shift: what they miss is ~1e-38 per token,
# as with the shift.
_UNSHIFTED_LIMIT = 40.0


class StoredLogits:
    """A stored baseline's logits (an .npy file), read a block of rows at a time into the caller's buffer.

    Reading with pread instead of through a memory map keeps the page cache out of the process: mapped pages of a
    1 GB baseline count in its resident set, copies into one reused buffer do not.
    """

    def __init__(self, array: np.memmap):
        self.path, self.offset, self.shape = str(array.filename), int(array.offset), array.shape
        self._fd = os.open(self.path, os.O_RDONLY)

    def __getitem__(self, i: int) -> _WindowRows:
        return _WindowRows(self, i)

    def will_need(self, i: int) -> None:
        """Ask the kernel to start reading window i into the page cache now (asynchronously): called before the
        window's decode, a baseline that is not cached (a large one, or the first point after a reboot) is read
        from disk while llama.cpp computes, not while the math waits for it."""
        window = 4 * self.shape[1] * self.shape[2]
        os.posix_fadvise(self._fd, self.offset + i * window, window, os.POSIX_FADV_WILLNEED)

    def read(self, i: int, rows: slice, out: np.ndarray) -> np.ndarray:
        n_vocab = self.shape[2]
        start = self.offset + 4 * n_vocab * (i * self.shape[1] + rows.start)
        view = out[: rows.stop - rows.start]
        got = os.preadv(self._fd, [memoryview(view).cast("B")], start)
        if got != view.nbytes:
            raise SweepError(f"{self.path} is truncated: a stored baseline must be recomputed (delete it)")
        return view

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


@dataclass(frozen=True)
class _WindowRows:
    source: StoredLogits
    window: int

    def read(self, rows: slice, out: np.ndarray) -> np.ndarray:
        return self.source.read(self.window, rows, out)


@dataclass(frozen=True)
class BaselineWindow:
    """The baseline's side of one window, what a run's window is paired with: its raw logits (an array, or a
    stored file's window `StoredLogits[i]`, read a chunk of rows at a time) and, per scored position, their
    log-sum-exp and the NLL."""
    logits: np.ndarray | _WindowRows
    lse: np.ndarray
    nll: np.ndarray

    def rows(self, c: slice, buffer: np.ndarray) -> BaselineWindow:
        """Rows `c`, with stored logits read into `buffer`."""
        y = self.logits.read(c, buffer) if isinstance(self.logits, _WindowRows) else self.logits[c]
        return BaselineWindow(y, self.lse[c], self.nll[c])


@dataclass(frozen=True)
class _Scratch:
    """One thread's working arrays, (chunk, n_vocab) float32 each: the logit differences `d`, the baseline's
    probabilities `p` (stored baseline logits are read into `p`) and `w` for the exponentials; `block` is the row
    sums' block (_sum_block). llama.cpp's logits are only read: written, each of their cache lines would go back
    to memory, a third of a paired window's memory traffic."""
    d: np.ndarray
    p: np.ndarray
    w: np.ndarray
    block: int


class WindowMath:
    """Everything a window's logits are needed for, computed over row blocks on `threads` threads.

    Per window the work is a handful of passes over n_scored x n_vocab floats (50 MB for SmolLM2, 267 MB for a
    262k vocabulary); numpy releases the GIL on them, so the blocks run in parallel while llama.cpp's threads are
    idle between decodes. Each thread walks its rows in short chunks, all passes on one chunk before the next, so
    the passes after the first read cache instead of memory. Scratch buffers are per thread, a few MB, allocated
    once (a fresh large array costs more in page faults than the math on it), and so is the window of a
    recomputed baseline (`window_buffer`).

    It owns its thread pool and buffers: `close()` (or a `with` block) shuts the pool down and drops them.
    """

    def __init__(self, threads: int = 1):
        self.threads = max(1, threads)
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        self._scratch: dict[int, _Scratch] = {}
        self._window: np.ndarray | None = None
        self._closed = False

    def window_buffer(self, n_scored: int, n_vocab: int) -> np.ndarray:
        """One window of logits (a recomputed baseline's), allocated once and reused by every window."""
        if self._window is None or self._window.shape != (n_scored, n_vocab):
            self._window = None  # release the old one before allocating the new
            self._window = np.empty((n_scored, n_vocab), dtype=np.float32)
        return self._window

    def _scratch_for(self, part: int, shape: tuple[int, int]) -> _Scratch:
        s = self._scratch.get(part)
        if s is None or s.d.shape != shape:
            s = self._scratch[part] = _Scratch(np.empty(shape, np.float32), np.empty(shape, np.float32),
                                               np.empty(shape, np.float32), _sum_block(shape[1]))
        return s

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self._scratch.clear()
        self._window = None
        self._closed = True

    def __enter__(self) -> WindowMath:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, logits: np.ndarray, targets: np.ndarray, keep: np.ndarray | None = None,
                 baseline: BaselineWindow | None = None) -> dict[str, np.ndarray]:
        """logits: one window's (n_scored, n_vocab), only read. keep: an array of that shape that receives them (a
        recomputed baseline's window). baseline: the baseline's side of this window; KL and the paired NLL are
        then computed."""
        if self._closed:
            raise RuntimeError("this WindowMath is closed")
        n, n_vocab = logits.shape
        out = {"argmax": np.empty(n, np.int64), "nll": np.empty(n), "lse": np.empty(n)}
        if baseline is not None:
            out["kld"] = np.empty(n)
        blocks = _split(n, self.threads)
        chunk = max(1, CHUNK_FLOATS // n_vocab)

        def rows(part: int, r: slice) -> None:
            scratch = self._scratch_for(part, (chunk, n_vocab))
            for lo in range(r.start, r.stop, chunk):
                c = slice(lo, min(lo + chunk, r.stop))
                parts = {k: v[c] for k, v in out.items()}
                if keep is not None:
                    keep[c] = logits[c]
                if baseline is None:
                    _window_rows(logits[c], targets[c], parts, scratch)
                else:
                    _paired_rows(logits[c], targets[c], baseline.rows(c, scratch.p), parts, scratch)

        if self._pool is None or len(blocks) == 1:
            rows(0, blocks[0])
        else:
            for f in [self._pool.submit(rows, k, r) for k, r in enumerate(blocks)]:
                f.result()
        return out


def _sum_block(n: int) -> int:
    """The largest divisor of n up to SUM_BLOCK: row sums are taken in blocks of it (see _row_dot)."""
    return next(b for b in range(min(n, SUM_BLOCK), 0, -1) if n % b == 0)


def _row_dot(a: np.ndarray, b: np.ndarray, block: int) -> np.ndarray:
    """sum(a * b) per row, in float64. Float32 dot products over short blocks (a stack of 1 x block times block x 1
    matmuls: faster than einsum, ~1e-9 relative) where accumulating a whole 49k-long row in float32 drifts to
    ~1e-5."""
    partial = np.matmul(a.reshape(-1, 1, block), b.reshape(-1, block, 1))
    return partial.reshape(a.shape[0], -1).sum(axis=1, dtype=np.float64)


def _row_sum(a: np.ndarray, block: int) -> np.ndarray:
    """sum(a) per row, in float64 from float32 (pairwise) sums over short blocks: no float64 conversion pass."""
    return a.reshape(a.shape[0], -1, block).sum(axis=2).sum(axis=1, dtype=np.float64)


def _exp_rows(x: np.ndarray, shift: np.ndarray, out: np.ndarray, d_max: np.ndarray | None = None) -> np.ndarray:
    """out = e^(x - shift) per row, up to the float64 factor returned per row: e^-shift where the row's
    exponentials are taken without the shift (_UNSHIFTED_LIMIT), 1 where not. Decided row by row, so that a row's
    numbers do not depend on the rows it shares a chunk (or a thread) with."""
    with np.errstate(invalid="ignore"):  # NaN shifts: shifted, as before
        plain = (shift >= 0) & (shift <= _UNSHIFTED_LIMIT)
        if d_max is not None:
            plain &= d_max < _UNSHIFTED_LIMIT
    if plain.all():
        np.exp(x, out=out)
    else:  # x - 0 is x exactly: the plain rows get the same numbers as above
        np.subtract(x, np.where(plain, 0.0, shift).astype(np.float32)[:, None], out=out)
        np.exp(out, out=out)
    return np.where(plain, np.exp(-shift.astype(np.float64)), 1.0)


def _window_rows(z, targets, out, scratch: _Scratch) -> None:
    """Rows of an unpaired window (`z` is only read): llama-perplexity's NLL, lse = top + log(sum e^(z - top)),
    from float32 exponentials summed in float64.

    The top token's term (exactly 1) is left out of the sum and added as log1p(rest), so the rest can be summed in
    float32 blocks (no float64 conversion pass): summed with the 1, the many tokens below its half-ulp would be
    lost (~3e-7 of a confident row's sum); without it, ~3e-8, as the float32 exponentials themselves. Where
    0 <= top <= _UNSHIFTED_LIMIT the exponentials are e^z, scaled by e^-top in float64 after the sum (a pass
    fewer, and z's exact value instead of the rounded z - top)."""
    rows = np.arange(len(targets))
    argmax = z.argmax(axis=1)
    top = z[rows, argmax]
    picked = z[rows, targets].astype(np.float64) - top
    e = scratch.w[: len(targets)]
    scale = _exp_rows(z, top, e)
    e[rows, argmax] = 0.0
    log_sum = np.log1p(_row_sum(e, scratch.block) * scale)
    out["argmax"][...] = argmax
    out["lse"][...] = top + log_sum
    out["nll"][...] = log_sum - picked


def _paired_rows(z, targets, base: BaselineWindow, out, scratch: _Scratch) -> None:
    """Rows of a window paired with the same rows of its baseline (raw logits y); `y` may be `scratch.p` itself
    (it is read before p is written).

    Everything comes from the logit differences d = z - y, which are small where the perturbation is small, so
    tiny changes are not lost to rounding. With p = softmax(y), q = p e^d / Z:
        KL = log Z - u,   ΔNLL = log Z - d[target],   u = sum p d,   log Z = log1p(u + v),
        v = sum p (expm1(d) - d) >= 0.
    An error in u enters KL only times (u + v), and v is a sum of non-negative terms, so float32 products summed
    in short blocks suffice. The run's log-sum-exp is the baseline's + log Z.
    Where p underflows for tokens that the run makes likely, log1p(u + v) would miss their mass; rows where that
    could happen (max d - u >= _UNDERFLOW_MARGIN, or non-finite logits) take log Z = lse(z) - lse(y) instead
    (only large divergences, where the cancellation is harmless).
    p is taken as e^y, scaled by e^-lse(y) after the sums (in float64), where the exponentials and products cannot
    overflow or lose mass (_UNSHIFTED_LIMIT): a pass fewer (y - lse), and y's exact value.
    """
    n = len(targets)
    rows = np.arange(n)
    y, y_lse, y_nll = base.logits, base.lse, base.nll
    d, p = scratch.d[:n], scratch.p[:n]
    out["argmax"][...] = z.argmax(axis=1)
    np.subtract(z, y, out=d)
    picked = d[rows, targets].astype(np.float64)
    d_max = d.max(axis=1).astype(np.float64)
    scale = _exp_rows(y, y_lse, p, d_max)
    u = _row_dot(p, d, scratch.block) * scale
    with np.errstate(over="ignore", invalid="ignore"):
        # NaN compares false: non-finite rows are coarse too
        coarse = ~(d_max - u < _UNDERFLOW_MARGIN) | ~(d_max < _EXPM1_LIMIT)
        log_z = np.empty(n)
        if coarse.any():
            zc = z[coarse].astype(np.float64)
            top = zc.max(axis=1)
            log_z[coarse] = top + np.log(np.exp(zc - top[:, None]).sum(axis=1)) - y_lse[coarse]
        work = scratch.w[:n]
        np.expm1(d, out=work)
        work -= d
        v = _row_dot(p, work, scratch.block) * scale
        fine = np.log1p(u + v)
    log_z[~coarse] = fine[~coarse]
    out["lse"][...] = y_lse + log_z
    out["kld"][...] = np.maximum(log_z - u, 0.0)  # rounding may leave -1e-15 at equality
    out["nll"][...] = y_nll + (log_z - picked)


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
    baseline: Score | None = None  # the baseline's score on the same windows, when it was recomputed alongside

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
        return exp(float(self.nll.mean()))

    @property
    def ppl_stderr(self) -> float:
        v = self.nll.ravel()
        var = float(np.mean(v * v) - np.mean(v) ** 2)
        return self.ppl * sqrt(var / (v.size - 1)) if var > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Tokens decoded (whole windows) per second of scoring."""
        return self.n_windows * self.n_ctx / self.seconds if self.seconds > 0 else float("nan")

    def summary(self) -> str:
        return (f"PPL = {self.ppl:.4f} ± {self.ppl_stderr:.5f} "
                f"({self.n_windows} windows, {self.n_tokens} tokens, {self.n_ctx} ctx)")


def score(backend, windows: Windows, progress: bool = True, desc: str = "scoring", keep_logits=None,
          reference: Score | None = None, settled: Callable[[Score], bool] | None = None,
          unperturbed: Callable[[], AbstractContextManager] | None = None,
          math: WindowMath | None = None) -> Score:
    """Score every window on `backend` (whose hooks/weights define the perturbation, if any).

    keep_logits: an array of shape (n_windows, n_scored, n_vocab) (a memmap for a baseline) that receives the
    raw logits. reference: a baseline scored with keep_logits; KL(reference || this run) is then computed.
    unperturbed: instead of a stored reference, recompute it: each window is decoded first inside this context
    (the perturbation switched off) and its logits kept in memory for the paired math, then decoded perturbed
    (twice the decode, no disk). The baseline's score comes back as the result's `baseline`.
    settled: asked after each window with the score so far; True stops scoring there (early stopping).
    math: the WindowMath (thread pool and buffers) to compute with, e.g. one kept per loaded model; without it a
    temporary one on backend.n_threads threads serves this call and is closed before it returns.
    """
    mask, targets = windows.output_mask, windows.targets
    n, m = windows.n_windows, windows.n_scored
    nll = np.empty((n, m), dtype=np.float64)
    lse = np.empty((n, m), dtype=np.float64)
    argmax = np.empty((n, m), dtype=np.int32)
    recompute = unperturbed is not None and reference is None
    if recompute:
        base = {k: np.empty((n, m), dtype=v.dtype) for k, v in (("nll", nll), ("lse", lse), ("argmax", argmax))}
    with_kl = recompute or (reference is not None and reference.logits is not None)
    kld = np.empty((n, m), dtype=np.float64) if with_kl else None
    ref_logits = reference.logits if with_kl and not recompute else None
    if isinstance(ref_logits, np.memmap):
        ref_logits = StoredLogits(ref_logits)
    writer = _LogitsWriter(keep_logits) if isinstance(keep_logits, np.memmap) else None
    t0 = time.perf_counter()

    def baseline_so_far(k: int) -> Score | None:
        if not recompute:
            return None
        return Score(base["nll"][:k], windows.n_ctx, 0.0, argmax=base["argmax"][:k], lse=base["lse"][:k],
                     stopped_early=k < n)

    bar = tqdm(total=n, desc=desc, unit="win", disable=not progress, leave=False)
    with nullcontext(math) if math is not None else WindowMath(backend.n_threads) as window_math, bar:
        kept = window_math.window_buffer(m, backend.n_vocab) if recompute else None
        for i, window in enumerate(windows.tokens):
            if recompute:
                with unperturbed():
                    b = window_math(backend.decode_window(window, mask), targets[i], kept)
                base["nll"][i], base["lse"][i], base["argmax"][i] = b["nll"], b["lse"], b["argmax"]
                paired = BaselineWindow(kept, base["lse"][i], base["nll"][i])
            else:
                paired = BaselineWindow(ref_logits[i], reference.lse[i], reference.nll[i]) if with_kl else None
                if isinstance(ref_logits, StoredLogits):
                    ref_logits.will_need(i)
            logits = backend.decode_window(window, mask)
            if writer is not None:
                writer.write(i, logits)
            keep = keep_logits[i] if keep_logits is not None and writer is None else None
            w = window_math(logits, targets[i], keep, paired)
            nll[i], lse[i], argmax[i] = w["nll"], w["lse"], w["argmax"]
            if with_kl:
                kld[i] = w["kld"]
            if not np.isfinite(nll[i]).all():  # NaN/inf logits: the rest would only repeat it
                pos = windows.first + int(np.argmin(np.isfinite(nll[i])))
                return Score(nll[: i + 1], windows.n_ctx, time.perf_counter() - t0,
                             diverged=f"non-finite logits in window {i} at position {pos}",
                             baseline=baseline_so_far(i + 1))
            bar.update()
            bar.set_postfix_str(f"ppl {exp(nll[: i + 1].mean()):.4f}")
            if settled is not None and i + 1 < n:
                so_far = Score(nll[: i + 1], windows.n_ctx, time.perf_counter() - t0, argmax=argmax[: i + 1],
                               lse=lse[: i + 1], kld=kld[: i + 1] if with_kl else None, stopped_early=True,
                               baseline=baseline_so_far(i + 1))
                if settled(so_far):
                    log.info("%s: settled after %d of %d windows", desc, i + 1, n)
                    return so_far
    if writer is not None:
        writer.close()
    return Score(nll, windows.n_ctx, time.perf_counter() - t0, argmax=argmax, lse=lse, logits=keep_logits, kld=kld,
                 baseline=baseline_so_far(n))


class _LogitsWriter:
    """Writes a baseline's logits into its .npy file window by window with pwrite: written through a memory map,
    every page of the file would stay in the process's resident set."""

    def __init__(self, array: np.memmap):
        self.offset, self.shape = int(array.offset), array.shape
        self._fd = os.open(str(array.filename), os.O_WRONLY)

    def write(self, i: int, logits: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(logits)).cast("B")
        os.pwrite(self._fd, data, self.offset + i * data.nbytes)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    __del__ = close
