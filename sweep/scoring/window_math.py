"""The math of one scored window: from its logits to per-token NLL, log-sum-exp, argmax and (paired with a
baseline window's logits) KL divergence, in float32 blocks on a thread pool (`WindowMath`); the baseline's logits
read back from its stored file (`StoredLogits`)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..errors import SweepError


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
        got = os.preadv(self._fd, [view.data.cast("B")], start)
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

    def rows(self, c: slice, buffer: np.ndarray) -> _BaselineRows:
        """Rows `c`, with stored logits read into `buffer`."""
        y = self.logits.read(c, buffer) if isinstance(self.logits, _WindowRows) else self.logits[c]
        return _BaselineRows(y, self.lse[c], self.nll[c])


@dataclass(frozen=True)
class _BaselineRows:
    """Rows of a BaselineWindow, their logits in memory."""
    logits: np.ndarray
    lse: np.ndarray
    nll: np.ndarray


@dataclass
class _Scratch:
    """One thread's working arrays, (chunk, n_vocab) float32 each: the logit differences `d`, the baseline's
    probabilities `p` (stored baseline logits are read into `p`) and `w` for the exponentials; `block` is the row
    sums' block (_sum_block). llama.cpp's logits are only read: written, each of their cache lines would go back
    to memory, a third of a paired window's memory traffic."""
    d: np.ndarray
    p: np.ndarray
    w: np.ndarray
    block: int
    # float64 rows for the log-sum-exps of coarse rows (_paired_rows): allocated when first needed, then reused --
    # a fresh 2 MB array per row (262k vocabulary) costs its page faults every time
    wide: np.ndarray | None = None

    def wide_rows(self, n: int) -> np.ndarray:
        if self.wide is None:
            self.wide = np.empty(self.d.shape, np.float64)  # a chunk's rows: never more are coarse
        return self.wide[:n]


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
            # NaN and inf rows are expected (_exp_rows, _paired_rows): one errstate per thread and window, not per
            # chunk (at 262k a chunk is one row, and an errstate costs a few microseconds)
            with np.errstate(over="ignore", invalid="ignore"):
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
    plain = (shift >= 0) & (shift <= _UNSHIFTED_LIMIT)  # NaN shifts: shifted, as before
    if d_max is not None:
        plain &= d_max < _UNSHIFTED_LIMIT
    if plain.all():
        np.exp(x, out=out)
    else:  # x - 0 is x exactly: the plain rows get the same numbers as above
        np.subtract(x, np.where(plain, 0.0, shift).astype(np.float32)[:, None], out=out)
        np.exp(out, out=out)
    return np.where(plain, np.exp(-shift.astype(np.float64)), 1.0)


def _window_rows(z: np.ndarray, targets: np.ndarray, out: dict[str, np.ndarray], scratch: _Scratch) -> None:
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


def _paired_rows(z: np.ndarray, targets: np.ndarray, base: _BaselineRows, out: dict[str, np.ndarray],
                 scratch: _Scratch) -> None:
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
    # NaN compares false: non-finite rows are coarse too
    coarse = ~(d_max - u < _UNDERFLOW_MARGIN) | ~(d_max < _EXPM1_LIMIT)
    log_z = np.empty(n)
    if coarse.any():  # in float64 from float32 (exact), in the thread's reused rows
        zc = scratch.wide_rows(int(coarse.sum()))
        for j, r in enumerate(np.flatnonzero(coarse)):  # z[coarse] would be a fresh array too
            np.copyto(zc[j], z[r])
        top = zc.max(axis=1)
        zc -= top[:, None]
        np.exp(zc, out=zc)
        log_z[coarse] = top + np.log(zc.sum(axis=1)) - y_lse[coarse]
    if not coarse.all():  # (a chunk of coarse rows only needs no v)
        work = scratch.w[:n]
        np.expm1(d, out=work)
        work -= d
        v = _row_dot(p, work, scratch.block) * scale
        fine = np.log1p(u + v)
        log_z[~coarse] = fine[~coarse]
    out["lse"][...] = y_lse + log_z
    out["kld"][...] = np.maximum(log_z - u, 0.0)  # rounding may leave -1e-15 at equality
    out["nll"][...] = y_nll + (log_z - picked)
