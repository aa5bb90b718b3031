"""Before any job starts: expand the grid and validate every point of it against the model it will run on.

Hydra would find some mistakes only when it reaches the job that has them (an unknown format in the 40th job),
and others -- a layer past the model's last block, a tensor the model does not have -- only llama.cpp would
find, silently. Here every point is composed and checked first; the first mistake is one line and exit code 2.
This also expands `layer=each` to one job per block of the model.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hydra import initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from . import ggml_formats
from .config import CONF_DIR, compose, hydra_error_line
from .container import compute_settings
from .errors import SweepError
from .experts import refuse_unquantized_type
from .formats import make_format
from .gencheck import generation_mode
from .metrics import RANKABLE
from .model_file import ModelInfo, model_info, resolve_model_path
from .targets import Target, resolve

# Hydra's own command-line flags: with these the user asks Hydra something (help, config, completion), not to run.
HYDRA_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc",
               "--resolve", "-p", "--package")


@dataclass
class Plan:
    jobs: list[list[str]]  # the override list of every job, in launch order
    extra_argv: list[str] = field(default_factory=list)  # what to append to argv (the expanded layer=each)
    # What the checks learned, for `planning.py` (what the sweep will cost): each job's composed config and
    # resolved target, the launcher's config, and the windows the text gives per (model, text, n_ctx, n_windows).
    points: list[tuple[DictConfig, Target]] = field(default_factory=list)
    launcher: DictConfig | None = None
    n_windows: dict[tuple, int] = field(default_factory=dict)


class _Checker:
    """Validates points, remembering what it learned about each model file."""

    def __init__(self):
        self.infos: dict[str, ModelInfo] = {}
        self.nodes: dict[tuple, dict] = {}  # (path, compute settings) -> the graph's nodes
        self.probed: set = set()
        self.tokens: dict[tuple, object] = {}
        self.n_windows: dict[tuple, int] = {}  # (path, text path, n_ctx, n_windows) -> windows scored

    def info(self, path) -> ModelInfo:
        key = str(path)
        if key not in self.infos:
            self.infos[key] = model_info(resolve_model_path(path))
        return self.infos[key]

    def graph_nodes(self, path, settings) -> dict:
        self.probe(path, None, 0, 0, settings)
        return self.nodes[(str(path), settings)]

    def probe(self, path, text_path, n_ctx: int, n_windows: int, settings) -> None:
        """Load the model as llama.cpp will (an architecture it cannot load fails here), learn its graph's nodes as
        the job's settings build them (flash attention and the cache type change the graph), and check that the
        text gives at least two windows."""
        from .backend import Backend
        from .perplexity import make_windows
        from .text import load_text

        key = (str(path), text_path, n_ctx, settings)
        if key not in self.probed:
            text = load_text(text_path) if n_ctx else None  # before the model: a missing text fails fast
            with Backend(self.info(path).path, 32, 1, settings=settings) as b:  # small: names and tokens need no more
                self.nodes[(str(path), settings)] = b.nodes
                if text is not None:
                    self.tokens[key] = b.tokenize(text.text)
            self.probed.add(key)
        if n_ctx and (str(path), text_path, n_ctx, n_windows) not in self.n_windows:
            self.n_windows[(str(path), text_path, n_ctx, n_windows)] = make_windows(
                self.tokens[key], n_ctx, n_windows, None).n_windows

    def check(self, cfg) -> Target:
        """What composition cannot check (choices and types it does: sweep/config.py)."""
        fmt = make_format(**cfg.fmt)
        generation_mode(cfg.metrics.generate)
        if not 0 < cfg.metrics.alpha < 1:
            raise SweepError(f"metrics.alpha={cfg.metrics.alpha} must be between 0 and 1 (e.g. 0.05)")
        stop = cfg.metrics.early_stop
        if stop.enabled:
            if stop.min_windows < 2 or stop.rtol < 0 or stop.atol < 0:
                raise SweepError(f"metrics.early_stop needs min_windows >= 2 and rtol, atol >= 0 (got min_windows="
                                 f"{stop.min_windows}, rtol={stop.rtol}, atol={stop.atol})")
            if RANKABLE[cfg.metrics.rank_by].needs_logits and not cfg.metrics.kld:
                raise SweepError(f"metrics.early_stop watches metrics.rank_by={cfg.metrics.rank_by}, which needs "
                                 f"metrics.kld=true")
        if cfg.layer == "each":
            raise SweepError("layer=each cannot be combined with this sweep; give the layers explicitly")
        if cfg.expert == "each":
            raise SweepError("expert=each cannot be combined with this sweep; give the experts explicitly")
        ggml_formats.check_kind(fmt, cfg.kind)
        info = self.info(cfg.model.path)
        settings = compute_settings(cfg.model.container, cfg.model.n_gpu_layers)
        self.probe(cfg.model.path, cfg.data.path, int(cfg.data.n_ctx), int(cfg.data.n_windows), settings)
        nodes = self.graph_nodes(cfg.model.path, settings) if cfg.kind == "activation" else None
        target = resolve(cfg.kind, cfg.tensor,
                         OmegaConf.to_object(cfg.layer) if OmegaConf.is_config(cfg.layer) else cfg.layer, info, nodes,
                         cfg.expert)
        if cfg.kind == "weight" and cfg.tensor != "all":  # (tensor=all: a whole block or file, as before)
            refuse_unquantized_type(fmt, target.names, info)
        if not target.token_rows and fmt.rowwise:
            raise SweepError(f"{fmt.label} rounds per row, but node {cfg.tensor!r} does not have one row per token "
                             f"(its tokens are not its outermost axis): use fmt.granularity=per_tensor")
        ggml_formats.preflight(fmt, cfg.kind, target.names)
        return target


def plan(overrides: list[str]) -> Plan:
    """Every job of the sweep that `overrides` asks for, each composed and validated."""
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(overrides)
    except Exception as e:
        raise SweepError(f"cannot parse the command line: {hydra_error_line(e)}") from None
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    checker = _Checker()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="sweep"):
        base = compose(fixed, with_hydra=True)
        params = base.hydra.sweeper.params or {}
        grid = parser.parse_overrides([f"{k}={v}" for k, v in params.items()] + list(overrides))
        jobs = BasicSweeper.split_arguments(grid, None)[0]
        extra = []
        jobs, extra = _expand_experts(jobs, checker, parser, params, overrides, extra=[])
        if any("layer=each" in job for job in jobs):
            counts = {checker.info(compose(job).model.path).n_layers for job in jobs if "layer=each" in job}
            if len(counts) > 1:
                raise SweepError(f"layer=each over models with different block counts {sorted(counts)}: "
                                 f"give the layers explicitly, e.g. layer=range(0,{min(counts)})")
            n_layers = counts.pop()
            extra += [f"layer={','.join(map(str, range(n_layers)))}"]
            jobs = BasicSweeper.split_arguments(parser.parse_overrides(
                [f"{k}={v}" for k, v in params.items()] + list(overrides) + extra), None)[0]
        points = []
        for job in jobs:
            cfg = compose(job)
            points.append((cfg, checker.check(cfg)))
        for directory in {str(Path(base.run.store)), str(Path(base.hydra.sweep.dir))}:
            check_writable(Path(directory))
    if not jobs:
        raise SweepError("the sweep has no points")
    return Plan(jobs, extra, points, base.hydra.launcher, checker.n_windows)


def _expand_experts(jobs, checker, parser, params, overrides, extra):
    """`expert=each`: one job per expert, from the model's expert_count (as layer=each from its block count)."""
    if not any("expert=each" in job for job in jobs):
        return jobs, extra
    counts = {checker.info(compose(job).model.path).n_experts for job in jobs if "expert=each" in job}
    if counts == {0}:
        path = checker.info(compose(next(j for j in jobs if "expert=each" in j)).model.path).path
        raise SweepError(f"expert=each needs a Mixture-of-Experts model; {path.name} has no expert_count: drop expert=")
    if len(counts) > 1:
        raise SweepError(f"expert=each over models with different expert counts {sorted(counts)}: give the experts "
                         f"explicitly, e.g. expert=range(0,{min(c for c in counts if c)})")
    extra = extra + [f"expert={','.join(map(str, range(counts.pop())))}"]
    return BasicSweeper.split_arguments(parser.parse_overrides(
        [f"{k}={v}" for k, v in params.items()] + list(overrides) + extra), None)[0], extra


def check_writable(directory: Path) -> None:
    """Fail now, not after the first point, when results could not be written.

    Permission bits are not enough (root passes them; /proc refuses anyway): make and remove a directory where
    `directory` would be created. Nothing is left behind."""
    existing = directory.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    why = f"{existing} is not a directory" if not existing.is_dir() else None
    if why is None:
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".sweep-write-check-", dir=existing))
        except OSError as e:
            why = f"{existing}: {e.strerror}"
    if why:
        raise SweepError(f"cannot write to {directory} ({why}): run from a writable directory or set "
                         f"run.store=... and hydra.sweep.dir=... to writable paths")


def wants_hydra_only(argv: list[str]) -> bool:
    return any(a.split("=")[0] in HYDRA_FLAGS for a in argv)
