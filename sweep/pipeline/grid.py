"""Before any job starts: expand the grid and validate every point of it against the model it will run on.

Hydra would find some mistakes only when it reaches the job that has them (an unknown format in the 40th job),
and others -- a layer past the model's last block, a tensor the model does not have -- only llama.cpp would
find, silently. Here every point is composed and checked first; the first mistake is one line and exit code 2.
This also expands `layer=each` to one job per block of the model.
"""

from __future__ import annotations

import copy
import itertools
import os
import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig, OmegaConf

from ..choices import LauncherKind, launcher_kind
from ..errors import SweepError
from ..estimate.plan import MapPlan, split
from ..llama.backend import Backend, tokens_of
from ..llama.model_file import ModelInfo, model_info, resolve_model_path
from ..prefix.plan import Settled, StageInputs, plan_for
from ..prefix.reuse import static_fallback
from ..quant import ggml_types
from ..quant.experts import refuse_unquantized_type
from ..quant.targets import Target
from ..scoring.text import load_text
from ..scoring.windows import make_windows
from .config import CONF_DIR, compose, hydra_error_line
from .settings import JobSettings, auto_choice, job_settings, with_prefix_starts


@dataclass
class Plan:
    jobs: list[list[str]]  # the override list of every job, in launch order
    launch: list[list[str]] = field(default_factory=list)  # the same without Hydra's own overrides: what is launched
    # What the checks learned, for `costs.py` (what the sweep will cost): each job's settings and resolved target,
    # the launcher's config, and the windows the text gives per (model, text, n_ctx, n_windows).
    points: list[tuple[JobSettings, Target]] = field(default_factory=list)
    launcher: DictConfig | None = None
    n_windows: dict[tuple, int] = field(default_factory=dict)
    stages: list = field(default_factory=list)  # prefix reuse's plan per model (prefix/plan.Settled)
    map: MapPlan | None = None  # run.estimate=map: the map's plan (`jobs` are then the exact points only)


class _Checker:
    """Validates points, remembering what it learned about each model file."""

    def __init__(self):
        self.infos: dict[str, ModelInfo] = {}
        self.nodes: dict[tuple, dict] = {}  # (path, compute settings) -> the graph's nodes
        self.tokens: dict[tuple, np.ndarray] = {}
        self.n_windows: dict[tuple, int] = {}  # (path, text path, n_ctx, n_windows) -> windows scored
        self.containers: dict[tuple, str] = {}  # model.container=auto's choices

    def container(self, s: JobSettings, launcher) -> str:
        """model.container=auto's choice for this job's model and window, said once per model."""
        key = (s.model.path, s.data.n_ctx, s.model.cache_dir, bool(s.model.n_gpu_layers))
        if key not in self.containers:
            chosen, why = auto_choice(s, launcher)
            print(f"model.container=auto: {chosen} for {self.info(s.model.path).path.name} ({why})", flush=True)
            self.containers[key] = chosen
        return self.containers[key]

    def info(self, path) -> ModelInfo:
        key = str(path)
        if key not in self.infos:
            self.infos[key] = model_info(resolve_model_path(path))
        return self.infos[key]

    def graph_nodes(self, path, settings) -> dict:
        """The graph's nodes as the job's settings build them (flash attention and the cache type change the graph):
        a model loaded (mapped, not copied) with a small context and one probe decode; activation points only."""
        key = (str(path), settings)
        if key not in self.nodes:
            with Backend(self.info(path).path, 32, 1, settings=settings) as b:
                self.nodes[key] = b.nodes
        return self.nodes[key]

    def probe(self, path, text_path, n_ctx: int, n_windows: int) -> None:
        """Check that llama.cpp reads the file (an architecture it cannot load fails here: its vocabulary and
        metadata are read, not its weights) and that the text gives at least two windows."""
        key = (str(path), text_path)
        if key not in self.tokens:
            text = load_text(text_path)  # before the model: a missing text fails fast
            self.tokens[key] = tokens_of(self.info(path).path, text.text)
        if (str(path), text_path, n_ctx, n_windows) not in self.n_windows:
            self.n_windows[(str(path), text_path, n_ctx, n_windows)] = make_windows(
                self.tokens[key], n_ctx, n_windows, None).n_windows

    def windows(self, s: JobSettings) -> int:
        """The windows a checked point of `s` scores."""
        return self.n_windows[(str(s.model.path), s.data.path, s.data.n_ctx, s.data.n_windows)]

    def check(self, s: JobSettings) -> Target:
        """What composition and the settings cannot check (choices and types composition does:
        sweep/pipeline/config.py; single values the settings: sweep/pipeline/settings.py)."""
        p = s.point
        fmt = p.fmt
        if p.layer == "each":
            raise SweepError("layer=each cannot be combined with this sweep; give the layers explicitly")
        if p.expert == "each":
            raise SweepError("expert=each cannot be combined with this sweep; give the experts explicitly")
        ggml_types.check_kind(fmt, p.kind)
        info = self.info(s.model.path)
        compute = s.model.compute  # (model.rpc is checked here, whatever the kind)
        self.probe(s.model.path, s.data.path, s.data.n_ctx, s.data.n_windows)
        nodes = self.graph_nodes(s.model.path, compute) if p.kind == "activation" else None
        target = p.target(info, nodes)
        if p.kind == "weight" and p.tensor != "all":  # (tensor=all: a whole block or file, as before)
            refuse_unquantized_type(fmt, target.names, info)
        if not target.token_rows and fmt.rowwise:
            raise SweepError(f"{fmt.label} rounds per row, but node {p.tensor!r} does not have one row per token "
                             f"(its tokens are not its outermost axis): use fmt.granularity=per_tensor")
        ggml_types.preflight(fmt, p.kind, target.names)
        return target


def check_composes(overrides: list[str]) -> None:
    """The configuration that Hydra composes before its sweeper runs (every override but the swept ones): a bad value
    there is one line here, not Hydra's message."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:
        raise SweepError(f"cannot parse the command line: {hydra_error_line(e)}") from None
    with _config_dir():
        compose([o.input_line for o in parsed if not o.is_sweep_override()], with_hydra=True)


def plan(overrides: list[str]) -> Plan:
    """Every job of the sweep that `overrides` asks for, each composed and validated."""
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(overrides)
    except Exception as e:
        raise SweepError(f"cannot parse the command line: {hydra_error_line(e)}") from None
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    checker = _Checker()
    with _config_dir():
        base = compose(fixed, with_hydra=True)
        params = [f"{k}={v}" for k, v in (base.hydra.sweeper.params or {}).items()]
        composer = JobComposer(set(base.hydra.runtime.choices))
        jobs = expand(parser.parse_overrides(params + list(overrides)))
        each = [*_each("expert", jobs, checker, composer), *_each("layer", jobs, checker, composer)]
        if each:
            jobs = expand(parser.parse_overrides(params + list(overrides) + each))
        points = []
        for job in jobs:
            settings = job_settings(composer(job))
            if settings.model.container == "auto":  # settled here once, so that every job runs in the same one
                job.append(f"model.container={checker.container(settings, base.hydra.launcher)}")
                settings = job_settings(composer(job))
            points.append((settings, checker.check(settings)))
        map_plan, exact = split(jobs, points, lambda s: checker.info(s.model.path))
        if map_plan is not None:  # the predicted points are not launched: the map's plan holds them
            print(map_plan.summary(), flush=True)
            jobs, points = [jobs[i] for i in exact], [points[i] for i in exact]
        points, stages = settle_starts(jobs, points, lambda s: checker.info(s.model.path), checker.windows)
        for directory in {str(Path(base.run.store)), str(Path(base.hydra.sweep.dir))}:
            check_writable(Path(directory))
    if not jobs:
        raise SweepError("the sweep has no points")
    hydra_keys = {o.get_key_element() for o in parsed if o.is_hydra_override()}
    launch = [[a for a in job if a.split("=", 1)[0] not in hydra_keys] for job in jobs]
    check_rpc_launcher(points, base.hydra.launcher)
    return Plan(jobs, launch, points, base.hydra.launcher, checker.n_windows, stages, map_plan)


class JobComposer:
    """Each job's configuration as `compose(job)` gives it, in about 1 ms instead of 80: Hydra composes once per
    choice of config groups (fmt=, model=, hydra/launcher=, ...), and the job's other values are set on a copy as
    Hydra sets them after the defaults list (OmegaConf.update, checked by the schema). A grid of thousands of points
    is checked in seconds. Anything else -- `+key`, `~key`, `key@package`, a value the schema refuses -- goes
    through Hydra's compose, which says what is wrong in its own words."""

    def __init__(self, groups: set[str]):
        self.groups = groups  # the config groups (the base config's hydra.runtime.choices)
        self.parser = OverridesParser.create()
        self.composed: dict[tuple[str, ...], DictConfig] = {}

    def __call__(self, job: list[str]) -> DictConfig:
        try:
            parsed = self.parser.parse_overrides(job)
        except Exception:
            return compose(job)
        if any(o.is_add() or o.is_delete() or o.is_force_add() or o.package is not None for o in parsed):
            return compose(job)
        choice = tuple(str(o.input_line) for o in parsed if o.key_or_group in self.groups)
        if choice not in self.composed:
            self.composed[choice] = compose(list(choice))
        cfg = copy.deepcopy(self.composed[choice])
        try:
            for o in parsed:
                if o.key_or_group not in self.groups:
                    OmegaConf.update(cfg, o.key_or_group, o.value(), merge=True)
        except Exception:
            return compose(job)
        return cfg


def settle_starts(jobs: list[list[str]], points: list[tuple[JobSettings, Target]], info_of: Callable,
                  windows_of: Callable) -> tuple[list[tuple[JobSettings, Target]], list[Settled]]:
    """run.prefix_starts for every job that reuses a prefix and does not name its stages: one plan per model file
    and container (sweep/prefix/plan.py), from the first layers and windows of its points that can reuse one; each
    job gets the override (so that every job of the sweep uses the same stage files) and its settings the value.
    info_of(settings) -> ModelInfo; windows_of(settings) -> the windows a point scores. Says the choice once per
    model. Returns the points with their settings settled, and the plans."""
    groups: dict[tuple, list[int]] = {}
    for i, (s, _) in enumerate(points):
        if s.run.prefix.enabled and s.run.prefix.starts is None:
            groups.setdefault((str(s.model.path), s.model.container, s.model.cache_dir), []).append(i)
    points, settled = list(points), []
    for members in groups.values():
        first = points[members[0]][0]
        info = info_of(first)
        first_layers: dict[int, float] = {}
        for s, target in (points[i] for i in members):
            if target.layers and static_fallback(info.n_experts, bool(s.point.fmt.recipe),
                                                 s.metrics.generate is None) is None:
                first_layers[min(target.layers)] = first_layers.get(min(target.layers), 0) + windows_of(s)
        starts: tuple[int, ...] = ()
        if first_layers:
            plan_of_model = plan_for(stage_inputs(first, info, windows_of(first)), first_layers)
            settled.append(plan_of_model)
            starts = plan_of_model.plan.starts
            print(plan_of_model.line(), flush=True)
        for i in members:
            jobs[i].append(f"run.prefix_starts=[{','.join(map(str, starts))}]")
            points[i] = (with_prefix_starts(points[i][0], tuple(starts)), points[i][1])
    return points, settled


def stage_inputs(s: JobSettings, info: ModelInfo, n_windows: int) -> StageInputs:
    return StageInputs(info, s.model.container, s.data.n_ctx, n_windows, s.model.compute, s.run.n_threads,
                       s.run.prefix.cache_dir, s.run.prefix.n_stages, s.run.prefix_min_gain, s.data.path,
                       s.run.store)


# AXIS=each: one job per value 0..N-1, N read from the model: (ModelInfo field, what one is called, their plural)
_EACH = {"layer": ("n_layers", "block", "layers"), "expert": ("n_experts", "expert", "experts")}


def _each(axis: str, jobs: list[list[str]], checker, composer: JobComposer) -> list[str]:
    """[`AXIS=0,1,...`] for the jobs that ask for `AXIS=each` (layer: the model's blocks, expert: its experts per
    layer); [] when none does."""
    asking = [job for job in jobs if f"{axis}=each" in job]
    if not asking:
        return []
    field_name, noun, plural = _EACH[axis]
    infos = [checker.info(composer(job).model.path) for job in asking]
    counts = {getattr(info, field_name) for info in infos}
    if counts == {0}:
        raise SweepError(f"{axis}=each needs a Mixture-of-Experts model; {infos[0].path.name} has no expert_count: "
                         f"drop {axis}=")
    if len(counts) > 1:
        raise SweepError(f"{axis}=each over models with different {noun} counts {sorted(counts)}: give the {plural} "
                         f"explicitly, e.g. {axis}=range(0,{min(c for c in counts if c)})")
    return [f"{axis}={','.join(map(str, range(counts.pop())))}"]


def expand(overrides: list[Override]) -> list[list[str]]:
    """Every job of a grid in launch order, as Hydra's basic sweeper orders them: the product of the axes in the
    order each key first appears (a later value of a key replaces the earlier one in its place), the last fastest."""
    axes: dict[str, list[str]] = {}
    for o in overrides:
        key = o.get_key_element()
        if not o.is_sweep_override():
            axes[key] = [f"{key}={o.get_value_element_as_str()}"]
        elif o.is_discrete_sweep():
            axes[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
        else:
            raise SweepError(f"{o.input_line}: an interval has no points to sweep; give values or range(a,b)")
    return [list(job) for job in itertools.product(*axes.values())]


def _config_dir():
    """Composition needs Hydra's global state: the running app's (inside the sweeper), else conf/ for the call."""
    if GlobalHydra.instance().is_initialized():
        return nullcontext()
    return initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="sweep")


def check_rpc_launcher(points, launcher) -> None:
    """An RPC server serves one client at a time (llama.cpp's rpc_serve_client loop): parallel jobs on the same
    servers would only wait for each other, each holding the model in the servers' memory in turn."""
    if any(s.model.rpc for s, _ in points) and launcher_kind(launcher) != LauncherKind.basic:
        raise SweepError("model.rpc runs with the sequential launcher only (an RPC server serves one client at a "
                         "time, so parallel jobs would queue on it): drop hydra/launcher=...")


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

