"""The cache: every file the sweep keeps outside the store, rebuilt when removed. One directory, `model.cache_dir`,
else $SWEEP_CACHE, else ~/.cache/sweep, laid out as

    containers/<model sha256>.f32.gguf                    F32 containers (container.py)
    stages/<model sha256>.<container>.stage<S>.gguf       prefix reuse's stage files (stage_file.py)
    stages/<stage file>.probe.json                        a stage file's load, probed in a child (stage_check.py)
    stages/io-speeds.json                                 the stage files' last write and load speeds (prefix/plan.py)
    stages/profile-<key>.json                             a timed window of a model (prefix/plan.py)
    prefix/<key>.json, prefix/<key>.l_out-<S-1>.npy       the captured residuals before each stage (prefix/reuse.py)

This module is the only one that knows these names; `sweep prefix-clean` removes `stages/` and `prefix/`.
"""

from __future__ import annotations

import os
from pathlib import Path

CONTAINERS, STAGES, RESIDUALS = "containers", "stages", "prefix"
IO_SPEEDS = "io-speeds.json"  # bytes per second of the last stage file written and loaded in this cache


def cache_root(configured: str | os.PathLike | None = None) -> Path:
    """`model.cache_dir` when set, else $SWEEP_CACHE, else ~/.cache/sweep."""
    if configured:
        return Path(configured)
    return Path(os.environ.get("SWEEP_CACHE") or Path.home() / ".cache" / "sweep")


def container_file(cache: Path, model_sha256: str) -> Path:
    """The F32 container of the model file with this SHA-256 (built or not)."""
    return Path(cache) / CONTAINERS / f"{model_sha256}.f32.gguf"


def stage_file(cache: Path, model_sha256: str, container: str, start: int) -> Path:
    """The stage file of blocks start..N-1 of this model in this container (written or not)."""
    return Path(cache) / STAGES / f"{model_sha256}.{container}.stage{start}.gguf"


def probe_file(stage: Path) -> Path:
    """The verdict of a stage file's load in a child process, kept beside it."""
    return Path(f"{stage}.probe.json")


def io_speeds_file(cache: Path) -> Path:
    return Path(cache) / STAGES / IO_SPEEDS


def profile_file(cache: Path, key: str) -> Path:
    """A model's timed window (seconds per block, of the head, of a point's math), kept beside the stage files."""
    return Path(cache) / STAGES / f"profile-{key}.json"


def residuals_meta_file(cache: Path, key: str) -> Path:
    """What the residuals of this key were captured from (the full model's logits on window 0, hashed)."""
    return Path(cache) / RESIDUALS / f"{key}.json"


def residuals_file(cache: Path, key: str, start: int) -> Path:
    """The residual stream after block start-1 of every window: the input of the stage starting at `start`."""
    return Path(cache) / RESIDUALS / f"{key}.l_out-{start - 1}.npy"


def prefix_dirs(cache: Path) -> tuple[Path, Path]:
    """What prefix reuse keeps: the stage files' directory and the residuals'."""
    return Path(cache) / STAGES, Path(cache) / RESIDUALS
