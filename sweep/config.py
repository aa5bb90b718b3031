"""Structured-config schemas: a typo in a key or a value of the wrong type fails at composition, before any job."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from .formats import FORMATS, Granularity


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
    """One option of the group `fmt=` per format of sweep.formats.FORMATS (stored by register(), no yaml files);
    what each computes: `python -m sweep.formats` or the README's table. A parameter a format does not take is
    validated, then ignored."""

    name: str = MISSING
    granularity: Granularity = Granularity.per_row  # per_tensor | per_row | per_token (int8, scaled fp8)
    group_size: int = 32  # int4, mxfp4
    scaled: bool = True  # fp8 only: scaled (amax scale, the default) or a plain cast
    imatrix: Optional[str] = None  # GGUF quant types: a llama.cpp imatrix file (GGUF or legacy .dat)


DEFAULT_PROMPTS = ("What is the capital of France?",
                   "What is 17 * 23? Reply with digits only, then list the first ten prime numbers.")


@dataclass
class EarlyStopConfig:
    enabled: bool = False
    min_windows: int = 4
    rtol: float = 0.5
    atol: float = 0.0


@dataclass
class MetricsConfig:
    kld: bool = True
    baseline_logits: str = "store"  # store | recompute (see conf/metrics/default.yaml)
    alpha: float = 0.05
    rank_by: str = "delta_ppl"
    generate: Any = "top:5"  # true (every point) | false | top:N (the N worst, after the sweep): see gencheck.py
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    max_new_tokens: int = 32
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)


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
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
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
    for spec in FORMATS.values():  # the group `fmt=`, generated from the registry: one option per format
        cs.store(group="fmt", name=spec.name, node=FormatConfig(name=spec.name, granularity=spec.granularity))


register()
