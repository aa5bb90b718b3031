"""llama-perplexity's protocol (tools/perplexity/perplexity.cpp), on top of the backend: every window
(sweep/scoring/windows.py) decoded and its scored half reduced (sweep/scoring/window_math.py).
PPL = exp(mean NLL); its standard error is llama-perplexity's: PPL * sqrt(var(NLL) / (count - 1)).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from enum import Enum
from math import exp, sqrt
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from .window_math import BaselineWindow, StoredLogits, WindowMath
from .windows import Windows

if TYPE_CHECKING:
    from ..llama.stage_view import Decoder

log = logging.getLogger(__name__)


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


class Pairing(Enum):
    """What each window of a run is compared with (`score`)."""

    NONE = "none"  # nothing: the window's NLL, log-sum-exp and top token alone (a baseline, or metrics.kld=false)
    STORED = "stored"  # a baseline scored before, its logits kept: KL(baseline || run) per token
    RECOMPUTED = "recomputed"  # the baseline's window decoded just before, unperturbed, its logits in memory

    @staticmethod
    def of(reference: Score | None, unperturbed) -> Pairing:
        if unperturbed is not None and reference is None:
            return Pairing.RECOMPUTED
        if reference is not None and reference.logits is not None:
            return Pairing.STORED
        return Pairing.NONE


def score(backend: Decoder, windows: Windows, progress: bool = True, desc: str = "scoring",
          keep_logits: np.ndarray | None = None,
          reference: Score | None = None, settled: Callable[[Score], bool] | None = None,
          unperturbed: Callable[[], AbstractContextManager] | None = None,
          math: WindowMath | None = None) -> Score:
    """Score every window on `backend` (whose hooks/weights define the perturbation, if any).

    What each window is paired with (`Pairing`):
      reference: a baseline scored with keep_logits; KL(reference || this run) is then computed (STORED; a
        reference without logits pairs nothing: NONE).
      unperturbed: instead of a stored reference, recompute it: each window is decoded first inside this context
        (the perturbation switched off) and its logits kept in memory for the paired math, then decoded perturbed
        (twice the decode, no disk). The baseline's score comes back as the result's `baseline` (RECOMPUTED).
    keep_logits: an array of shape (n_windows, n_scored, n_vocab) that receives the raw logits: in memory, or a
    baseline's .npy file (a memmap: written window by window, closed however scoring ends).
    settled: asked after each window with the score so far; True stops scoring there (early stopping).
    A window with non-finite logits stops scoring too: the score says where (`diverged`).
    math: the WindowMath (thread pool and buffers) to compute with, e.g. one kept per loaded model; without it a
    temporary one on backend.n_threads threads serves this call and is closed before it returns.
    """
    pairing = Pairing.of(reference, unperturbed)
    mask, targets = windows.output_mask, windows.targets
    n, m = windows.n_windows, windows.n_scored
    nll = np.empty((n, m), dtype=np.float64)
    lse = np.empty((n, m), dtype=np.float64)
    argmax = np.empty((n, m), dtype=np.int32)
    base: dict[str, np.ndarray] = {}  # recompute: the baseline's nll, lse and argmax
    if pairing is Pairing.RECOMPUTED:
        base = {k: np.empty((n, m), dtype=v.dtype) for k, v in (("nll", nll), ("lse", lse), ("argmax", argmax))}
    kld = np.empty((n, m), dtype=np.float64) if pairing is not Pairing.NONE else None
    # a stored baseline's logits (set exactly when STORED)
    ref_logits: np.ndarray | StoredLogits | None = \
        reference.logits if reference is not None and pairing is Pairing.STORED else None
    if isinstance(ref_logits, np.memmap):
        ref_logits = StoredLogits(ref_logits)
    t0 = time.perf_counter()

    def baseline_so_far(k: int) -> Score | None:
        if pairing is not Pairing.RECOMPUTED:
            return None
        return Score(base["nll"][:k], windows.n_ctx, 0.0, argmax=base["argmax"][:k], lse=base["lse"][:k],
                     stopped_early=k < n)

    def paired_with(i: int, window: np.ndarray, window_math: WindowMath,
                    kept: np.ndarray | None) -> BaselineWindow | None:
        """Window i's baseline for the paired math (decoded now when recomputed), or None."""
        if pairing is Pairing.RECOMPUTED:
            assert unperturbed is not None and kept is not None  # recompute: both given above
            with unperturbed():
                b = window_math(backend.decode_window(window, mask), targets[i], kept)
            base["nll"][i], base["lse"][i], base["argmax"][i] = b["nll"], b["lse"], b["argmax"]
            return BaselineWindow(kept, base["lse"][i], base["nll"][i])
        if pairing is Pairing.STORED:
            # a baseline scored with its logits
            assert ref_logits is not None and reference is not None and reference.lse is not None
            if isinstance(ref_logits, StoredLogits):
                ref_logits.will_need(i)
            return BaselineWindow(ref_logits[i], reference.lse[i], reference.nll[i])
        return None

    bar = tqdm(total=n, desc=desc, unit="win", disable=not progress, leave=False)
    with nullcontext(math) if math is not None else WindowMath(backend.n_threads) as window_math, bar, \
            _KeptLogits(keep_logits) as keep:
        kept = window_math.window_buffer(m, backend.n_vocab) if pairing is Pairing.RECOMPUTED else None
        for i, window in enumerate(windows.tokens):
            paired = paired_with(i, window, window_math, kept)
            logits = backend.decode_window(window, mask)
            w = window_math(logits, targets[i], keep.window(i, logits), paired)
            nll[i], lse[i], argmax[i] = w["nll"], w["lse"], w["argmax"]
            if kld is not None:
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
                               lse=lse[: i + 1], kld=kld[: i + 1] if kld is not None else None, stopped_early=True,
                               baseline=baseline_so_far(i + 1))
                if settled(so_far):
                    log.info("%s: settled after %d of %d windows", desc, i + 1, n)
                    return so_far
    return Score(nll, windows.n_ctx, time.perf_counter() - t0, argmax=argmax, lse=lse, logits=keep_logits, kld=kld,
                 baseline=baseline_so_far(n))


class _KeptLogits:
    """Where a run's raw logits go: nowhere, an array in memory (the window math fills its row), or a baseline's
    .npy file (a memmap: written as they come, and the file closed however scoring ends)."""

    def __init__(self, array: np.ndarray | None):
        self.array = array
        self.writer = _LogitsWriter(array) if isinstance(array, np.memmap) else None

    def window(self, i: int, logits: np.ndarray) -> np.ndarray | None:
        """Window i's logits written to the file, or the row of the array for the window math to fill (None:
        nothing for it to fill)."""
        if self.writer is not None:
            self.writer.write(i, logits)
            return None
        return self.array[i] if self.array is not None else None

    def __enter__(self) -> _KeptLogits:
        return self

    def __exit__(self, *exc) -> None:
        if self.writer is not None:
            self.writer.close()


class _LogitsWriter:
    """Writes a baseline's logits into its .npy file window by window with pwrite: written through a memory map,
    every page of the file would stay in the process's resident set."""

    def __init__(self, array: np.memmap):
        self.offset, self.shape = int(array.offset), array.shape
        self._fd: int | None = os.open(str(array.filename), os.O_WRONLY)

    def write(self, i: int, logits: np.ndarray) -> None:
        if self._fd is None:
            raise ValueError("this logits writer is closed")
        data = np.ascontiguousarray(logits).data.cast("B")
        os.pwrite(self._fd, data, self.offset + i * data.nbytes)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    __del__ = close
