"""The configuration, defined once: structured schemas whose defaults are the defaults, with a fixed set of values
as an Enum, so that a typo in a key, a value of the wrong type or an unknown choice fails at composition, before
any job. The `metrics` and `run` groups are these schemas themselves (no yaml repeats them); `conf/` holds the
options that are real alternatives (model, data, fmt, launchers) and the sweep's defaults list.

Tests and benchmarks compose the real configuration with `compose(overrides)`, as the command line does.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from ..choices import Choice, Container, Estimate, Kind, NativeWeights
from ..errors import SweepError, exit_on_user_error
from ..quant.formats import FORMATS, Granularity
from ..scoring.metrics import RANKABLE, EarlyStop

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


class BaselineLogits(Choice):
    store = "store"  # the baseline's logits computed once and kept on disk, shared by every point
    recompute = "recompute"  # no logits on disk: each baseline window decoded beside its point (twice the decode)


RankBy = Choice("RankBy", {name: name for name in RANKABLE})  # type: ignore[call-overload]  # Enum's functional API, which mypy does not follow; any metric of metrics.METRICS


@dataclass
class ModelConfig:
    path: Optional[str] = None  # None: the embedded SmolLM2
    container: Container = Container.auto
    native_weights: NativeWeights = NativeWeights.delta  # quantized weights in the native container: docs/scale.md
    cache_dir: Optional[str] = None  # containers: default $SWEEP_CACHE or ~/.cache/sweep
    n_gpu_layers: int = 0  # layers offloaded to a GPU when llama-cpp-python was built with one (-1: all)
    # llama.cpp RPC servers taking the offloaded layers: "HOST:PORT[,HOST:PORT...]" (docs/backends.md)
    rpc: Optional[str] = None


@dataclass
class DataConfig:
    path: Optional[str] = None  # None: the embedded WikiText-2; "hub": through `datasets`; else a text file
    n_ctx: int = 512  # tokens per window (llama-perplexity -c); the second half of every window is scored
    # Windows scored (llama-perplexity --chunks); <= 0: all the text gives (587 at n_ctx 512 on SmolLM2). 16 windows
    # (4080 scored tokens) is the measured trade-off: docs/statistics.md "Choosing the slice".
    n_windows: int = 16


@dataclass
class FormatConfig:
    """One option of the group `fmt=` per format of sweep.quant.formats.FORMATS (stored by register(), no yaml files);
    what each computes: `sweep formats` or the table in docs/formats.md. A parameter a format does not take is
    validated, then ignored."""

    name: str = MISSING
    granularity: Granularity = Granularity.per_row  # per_tensor | per_row | per_token (int8, scaled fp8)
    group_size: int = 32  # int4, mxfp4
    scaled: bool = True  # fp8 only: scaled (amax scale, the default) or a plain cast
    imatrix: Optional[str] = None  # GGUF quant types: a llama.cpp imatrix file (GGUF or legacy .dat)
    recipe: Optional[str] = None  # fmt=recipe: a recipe.json (python -m sweep.recipe), its types applied at once


@dataclass
class MetricsConfig:
    """Metrics against the matching baseline (sweep/scoring/metrics.py defines them)."""

    # Keep the baseline's raw logits (full vocabulary, float32) for exact KL divergence and top-1 agreement; costs
    # n_windows * (n_ctx/2 - 1) * n_vocab * 4 bytes of disk under run.store (802 MB for 16 windows of SmolLM2).
    kld: bool = True
    baseline_logits: BaselineLogits = BaselineLogits.store  # same numbers either way
    # Level of the per-point ΔNLL test (`significant`: paired two-sided t-test over windows; early-stopped points
    # are untested) and of the false discovery rate that the table's delta_nll_q marks.
    alpha: float = 0.05
    # What the ranking orders by (and early stopping and the generation check's worst points watch): KL divergence,
    # which a few windows resolve; the ranking shows ΔPPL ± its error beside it. Lower is worse for top1_agree,
    # higher for every other metric.
    rank_by: RankBy = RankBy.kld_mean  # type: ignore[valid-type]  # RankBy is built from METRICS at import
    # Generation check: greedy completions of `prompts` (through the chat template) compared token by token with
    # the baseline's. true: every point (~7% of a 16-window sweep on SmolLM2); false: none; top:N: the N points
    # that rank worst, checked when the sweep ends (gencheck.py; docs/benchmarks.md).
    generate: Any = "top:5"
    prompts: list[str] = field(default_factory=lambda: [
        "What is the capital of France?",
        "What is 17 * 23? Reply with digits only, then list the first ten prime numbers."])
    max_new_tokens: int = 32
    # Off: every point scores all data.n_windows windows. On: a point stops once the confidence interval (level
    # 1 - alpha) of the mean damage behind rank_by is narrower than max(rtol * |estimate|, atol), after at least
    # min_windows (metrics.StopRule; docs/statistics.md "Early stopping").
    early_stop: EarlyStop = field(default_factory=EarlyStop)


@dataclass
class RunConfig:
    threads: Optional[int] = None  # CPU threads for llama.cpp; None: the cores this job may use (affinity mask)
    progress: bool = True  # progress bars (windows scored) on stderr
    store: str = "runs/store"  # finished points and baselines, shared by every sweep (resume, reuse)
    # Prefix reuse (docs/prefix.md): a point at layer L decodes only the blocks from a stage S <= L on, fed the
    # baseline's residual stream; bit-identical to the full decode, or the point falls back to it and says why.
    prefix_reuse: bool = True
    prefix_stages: int = 8  # the most stage files a sweep may use (more: less decode, more disk)
    # reuse only where it makes the sweep's decode at least this much shorter: below that, the stage held beside
    # the model (memory) and its files (disk) are not worth it
    prefix_min_gain: float = 0.15
    # the stages' first blocks; null: chosen before launch from the sweep's layers and windows (solve.py)
    prefix_starts: Optional[list[int]] = None
    # The sensitivity map (docs/estimate.md): "off" measures every point; "map" measures one calibration point per
    # weight tensor (and a few check points per class) and predicts the grid's other weight points of GGUF types
    # from their weight errors; every point gets a row, `estimated` says which.
    estimate: Estimate = Estimate.off
    map_calibrate: Optional[str] = None  # the calibration format; null: each tensor's middle format by bits/weight
    map_checks: int = 3  # tensors per class also measured at their lowest format (the law's fit and check)
    map_tolerance: float = 3.0  # the check fails when a check point misses by more than this factor
    map_job: Optional[str] = None  # set by the sweeper on the map's own job: the map plan it computes errors for


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
    kind: Kind = Kind.weight
    # MoE models: "all" (the whole stack of experts), an int, a list, or "each" (one job per expert, from the model's
    # expert_count) -- for `*_exps` weights and activations whose rows belong to experts (sweep/quant/experts.py).
    expert: Any = "all"


def register() -> None:
    # The sweep dir carries the launching process's id: two sweeps started in the same second never share one.
    if not OmegaConf.has_resolver("sweep_pid"):
        OmegaConf.register_new_resolver("sweep_pid", lambda: str(os.getpid()), use_cache=True)
    cs = ConfigStore.instance()
    cs.store(name="score_schema", node=ScoreConfig)
    cs.store(name="sweep_schema", node=SweepConfig)
    cs.store(group="metrics", name="default", node=MetricsConfig)
    cs.store(group="run", name="default", node=RunConfig)
    for spec in FORMATS.values():  # the group `fmt=`, generated from the registry: one option per format
        cs.store(group="fmt", name=spec.name, node=FormatConfig(name=spec.name, granularity=spec.granularity))


register()


def compose(overrides=(), config_name: str = "config", with_hydra: bool = False) -> DictConfig:
    """The configuration the command line would give for `overrides` (Hydra's compose API, the real conf/); a bad
    override is a SweepError of one line."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = list(overrides)
    try:
        if GlobalHydra.instance().is_initialized():  # inside a Hydra app or an open initialize block
            return hydra_compose(config_name, overrides=overrides, return_hydra_config=with_hydra)
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="sweep"):
            return hydra_compose(config_name, overrides=overrides, return_hydra_config=with_hydra)
    except Exception as e:
        raise SweepError(f"bad configuration ({' '.join(overrides)}): {hydra_error_line(e)}") from None


def hydra_error_line(e: BaseException) -> str:
    """Hydra's multi-line message (and the first line of its cause) as one line, without search-path details."""
    text = str(e).split("Config search path")[0]
    cause = e.__cause__ or e.__context__
    if cause is not None and str(cause).strip():
        text += ": " + str(cause).strip().splitlines()[0]
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def hydra_command(config_name: str, run: Callable[[DictConfig], object]) -> Callable[..., None]:
    """A command's `main(argv)` over a Hydra app: `run` on the config `conf/<config_name>.yaml` composes, a user
    error as one line. Hydra reads its arguments from sys.argv, so an argv given is put there first."""

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)
    def app(cfg: DictConfig) -> None:
        exit_on_user_error(run, cfg)

    def main(argv: list[str] | None = None) -> None:
        if argv is not None:
            sys.argv = [sys.argv[0], *argv]
        overrides = [a for a in sys.argv[1:] if not a.startswith("-")]
        if overrides == sys.argv[1:]:  # no Hydra flag (--help, --cfg, ...): bad values are one line, not Hydra's
            exit_on_user_error(compose, overrides, config_name)
        app()

    return main
