"""What a sweep will cost, before it runs: points, baselines, disk, memory and time.

`python -m sweep ... --plan` prints these figures and exits without scoring or writing anything. Every sweep
checks the disk first: a store that would not fit the free space stops the sweep before any job, with one line
naming the figures and the ways out; a job that would not fit the available memory gets a warning.

The figures follow the layout of the store and of a job (docs/statistics.md "Budget of a stored baseline"):
  * a baseline keeps its raw float32 logits for exact KL: n_windows x (n_ctx/2 - 1) x n_vocab x 4 bytes, one per
    container key (the F32 container: one; the native container: one for activations and F32 weights, plus one
    per distinct set of quantized weight targets, which run on a copy with those tensors in F32);
  * a job holds the model in its container, llama.cpp's KV cache and logits, and three window-sized buffers
    (one window's logits and two scratch buffers of the per-window math);
  * the time comes from scoring one real window on this machine, as a baseline and as a point: an estimate.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import Keys
from omegaconf import DictConfig

from ..choices import LauncherKind, launcher_kind
from ..cores import available_cores
from ..errors import SweepError
from ..llama import capacity
from ..llama.capacity import RUNTIME_BYTES, as_f32, gb, gguf_sizes, kv_bytes, nearest_existing
from ..llama.container import compute_settings, f32_container_path, runtime_identity
from ..llama.model_file import model_info, sha256
from ..prefix.reuse import PrefixSettings, disk_bytes, unwritten_stages
from ..scoring.generation import complete
from ..scoring.perplexity import score
from ..scoring.text import load_text
from ..scoring.windows import make_windows
from ..store.records import Store, baseline_key
from .grid import Plan
from .grid import plan as grid_plan
from .job import cores_for_this_job, job_key
from .point import matched_targets
from .session import Session

RECORD_BYTES = 6_000  # one point's record.json (written twice: the store and the job's directory)


@dataclass
class Baseline:
    label: str  # what the baseline model is, in words
    key: str
    stored: bool
    group: int  # index of its Group
    n_points: int = 0  # points compared with it
    logits_bytes: int = 0  # disk its logits will take (0 when stored or not kept)


@dataclass
class Group:
    """The points of one model, container and slice: they share a loaded model and the window size."""

    source: Path
    container: str
    n_ctx: int
    n_windows: int
    n_vocab: int
    model_bytes: int  # the loaded file: the container, or the file as it is
    container_path: Path | None  # the F32 container's file (None for native)
    container_missing: bool
    kv_bytes: int
    copy_bytes: int = 0  # largest native copy with weight targets dequantized (loaded beside the model)
    # the largest weight point's targets in F32: originals kept to restore them, or the deltas of quantized ones
    # (sweep/quant/apply.py)
    originals_bytes: int = 0
    gen_prompts: tuple[str, ...] = ()
    max_new_tokens: int = 0
    kld: bool = True
    n_gpu_layers: int = 0
    rpc: str | None = None  # model.rpc: the RPC servers taking the offloaded layers
    recompute: bool = False  # metrics.baseline_logits=recompute: no logits on disk, a baseline decode per point
    n_todo: int = 0  # its points not yet in the store
    n_new_baselines: int = 0  # its baselines not yet in the store
    # prefix reuse (sweep/prefix/reuse.py): stage files and residuals in the cache, the largest stage loaded
    prefix_dir: Path | None = None
    prefix_bytes: int = 0
    prefix_model_bytes: int = 0

    @property
    def n_scored(self) -> int:
        return self.n_ctx - 1 - self.n_ctx // 2

    @property
    def window_bytes(self) -> int:
        return self.n_scored * self.n_vocab * 4

    @property
    def job_memory(self) -> int:
        # llama.cpp holds the scored rows' logits twice (the graph's output and the context's logits buffer);
        # the sweep three times (the window's logits, and the two scratch buffers of the per-window math).
        return (self.model_bytes + self.copy_bytes + self.originals_bytes + self.kv_bytes + 5 * self.window_bytes
                + self.prefix_model_bytes + RUNTIME_BYTES)


@dataclass
class Timing:
    threads: int
    file: Path
    on_container: bool  # timed on the F32 container itself (False: on the file as it is, container not built)
    load_s: float
    baseline_window_s: float  # one window scored as a baseline (decode + NLL, logits kept)
    point_window_s: float  # one window scored as a point (decode + NLL, ΔNLL, KL against the baseline)
    generation_s: float  # the generation check of one point: every prompt, max_new_tokens each
    placement: dict | None = None  # where the loaded model's weights are (Backend.placement: devices, layers)


@dataclass
class Costs:
    n_points: int
    n_points_stored: int
    baselines: list[Baseline]
    groups: list[Group]
    store: Path
    free_dir: Path  # the nearest existing directory of run.store: where free space is measured
    free_bytes: int
    records_bytes: int
    container_bytes_same_disk: int  # F32 containers to build on the store's file system
    launcher: LauncherKind
    launcher_cfg: DictConfig | None
    threads: int  # per job
    concurrent_jobs: int
    available_memory: int | None
    timings: list[Timing] = field(default_factory=list)
    stages: list = field(default_factory=list)  # prefix reuse's plan per model, both sides (prefix/plan.Settled)

    @property
    def sequential(self) -> bool:
        """One process runs the jobs one after another: the basic launcher (another one is taken for it)."""
        return self.launcher in (LauncherKind.basic, LauncherKind.other)

    @property
    def logits_bytes(self) -> int:
        return sum(b.logits_bytes for b in self.baselines)

    @property
    def store_bytes(self) -> int:
        return self.logits_bytes + self.records_bytes

    @property
    def needed_bytes(self) -> int:
        return self.store_bytes + self.container_bytes_same_disk

    @property
    def job_memory(self) -> int:
        return max(g.job_memory for g in self.groups)


# ---- the figures ---------------------------------------------------------------------------------------------

def costs(plan: Plan) -> Costs:
    """Every figure of the plan except the time (which needs a decode): cheap enough for every sweep."""
    first = plan.points[0][0]
    store = Store(first.run.store)
    kind = launcher_kind(plan.launcher)
    cores = available_cores()
    sequential = kind in (LauncherKind.basic, LauncherKind.other)  # as Costs.sequential
    threads = int(first.run.threads or cores_for_this_job(None if sequential else plan.launcher))
    concurrent = 1
    if kind == LauncherKind.joblib:
        n_jobs = int(plan.launcher.get("n_jobs") or 1) if plan.launcher is not None else 1
        concurrent = cores if n_jobs < 0 else min(n_jobs, len(plan.points))

    baselines: dict[str, Baseline] = {}
    groups: dict[tuple, Group] = {}
    sizes: dict[Path, tuple] = {}
    texts: dict[str, str] = {}
    n_stored = 0
    for s, target in plan.points:
        model, m = s.model, s.metrics
        source = model.source
        info = model_info(source)
        if source not in sizes:
            sizes[source] = gguf_sizes(source)
        file_bytes, tensors, meta = sizes[source]
        data_key = str(s.data.path)
        if data_key not in texts:
            texts[data_key] = load_text(s.data.path).sha256
        n_ctx = s.data.n_ctx
        n_windows = plan.n_windows[(str(model.path), s.data.path, n_ctx, s.data.n_windows)]
        recompute = m.baseline_logits == "recompute"
        settings = model.compute
        gkey = (source, model.container, n_ctx, n_windows)
        group = groups.get(gkey)
        if group is None:
            cpath = f32_container_path(source, model.cache) if model.container == "f32" else None
            group = groups[gkey] = Group(
                source, model.container, n_ctx, n_windows, info.n_vocab,
                as_f32(file_bytes, tensors, tensors) if cpath else file_bytes, cpath,
                cpath is not None and not cpath.exists(), kv_bytes(meta, info.arch, n_ctx, settings.kv_type),
                gen_prompts=m.prompts if m.generate != 0 else (), max_new_tokens=m.max_new_tokens, kld=m.kld,
                n_gpu_layers=model.n_gpu_layers, rpc=model.rpc, recompute=recompute)
            _prefix_costs(group, s.run.prefix, info, tensors, meta, file_bytes - sum(b for b, _ in tensors.values()))
        if target.kind == "weight":
            group.originals_bytes = max(group.originals_bytes,
                                        sum(4 * tensors[n][1] for n in target.names if n in tensors))
        matched = matched_targets(model.container, info, target, model.native_weights)
        if matched:
            group.copy_bytes = max(group.copy_bytes, as_f32(file_bytes, tensors, set(matched)))
        if store.point(job_key(s, sha256(source), texts[data_key], target.layers, target.experts)) is not None:
            n_stored += 1
            continue
        group.n_todo += 1
        bkey = baseline_key(sha256(source), model.container, matched, texts[data_key], n_ctx, n_windows,
                            runtime_identity(settings))
        if bkey not in baselines:
            with_logits = m.kld and not recompute
            stored = (store.root / "baselines" / f"{bkey}.npz").exists() and \
                (not with_logits or (store.root / "baselines" / f"{bkey}.logits.npy").exists())
            label = f"{model.container} container" + (f", {', '.join(matched)} dequantized to F32"
                                                      if matched else "")
            baselines[bkey] = Baseline(label, bkey, stored, list(groups).index(gkey),
                                       logits_bytes=0 if stored or not with_logits else
                                       n_windows * group.n_scored * info.n_vocab * 4)
            group.n_new_baselines += not stored
        baselines[bkey].n_points += 1

    free_dir = nearest_existing(store.root)
    free = shutil.disk_usage(free_dir).free
    store_dev = free_dir.stat().st_dev
    to_build = sum(g.model_bytes for g in groups.values() if g.container_missing and
                   g.container_path is not None and nearest_existing(g.container_path).stat().st_dev == store_dev) + \
        sum(g.prefix_bytes for g in groups.values() if g.prefix_dir and
            nearest_existing(g.prefix_dir).stat().st_dev == store_dev)
    to_compute = len(plan.points) - n_stored
    return Costs(len(plan.points), n_stored, list(baselines.values()), list(groups.values()), store.root, free_dir,
                 free, 2 * RECORD_BYTES * to_compute, to_build, kind, plan.launcher, threads, concurrent,
                 capacity.available_memory(), stages=list(plan.stages))


def _prefix_costs(group: Group, prefix: PrefixSettings, info, tensors: dict, meta: dict, header_bytes: int) -> None:
    """Prefix reuse's disk (stage files not yet written, residuals) and the largest stage held beside the model."""
    if not prefix.enabled or info.n_experts:
        return
    starts = prefix.starts_for(info.n_layers)
    if not starts:
        return
    cache = prefix.cache_dir
    n_embd = int(meta.get(Keys.LLM.EMBEDDING_LENGTH.format(arch=info.arch), 0))
    f32 = group.container == "f32"
    missing = unwritten_stages(cache, sha256(group.source), group.container, starts)
    stage_files, residuals = disk_bytes(tensors, info.n_layers, n_embd, group.n_windows, group.n_ctx, missing, f32,
                                        header_bytes)
    group.prefix_dir, group.prefix_bytes = cache, stage_files + residuals
    group.prefix_model_bytes = disk_bytes(tensors, info.n_layers, n_embd, 0, 0, starts[:1], f32)[0]


def check_resources(c: Costs) -> None:
    """Stop before any job when the store would not fit the disk or one job the memory; warn when parallel jobs
    together would not fit it."""
    if c.needed_bytes > c.free_bytes:
        container = (f" + {gb(c.container_bytes_same_disk)} F32 container and prefix reuse's stage files"
                     if c.container_bytes_same_disk else "")
        raise SweepError(
            f"the sweep needs {gb(c.needed_bytes)} on {c.free_dir} ({len([b for b in c.baselines if b.logits_bytes])}"
            f" baseline(s) of raw logits {gb(c.logits_bytes)} + records {gb(c.records_bytes)}{container}) but only "
            f"{gb(c.free_bytes)} is free: score fewer windows (data.n_windows=N), drop the logits with "
            f"metrics.kld=false (no KL columns), put the store elsewhere with run.store=/path/with/space, or "
            f"recompute each baseline window beside its point with metrics.baseline_logits=recompute (no disk, "
            f"twice the decode)" + (", or no stage files with run.prefix_reuse=false"
                                    if any(g.prefix_bytes for g in c.groups) else ""))
    if (why := memory_refusal(c)) is not None:
        raise SweepError(why)
    for line in memory_warnings(c):
        print(f"warning: {line}", file=sys.stderr)


def memory_refusal(c: Costs) -> str | None:
    """One line naming the ways out when one job cannot fit the memory (offloaded weights are not counted: they
    live on the devices), else None."""
    limit, where = capacity.memory_limit(c.launcher_cfg, c.available_memory)
    for g in c.groups:
        if limit is None or g.n_gpu_layers or g.job_memory <= limit:
            continue
        if g.prefix_model_bytes and g.job_memory - g.prefix_model_bytes <= limit:
            return (f"one job of {g.source.name} in the {g.container} container needs about {gb(g.job_memory)} with "
                    f"prefix reuse's largest stage ({gb(g.prefix_model_bytes)}) loaded beside the model, more than the "
                    f"{gb(limit)} {where}: use run.prefix_reuse=false (the model alone fits)")
        way_out = ("model.container=native (the file as it is) or model.container=auto" if g.container == "f32" else
                   "model.n_gpu_layers=-1 (a GPU) or model.rpc=HOST:PORT (RPC servers) to offload the layers, or a "
                   "machine with more memory" + (" (raise hydra.launcher.mem_gb)" if "mem_gb" in where else ""))
        return (f"one job of {g.source.name} in the {g.container} container needs about {gb(g.job_memory)}, more "
                f"than the {gb(limit)} {where}: use {way_out}")
    return None


def memory_warnings(c: Costs) -> list[str]:
    need = c.job_memory
    if c.concurrent_jobs > 1 and c.available_memory is not None and need * c.concurrent_jobs > c.available_memory:
        return [f"{c.concurrent_jobs} jobs at once x about {gb(need)} exceeds the {gb(c.available_memory)} of memory "
                f"available now; run fewer jobs at once (hydra.launcher.n_jobs)"]
    return []


# ---- the one-window timing -----------------------------------------------------------------------------------

def time_one_window(group: Group, text_path, threads: int) -> Timing:
    """Score one real window on this machine, as a baseline and as a point, and time the generation check."""
    file = group.container_path if group.container_path is not None and not group.container_missing else group.source
    on_container = file is group.container_path
    t0 = time.perf_counter()
    settings = compute_settings(group.container, group.n_gpu_layers, group.rpc)
    with Session(file, group.n_ctx, threads, settings) as session:  # as a job loads it
        b = session.backend
        load_s = time.perf_counter() - t0
        placement = b.placement()
        w = make_windows(session.tokens(load_text(text_path)), group.n_ctx, 1, b.bos if b.add_bos else None)
        logits = np.empty((1, w.n_scored, b.n_vocab), np.float32) if group.kld else None
        score(b, w, False, math=session.math)  # warm-up: the first decode after a load is slower than the rest
        base = score(b, w, False, keep_logits=logits, math=session.math)
        point = score(b, w, False, reference=base, math=session.math)
        generation_s = 0.0
        if group.gen_prompts:
            # The prompts with no new token, then with a few: the rest is extrapolated to the tokens a point
            # generates (max_new_tokens, or what the context leaves after the prompt, as `complete` does).
            complete(b, group.gen_prompts, 1)  # warm-up: new batch shapes are slow the first time
            t0 = time.perf_counter()
            complete(b, group.gen_prompts, 0)
            prompts_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            few = complete(b, group.gen_prompts, 4)
            new = sum(len(c.tokens) for c in few)
            per_token = max(0.0, time.perf_counter() - t0 - prompts_s) / new if new else 0.0
            room = [group.n_ctx - len(b.tokenize(b.chat_prompt(p))) for p in group.gen_prompts]
            generation_s = prompts_s + per_token * sum(max(0, min(group.max_new_tokens, r)) for r in room)
    return Timing(threads, file, on_container, load_s, base.seconds, point.seconds, generation_s, placement)


# ---- the printed plan ----------------------------------------------------------------------------------------

def plural(n: int) -> str:
    return "" if n == 1 else "s"


def duration(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.1f} s"


def render(c: Costs, text_path) -> str:
    """The plan, as printed by `python -m sweep ... --plan`."""
    lines = ["Plan (nothing scored, nothing written):"]
    todo = c.n_points - c.n_points_stored
    lines.append(f"  points      {c.n_points}" + (f" ({c.n_points_stored} already in the store, {todo} to compute)"
                                                   if c.n_points_stored else ""))
    for g in c.groups:
        lines.append(f"  model       {g.source.name}: {g.container} container, {gb(g.model_bytes)} loaded, "
                     f"vocabulary {g.n_vocab:,}; {g.n_windows} windows of {g.n_ctx} tokens ({g.n_scored} scored "
                     f"each)")
    new = [b for b in c.baselines if not b.stored]
    lines.append(f"  baselines   {len(c.baselines)} needed, {len(c.baselines) - len(new)} already stored")
    shown = c.baselines if len(c.baselines) <= 6 else c.baselines[:5]
    for b in shown:
        what = "stored" if b.stored else (f"logits {gb(b.logits_bytes)}" if b.logits_bytes else "no logits kept")
        lines.append(f"                {b.label} ({b.n_points} points; {what})")
    if len(shown) < len(c.baselines):
        lines.append(f"                ... and {len(c.baselines) - len(shown)} more, one per set of weight targets")
    lines.append(f"  disk        store {c.store}: {gb(c.store_bytes)} new = baseline logits {gb(c.logits_bytes)} "
                 f"+ records {gb(c.records_bytes)}; {gb(c.free_bytes)} free on {c.free_dir}"
                 + ("" if c.needed_bytes <= c.free_bytes else "  << DOES NOT FIT"))
    for g in c.groups:
        if g.container_missing:
            lines.append(f"              F32 container to build once: {gb(g.model_bytes)} in "
                         f"{g.container_path.parent if g.container_path else '-'}")
        if g.prefix_bytes:
            lines.append(f"              prefix reuse: stage files and residuals up to {gb(g.prefix_bytes)} in "
                         f"{g.prefix_dir} (sweep prefix-clean removes them; run.prefix_reuse=false: none)")
        if g.copy_bytes:
            lines.append(f"              native weight points: each runs on a temporary copy of up to "
                         f"{gb(g.copy_bytes)} in {tempfile.gettempdir()} (deleted after the point)")
    g = max(c.groups, key=lambda g: g.job_memory)
    parts = [f"model {gb(g.model_bytes)}"] + ([f"its F32-target copy {gb(g.copy_bytes)}"] if g.copy_bytes else []) + (
        [f"the targets in F32 (originals or deltas) {gb(g.originals_bytes)}"] if g.originals_bytes else []) + [
        f"KV cache {gb(g.kv_bytes)}", f"5 x {gb(g.window_bytes)} window logits (2 in llama.cpp, 3 in the "
        f"per-window math)", f"runtime ~{gb(RUNTIME_BYTES)}"] + (
        [f"prefix reuse's largest stage {gb(g.prefix_model_bytes)}"] if g.prefix_model_bytes else [])
    avail = f"; {gb(c.available_memory)} available now" if c.available_memory is not None else ""
    lines.append(f"  memory      one job ~{gb(g.job_memory)} = {' + '.join(parts)}{avail}")

    total = generating = 0.0
    for g, t in zip(c.groups, c.timings):
        where = "on the F32 container" if t.on_container else (
            "on the file as it is" + ("; the F32 container is not built yet and decodes at another speed"
                                      if g.container == "f32" else ""))
        lines.append(f"  one window  {t.point_window_s:.2f} s as a point, {t.baseline_window_s:.2f} s as a baseline "
                     f"(timed now, {t.threads} thread{plural(t.threads)}, {where}; load {t.load_s:.1f} s)"
                     + (f"; generation check {t.generation_s:.1f} s per point" if g.gen_prompts else ""))
        if t.placement:  # as llama.cpp placed the model just loaded (model.n_gpu_layers, model.rpc)
            lines.append(f"  devices     {t.placement['devices']}")
            lines.append(f"  layers      {t.placement['layer_devices']}")
        # recompute: every point also decodes its baseline's window (no logits stored, twice the decode)
        point_s = t.point_window_s + (t.baseline_window_s if g.recompute else 0.0)
        score_s = (g.n_todo * point_s + g.n_new_baselines * t.baseline_window_s) * g.n_windows
        generating += (g.n_todo + g.n_new_baselines) * t.generation_s
        total += t.load_s + score_s + (g.n_todo + g.n_new_baselines) * t.generation_s
    if c.timings:
        on_this_machine = c.sequential or c.launcher == LauncherKind.joblib
        where = "on this machine" if on_this_machine else "of compute in all, at this machine's speed"
        lines.append(f"  time        ~{duration(total / max(1, c.concurrent_jobs))} {where} (an estimate: "
                     f"load + {todo} point{plural(todo)} + {len(new)} baseline{plural(len(new))} x "
                     f"{c.groups[0].n_windows} windows"
                     + (f" + the generation check ({duration(generating / max(1, c.concurrent_jobs))}; "
                        f"metrics.generate=false skips it)" if generating else "")
                     + (f", {c.concurrent_jobs} jobs at once" if c.concurrent_jobs > 1 else "")
                     + "; early stopping and no-op weights only shorten it)")
    for s in c.stages:
        lines.append(f"  prefix      {s.line().removeprefix('prefix reuse: ')}")
    lines += _launcher_lines(c)
    if c.logits_bytes:
        lines.append("  smaller     metrics.kld=false: no logits on disk (no KL columns); "
                     "data.n_windows=N: logits scale with windows; metrics.baseline_logits=recompute: no logits on "
                     "disk, twice the decode")
    lines += [f"  warning     {w}" for w in memory_warnings(c)]
    if (why := memory_refusal(c)) is not None:
        lines.append(f"  DOES NOT FIT  {why}")
    return "\n".join(lines)


def _launcher_lines(c: Costs) -> list[str]:
    mem = gb(c.job_memory)
    if c.sequential:
        return [f"  launcher    sequential: one process, {c.threads} thread{plural(c.threads)}, the model loaded "
                f"once"]
    cfg: Any = c.launcher_cfg or {}
    if c.launcher == LauncherKind.joblib:
        lines = [f"  launcher    joblib: {c.concurrent_jobs} jobs at once, {c.threads} thread{plural(c.threads)} per "
                 f"job, ~{mem} per job ({gb(c.job_memory * c.concurrent_jobs)} together)"]
    else:
        lines = [f"  launcher    {c.launcher}: {c.n_points} tasks, 1 point per task, "
                 f"{c.threads} thread{plural(c.threads)} per task (cpus_per_task), memory per task ~{mem}"
                 + (f" vs mem_gb={cfg.get('mem_gb')}" if cfg.get("mem_gb") else "")
                 + (f", up to {cfg.get('array_parallelism')} at once" if cfg.get("array_parallelism") else "")]
    for g in c.groups:
        if g.container_missing:  # every job that starts before it exists would build its own copy
            lines.append(f"              the F32 container is not built yet: jobs starting at once would each "
                         f"write {gb(g.model_bytes)}; build it first (sweep score data.n_windows=2 "
                         f"model.path=...)")
    if c.timings and c.launcher != LauncherKind.joblib:
        t, g = c.timings[0], c.groups[0]
        task = t.load_s + g.n_windows * t.point_window_s + t.generation_s
        lines.append(f"              per task ~{duration(task)} (load + one point), plus "
                     f"~{duration(g.n_windows * t.baseline_window_s)} in a task that computes a missing baseline "
                     f"(timed here: the cluster's nodes differ; tasks that start before a baseline is stored "
                     f"each compute it, each with its own temporary logits file)")
    return lines


def print_plan(overrides: list[str]) -> None:
    """`sweep plan ...`: validate the grid, measure one window, print the plan; write nothing."""
    print_grid_plan(grid_plan(overrides))


def print_grid_plan(p: Plan) -> None:
    """The plan of a validated grid, with one window timed on this machine."""
    c = costs(p)
    cores = available_cores()
    text_path = p.points[0][0].data.path
    for g in c.groups:
        c.timings.append(time_one_window(g, text_path, min(c.threads, cores)))
    print(render(c, text_path))
    if p.map is not None:  # the points above are the exact ones; the map's own job decodes the windows once more
        print(f"  map         {p.map.summary().removeprefix('run.estimate=map: ')} (docs/estimate.md)")
