"""One owner for a loaded model and everything computed from it: the baselines, the baseline completions, the
text's tokens and the window math's threads and buffers.

A `Session` lives from `open` to `close` (or a `with` block); nothing of it outlives it, so two sessions never
share a cache and a test that closes its session reads its next baseline from the store, not from memory. Every
in-memory cache is keyed by the function that keys the store (`records.point_key` through `baseline_key` and
`completions_key`), so a cached result is reused exactly when a stored one would be.

`Sessions` is what a sweep process holds: at most one open session (memory stays bounded), reused by consecutive
jobs that load the same file with the same context, threads and compute settings (Hydra's basic launcher runs a
sweep's jobs one after another in one process), replaced -- and closed -- when a job needs another.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..llama.backend import Backend, ComputeSettings
from ..prefix.reuse import Prefixes
from ..scoring.perplexity import Score, score
from ..scoring.window_math import WindowMath
from ..scoring.windows import Windows
from ..store.records import Store

log = logging.getLogger(__name__)


class Session:
    """A model file loaded for scoring (weights writable, so weight perturbations apply in place and are undone),
    with the caches of what has been computed on it."""

    def __init__(self, path: Path, n_ctx: int, threads: int, settings: ComputeSettings):
        log.info("loading %s (n_ctx %d, %d threads, %s)", Path(path).name, n_ctx, threads, settings)
        self.backend = Backend(path, n_ctx, threads, writable_weights=True, settings=settings)
        self.math = WindowMath(threads)
        self.identity = (str(path), n_ctx, threads, settings)
        self._tokens: dict[str, np.ndarray] = {}
        self._baselines: dict[str, Score] = {}
        self._completions: dict[str, list] = {}
        # MoE: the unperturbed routing of the scored windows, by (model copy, windows) (sweep/llama/routing.py)
        self.routing: dict[tuple, object] = {}
        # Prefix reuse: the stages of this model, their captured residuals and identity verdicts (prefix/reuse.py)
        self.prefixes = Prefixes()

    def tokens(self, text) -> np.ndarray:
        """The text (a `text.Text`) tokenized by this model, once."""
        if text.sha256 not in self._tokens:
            self._tokens[text.sha256] = self.backend.tokenize(text.text)
        return self._tokens[text.sha256]

    def baseline(self, key: str, backend: Backend, windows: Windows, progress: bool, store: Store | None,
                 keep_logits: bool) -> Score:
        """The unperturbed score of `windows` on `backend` (this session's model, or a matched copy of it), with its
        raw logits unless told not to: from memory, else from `store`, else computed (and stored)."""
        cached = self._baselines.get(key)
        if cached is None or (keep_logits and cached.logits is None):
            cached = self._baselines[key] = _stored_or_scored(key, backend, windows, progress, store, keep_logits,
                                                              self.math)
        return cached

    def completions(self, key: str, make: Callable[[], list]) -> list:
        if key not in self._completions:
            self._completions[key] = make()
        return self._completions[key]

    def close(self) -> None:
        self._baselines.clear()
        self._completions.clear()
        self.prefixes.close()
        self.math.close()
        self.backend.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _stored_or_scored(key: str, backend: Backend, w: Windows, progress: bool, store: Store | None,
                      keep_logits: bool, math: WindowMath) -> Score:
    saved = store.baseline(key) if store else None
    if saved is not None and saved["nll"].shape == (w.n_windows, w.n_scored) and \
            ("logits" in saved or not keep_logits):
        return Score(saved["nll"], w.n_ctx, 0.0, argmax=saved["argmax"], lse=saved["lse"], logits=saved.get("logits"))
    shape = (w.n_windows, w.n_scored, backend.n_vocab)
    logits: np.ndarray | None = None
    tmp: Path | None = None
    if keep_logits:
        logits, tmp = store.baseline_logits_file(key, shape) if store else (np.empty(shape, np.float32), None)
    try:
        result = score(backend, w, progress, desc="baseline", keep_logits=logits, math=math)
        if store:
            if isinstance(logits, np.memmap):  # the store's file (tmp)
                logits.flush()
            assert result.argmax is not None and result.lse is not None  # score() always sets them
            store.put_baseline(key, {"nll": result.nll, "argmax": result.argmax, "lse": result.lse}, tmp)
            if tmp is not None and (stored := store.baseline(key)) is not None:  # from now on read through the
                # stored file, a window at a time (just written: it is there)
                result = Score(result.nll, w.n_ctx, result.seconds, argmax=result.argmax, lse=result.lse,
                               logits=stored["logits"])
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()
    return result


class Sessions:
    """At most one open session, reused while jobs ask for the same loaded model; closed on `close` (a `with`).

    Inside a `with Sessions()` block, `Sessions.current()` is that block's sessions: what the end of a sweep (the
    generation check, gencheck.py) reuses in the process whose jobs already loaded the model."""

    _entered: list[Sessions] = []  # the `with` blocks open in this process, innermost last

    def __init__(self):
        self._open: Session | None = None

    @classmethod
    def current(cls) -> Sessions | None:
        return cls._entered[-1] if cls._entered else None

    def get(self, path: Path, n_ctx: int, threads: int, settings: ComputeSettings) -> Session:
        wanted = (str(path), n_ctx, threads, settings)
        if self._open is None or self._open.identity != wanted or self._open.backend.closed:
            if self._open is not None:  # one model in memory at a time: the old one is closed here, and said so
                log.info("closing %s (n_ctx %d, %d threads) for the next job's model",
                         Path(self._open.identity[0]).name,
                         *self._open.identity[1:3])
            self.close()
            self._open = Session(path, n_ctx, threads, settings)
        return self._open

    def close(self) -> None:
        if self._open is not None:
            self._open.close()
            self._open = None

    def __enter__(self) -> Sessions:
        Sessions._entered.append(self)
        return self

    def __exit__(self, *exc) -> None:
        Sessions._entered.remove(self)
        self.close()
