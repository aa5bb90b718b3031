"""Structured-config schemas: a typo in a key or a value of the wrong type fails at composition, before any job."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


@dataclass
class ModelConfig:
    path: Optional[str] = None  # None: the embedded SmolLM2
    container: str = "f32"  # f32 | native
    cache_dir: Optional[str] = None
    n_gpu_layers: int = 0


@dataclass
class DataConfig:
    path: Optional[str] = None  # None: the hub
    n_ctx: int = 512
    n_chunks: int = 16


@dataclass
class FormatConfig:
    name: str = MISSING
    granularity: str = "per_row"
    group_size: int = 32
    scaled: bool = False


@dataclass
class RunConfig:
    threads: Optional[int] = None
    progress: bool = True
    store: str = "runs/store"  # finished points and baselines, shared by every sweep (resume, reuse)


@dataclass
class ScoreConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)


@dataclass
class SweepConfig(ScoreConfig):
    fmt: FormatConfig = field(default_factory=FormatConfig)
    # The grid's axes. layer: an int, a list ([0,1,2]: one run perturbing all three), "all" (every block at once),
    # "each" (one job per block, expanded from the model's block count) or null (tensors outside the blocks).
    layer: Any = "each"
    tensor: str = "ffn_norm"
    kind: str = "weight"  # weight | activation


def register() -> None:
    # The sweep dir carries the launching process's id: two sweeps started in the same second never share one.
    if not OmegaConf.has_resolver("sweep_pid"):
        OmegaConf.register_new_resolver("sweep_pid", lambda: str(os.getpid()), use_cache=True)
    cs = ConfigStore.instance()
    cs.store(name="score_schema", node=ScoreConfig)
    cs.store(name="sweep_schema", node=SweepConfig)


register()
