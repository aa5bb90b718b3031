"""The reference a run is measured against: the model in its container, and the text cut into windows.

Loading is cached within a process: Hydra's default launcher runs the jobs of a sweep one after another in one
process, and every job that shares model file, container, n_ctx and threads reuses the same loaded model.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .backend import Backend, ComputeSettings
from .container import compute_settings, container_path
from .model_file import ModelInfo, model_info, resolve_model_path, sha256
from .perplexity import Windows, make_windows
from .text import Text, load_text

log = logging.getLogger(__name__)


_live: dict[tuple, Backend] = {}  # at most one loaded model per process: memory stays bounded
_tokens: dict[tuple, object] = {}


def default_threads(threads: int | None) -> int:
    return int(threads) if threads else (os.cpu_count() or 1)


def load_backend(path: Path, n_ctx: int, threads: int, settings: ComputeSettings) -> Backend:
    """The loaded model for `path`, reused when the same one is asked for again."""
    key = (str(path), n_ctx, threads, settings)
    if key not in _live or _live[key].closed:
        for old in _live.values():
            old.close()
        _live.clear()
        log.info("loading %s (n_ctx %d, %d threads, %s)", path.name, n_ctx, threads, settings)
        # Weights are loaded writable (no mmap) so that weight perturbations can be applied in place and undone.
        _live[key] = Backend(path, n_ctx, threads, writable_weights=True, settings=settings)
    return _live[key]


@dataclass
class Inputs:
    """What a point depends on, cheap to get: the model file (hashed, described) and the text."""

    source: Path  # the user's model file (never written)
    info: ModelInfo
    text: Text

    @property
    def model_sha256(self) -> str:
        return sha256(self.source)


@dataclass
class Reference(Inputs):
    """The inputs made ready: the model loaded in its container, the text cut into windows."""

    container: str  # "f32" | "native"
    backend: Backend  # the loaded container file
    windows: Windows
    threads: int


def load_inputs(model_cfg, data_cfg) -> Inputs:
    source = resolve_model_path(model_cfg.path)
    info = model_info(source)
    return Inputs(source, info, load_text(data_cfg.path))


def open_reference(model_cfg, data_cfg, run_cfg, inputs: Inputs | None = None) -> Reference:
    inputs = inputs or load_inputs(model_cfg, data_cfg)  # the text first: a missing text fails fast
    cache_dir = Path(model_cfg.cache_dir) if model_cfg.get("cache_dir") else None
    file = container_path(inputs.source, model_cfg.container, cache_dir)
    threads = default_threads(run_cfg.threads)
    settings = compute_settings(model_cfg.container, int(model_cfg.get("n_gpu_layers", 0)))
    backend = load_backend(file, int(data_cfg.n_ctx), threads, settings)
    key = (inputs.model_sha256, inputs.text.sha256)
    if key not in _tokens:
        _tokens[key] = backend.tokenize(inputs.text.text)
    windows = make_windows(_tokens[key], int(data_cfg.n_ctx), int(data_cfg.n_chunks),
                           backend.bos if backend.add_bos else None)
    return Reference(inputs.source, inputs.info, inputs.text, model_cfg.container, backend, windows, threads)
