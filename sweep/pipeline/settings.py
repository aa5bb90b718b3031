"""The settings of a job, typed: built once from the composed Hydra config where a command starts (the job, the
grid's checks, the generation check, `sweep score`, `sweep imatrix`), and read below it; no function under these
entries takes the config itself (tests/test_settings.py).

`score_settings(cfg)`: the reference's parts (model, data, run: what `sweep score` and `sweep imatrix` take);
`job_settings(cfg)`: those and one point of the grid (what is applied where, and the metrics). A key the config does
not have (a job configuration written by an older version) takes the schema's default (sweep/pipeline/config.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import TypeVar

from omegaconf import DictConfig, OmegaConf

from ..cores import available_cores
from ..errors import SweepError
from ..llama.backend import ComputeSettings
from ..llama.cache import cache_root
from ..llama.capacity import auto_container
from ..llama.container import compute_settings
from ..llama.model_file import ModelInfo, resolve_model_path
from ..prefix.reuse import PrefixSettings
from ..quant.formats import Format, make_format
from ..quant.ggml_types import is_ggml
from ..quant.targets import Target, resolve
from ..scoring.generation import generation_mode
from ..scoring.metrics import RANKABLE, EarlyStop, StopRule
from .config import SweepConfig

_SCHEMA = OmegaConf.structured(SweepConfig)


def _get(cfg: DictConfig, key: str):
    """cfg's value at `key` (dotted), or the schema's default where the config has no such key."""
    missing = object()
    value = OmegaConf.select(cfg, key, default=missing)
    if value is missing:
        value = OmegaConf.select(_SCHEMA, key)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _axis(value):
    """An axis value as plain Python: an int, a str, None, or a tuple (a list in the config)."""
    return tuple(value) if isinstance(value, list) else value


def _str(value) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True)
class ModelSettings:
    """model.*: the GGUF under test, its container and where llama.cpp computes."""

    path: str | None  # as given (None: the embedded SmolLM2)
    container: str  # "f32" | "native"; "auto" until settled (`settled`)
    native_weights: str  # "delta" | "copy"
    cache_dir: Path | None  # as given (None: $SWEEP_CACHE or ~/.cache/sweep)
    n_gpu_layers: int
    rpc: str | None

    @cached_property
    def source(self) -> Path:
        """The model file, found and checked (once)."""
        return resolve_model_path(self.path)

    @property
    def cache(self) -> Path:
        """Where containers, stages and residuals are cached."""
        return cache_root(self.cache_dir)

    @property
    def compute(self) -> ComputeSettings:
        return compute_settings(self.container, self.n_gpu_layers, self.rpc)


@dataclass(frozen=True)
class DataSettings:
    """data.*: the text and its windows."""

    path: str | None
    n_ctx: int
    n_windows: int


@dataclass(frozen=True)
class RunSettings:
    """run.*: threads, progress bars, the store, prefix reuse, the sensitivity map (docs/estimate.md)."""

    threads: int | None  # None: the cores this process may use
    progress: bool
    store: Path
    prefix: PrefixSettings
    prefix_min_gain: float
    estimate: str  # "off" | "map"
    map_calibrate: str | None  # the calibration format; None: each tensor's middle format by bits/weight
    map_checks: int
    map_tolerance: float
    map_job: str | None  # the map's own job: the map plan (map.json) it computes the errors for

    @property
    def n_threads(self) -> int:
        return int(self.threads or available_cores())


@dataclass(frozen=True)
class MetricsSettings:
    """metrics.*: what is computed against the baseline, the generation check and early stopping."""

    kld: bool
    baseline_logits: str  # "store" | "recompute"
    alpha: float
    rank_by: str
    generate: int | None  # the generation check: None every point (in its job), 0 none, N the N worst (after)
    prompts: tuple[str, ...]
    max_new_tokens: int
    stop: StopRule | None  # early stopping, when on
    early_stop: EarlyStop

    @property
    def prompts_here(self) -> tuple[str, ...]:
        """The prompts a point's own job generates from: all with metrics.generate=true, none otherwise."""
        return self.prompts if self.generate is None else ()


@dataclass(frozen=True)
class PointSettings:
    """The grid's axes: what is applied (fmt) where (kind, tensor, layer, expert)."""

    kind: str
    tensor: str
    layer: object  # an int, a tuple of ints, "all", "each" or None, as configured
    expert: object  # "all", "each", an int or a tuple of ints
    fmt: Format
    # fmt.* as configured, the unset (None) left out: make_format(**dict(fmt_config)) is `fmt` (the map's cells)
    fmt_config: tuple[tuple[str, object], ...] = ()

    @property
    def fmt_params(self) -> dict:
        return dict(self.fmt_config)

    def target(self, info: ModelInfo, nodes=None) -> Target:
        """The tensors or nodes of this point in this model (quant/targets.resolve); `tensor=all` with a GGUF type
        is every tensor llama.cpp quantizes."""
        return resolve(self.kind, self.tensor, self.layer, info, nodes, self.expert,
                       quantized_only=is_ggml(self.fmt.name))


@dataclass(frozen=True)
class ScoreSettings:
    """The reference's settings: what `sweep score` and `sweep imatrix` take."""

    model: ModelSettings
    data: DataSettings
    run: RunSettings


@dataclass(frozen=True)
class JobSettings(ScoreSettings):
    """One job of a sweep: the reference's settings, the point and its metrics."""

    point: PointSettings
    metrics: MetricsSettings


def score_settings(cfg: DictConfig) -> ScoreSettings:
    model = ModelSettings(
        path=_str(_get(cfg, "model.path")), container=str(_get(cfg, "model.container")),
        native_weights=str(_get(cfg, "model.native_weights")),
        cache_dir=Path(c) if (c := _get(cfg, "model.cache_dir")) else None,
        n_gpu_layers=int(_get(cfg, "model.n_gpu_layers")), rpc=_str(_get(cfg, "model.rpc")))
    data = DataSettings(_str(_get(cfg, "data.path")), int(_get(cfg, "data.n_ctx")), int(_get(cfg, "data.n_windows")))
    starts = _get(cfg, "run.prefix_starts")
    prefix = PrefixSettings(bool(_get(cfg, "run.prefix_reuse")), int(_get(cfg, "run.prefix_stages")), model.cache,
                            None if starts is None else tuple(int(s) for s in starts))
    threads = _get(cfg, "run.threads")
    run = RunSettings(None if threads is None else int(threads), bool(_get(cfg, "run.progress")),
                      Path(_get(cfg, "run.store")), prefix, float(_get(cfg, "run.prefix_min_gain")),
                      estimate=str(_get(cfg, "run.estimate")), map_calibrate=_str(_get(cfg, "run.map_calibrate")),
                      map_checks=int(_get(cfg, "run.map_checks")), map_tolerance=float(_get(cfg, "run.map_tolerance")),
                      map_job=_str(_get(cfg, "run.map_job")))
    return ScoreSettings(model, data, run)


def job_settings(cfg: DictConfig) -> JobSettings:
    """The settings of one job; a value that composition cannot check is a SweepError of one line."""
    reference = score_settings(cfg)
    fmt = _get(cfg, "fmt")
    point = PointSettings(str(_get(cfg, "kind")), str(_get(cfg, "tensor")), _axis(_get(cfg, "layer")),
                          _axis(_get(cfg, "expert")), make_format(**fmt),
                          tuple((k, v) for k, v in fmt.items() if v is not None))
    return JobSettings(reference.model, reference.data, reference.run, point, metrics_settings(cfg))


def metrics_settings(cfg: DictConfig) -> MetricsSettings:
    alpha = float(_get(cfg, "metrics.alpha"))
    if not 0 < alpha < 1:
        raise SweepError(f"metrics.alpha={alpha} must be between 0 and 1 (e.g. 0.05)")
    rank_by, kld = str(_get(cfg, "metrics.rank_by")), bool(_get(cfg, "metrics.kld"))
    early_stop = EarlyStop(**_get(cfg, "metrics.early_stop"))
    if early_stop.enabled:
        if early_stop.min_windows < 2 or early_stop.rtol < 0 or early_stop.atol < 0:
            raise SweepError(f"metrics.early_stop needs min_windows >= 2 and rtol, atol >= 0 (got min_windows="
                             f"{early_stop.min_windows}, rtol={early_stop.rtol}, atol={early_stop.atol})")
        if RANKABLE[rank_by].needs_logits and not kld:
            raise SweepError(f"metrics.early_stop watches metrics.rank_by={rank_by}, which needs metrics.kld=true")
    return MetricsSettings(
        kld=kld, baseline_logits=str(_get(cfg, "metrics.baseline_logits")), alpha=alpha, rank_by=rank_by,
        generate=generation_mode(_get(cfg, "metrics.generate")), prompts=tuple(_get(cfg, "metrics.prompts")),
        max_new_tokens=int(_get(cfg, "metrics.max_new_tokens")),
        stop=StopRule(rank_by, early_stop, alpha) if early_stop.enabled else None, early_stop=early_stop)


S = TypeVar("S", bound=ScoreSettings)


def settled(s: S, launcher_cfg=None) -> S:
    """`s` with model.container=auto replaced by its choice (`s` itself when it names one)."""
    if s.model.container != "auto":
        return s
    return replace(s, model=replace(s.model, container=auto_choice(s, launcher_cfg)[0]))


def auto_choice(s: ScoreSettings, launcher_cfg=None) -> tuple[str, str]:
    """The container these settings run in (model.container, or auto's choice) and why, in words."""
    if s.model.container != "auto":
        return s.model.container, "model.container"
    return auto_container(s.model.source, s.data.n_ctx, s.model.cache_dir, launcher_cfg,
                          offloaded=bool(s.model.n_gpu_layers))


def with_threads(s: S, threads: int) -> S:
    return replace(s, run=replace(s.run, threads=threads))


def with_prefix_starts(s: S, starts: tuple[int, ...]) -> S:
    return replace(s, run=replace(s.run, prefix=replace(s.run.prefix, starts=starts)))


def quiet(s: S) -> S:
    """No progress bars."""
    return replace(s, run=replace(s.run, progress=False))
