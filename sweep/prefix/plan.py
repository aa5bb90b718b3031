"""Before launch: the stages each model of a sweep decodes from (run.prefix_starts), chosen from the layers and
windows of its points in seconds and bytes (the plan itself: sweep/prefix/solve.py), as
model.container=auto is settled once for every job (sweep/llama/capacity.py).

The seconds, per model file, container, window size and threads:
  * first a screen from the model's FLOPs (its matrices x tokens, the head x scored rows): when even with free
    files the best plan would not save more than timing costs (TIMING_WINDOWS), nothing is timed and reuse is off;
  * otherwise one window is timed in llama.cpp, split at the last block's output into the blocks' time and the
    head's (sweep/llama/block_timing.py), and kept beside the stage files (`<cache>/stages/profile-<key>.json`) for
    the next sweep; on the loaded file when it exists, else on the file as it is;
  * the stage files' write and load speeds are the last ones measured in this cache (prefix.io_speeds).
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import Keys

from ..cores import available_memory
from ..files import atomic_write_bytes
from ..llama.backend import Backend, ComputeSettings
from ..llama.block_timing import blocks_and_head_seconds
from ..llama.cache import profile_file, residuals_file
from ..llama.capacity import gb, gguf_sizes, nearest_existing, need
from ..llama.container import f32_container_path, runtime_identity
from ..llama.gguf_names import block_of
from ..llama.model_file import ModelInfo, sha256
from ..llama.stage_check import stage_refusal
from ..scoring.text import load_text
from ..scoring.window_math import BaselineWindow, WindowMath
from ..store.records import Store, baseline_key, point_key
from .reuse import disk_bytes, io_speeds, residuals_key_of, unwritten_stages
from .solve import MARGIN, StageCosts, StagePlan, plan_stages

TIMING_WINDOWS = 2  # what timing a window costs (a load and the window): a plan must promise more to be timed
PROBE_S = 0.75  # a child process that starts and imports llama_cpp (stage_check.probe_stage: 0.76 s with a load)


@dataclass(frozen=True)
class Settled:
    """What the plan of one model's stages weighed: printed by the sweep and by `--plan`."""

    model: str
    plan: StagePlan
    costs: StageCosts
    head_share: float  # of one window's decode
    stage_memory: int  # bytes of the largest stage held beside the model
    n_point_windows: float

    def line(self) -> str:
        p, c = self.plan, self.costs
        unit = " FLOP" if c.source == "FLOPs" else " s"
        timing = (f"{c.block_s:.3g}{unit} per block and {c.head_s:.3g}{unit} for the head per window, "
                  + ("from the model's FLOPs, nothing timed" if c.source == "FLOPs" else c.source))
        if not p.starts:
            return (f"prefix reuse: none for {self.model}: no stage pays here (a plan must save {_margin()}x what its "
                    f"stages cost, and run.prefix_min_gain of the sweep; the head is {self.head_share:.0%} of "
                    f"a window and every window still decodes it; {timing})"
                    + (f"; left out: {_refused(p)}" if p.refused else ""))
        return (f"prefix reuse: stages at blocks {', '.join(map(str, p.starts))} for {self.model}: saves ~"
                f"{p.saving_s:.0f} s of block decode for ~{p.overhead_s:.0f} s of stage work (files, identity "
                f"windows, residuals), {gb(self.stage_memory)} beside the model; decoding {p.block_ratio:.2f} of the "
                f"full decodes' block-windows ({self.n_point_windows:g} point-windows; {timing})"
                + (f"; left out: {_refused(p)}" if p.refused else ""))


def _margin() -> str:
    return f"{MARGIN:g}"


def _refused(p: StagePlan) -> str:
    return ", ".join(f"block {s} ({why})" for s, why in sorted(p.refused.items()))


@dataclass(frozen=True)
class StageInputs:
    """What the plan of one model's stages reads of its jobs' settings."""

    info: ModelInfo
    container: str  # "f32" | "native"
    n_ctx: int
    n_windows: int  # the windows a point scores
    compute: ComputeSettings
    threads: int
    cache_dir: Path  # stage files, residuals, the timed window (model.cache_dir)
    n_stages: int  # run.prefix_stages
    min_gain: float  # run.prefix_min_gain
    data_path: str | None
    store: Path  # run.store: whether the baseline is stored already


def plan_for(s: StageInputs, first_layers: dict[int, float]) -> Settled:
    """The stages of one model: screened by FLOPs, then planned on a timed window."""
    info, n_windows = s.info, s.n_windows
    n, container, n_ctx = info.n_layers, s.container, s.n_ctx
    source, cache = info.path, s.cache_dir
    file_bytes, tensors, meta = gguf_sizes(source)
    f32 = container == "f32"
    header = file_bytes - sum(b for b, _ in tensors.values())

    @functools.cache
    def stage_bytes(start: int) -> int:
        return disk_bytes(tensors, n, 0, 0, 0, (start,), f32, header)[0]

    @functools.cache
    def allowed(start: int) -> bool:
        return stage_refusal(source, start) is None

    capture = _capture_windows(s, sorted(first_layers))
    block_f, head_f = window_flops(info, tensors, meta, n_ctx)
    screen = StageCosts(n, block_f, head_f, capture_s=capture * (n * block_f + head_f), allowed=allowed,
                        source="FLOPs")
    k = s.n_stages
    plan = plan_stages(first_layers, screen, k)
    head_share = head_f / (n * block_f + head_f)
    if plan.net_s <= TIMING_WINDOWS * (n * block_f + head_f) and not _profile_path(s).exists():
        # even with free files the best plan would not save what timing it costs: reuse is off, nothing timed
        none = StagePlan((), plan.full_s, plan.full_s, 0.0, 1.0, plan.refused)
        return Settled(source.name, none, screen, head_share, 0, sum(first_layers.values()))

    block_s, head_s, math_s, timed = decode_profile(s)
    speeds = io_speeds(cache)
    sha = sha256(source)

    def prepare_s(start: int) -> float:
        size = stage_bytes(start)
        written = not unwritten_stages(cache, sha, container, (start,))
        return (0.0 if written else size / speeds["write"]) + (0.0 if written else PROBE_S + size / speeds["load"]) \
            + size / speeds["load"]

    job = need(source, container, info.arch, info.n_vocab, n_ctx).total
    memory = available_memory()
    free_disk = shutil.disk_usage(nearest_existing(cache)).free // 2  # stage files may take half the free disk

    def fits(starts: tuple[int, ...]) -> bool:
        on_disk = sum(stage_bytes(start) for start in unwritten_stages(cache, sha, container, starts))
        return on_disk <= free_disk and (memory is None or job + stage_bytes(min(starts)) <= memory)

    costs = StageCosts(n, block_s, head_s, prepare_s, capture * (n * block_s + head_s), allowed, fits, timed)
    plan = plan_stages(first_layers, costs, k)
    # the sweep without reuse: every point's windows and the baseline's, through every block and the head, and each
    # point window's math (at a 262k vocabulary, a fair share of the window)
    sweep_s = (sum(first_layers.values()) + n_windows) * (n * block_s + head_s) + sum(first_layers.values()) * math_s
    min_gain = s.min_gain
    if plan.starts and plan.net_s < min_gain * sweep_s:
        plan = StagePlan((), plan.full_s, plan.full_s, 0.0, 1.0,
                         {**plan.refused, **{start: f"saves {plan.net_s / sweep_s:.0%} of the sweep, below "
                                                    f"run.prefix_min_gain={min_gain:g}" for start in plan.starts}})
    return Settled(source.name, plan, costs, head_s / (n * block_s + head_s),
                   stage_bytes(min(plan.starts)) if plan.starts else 0, sum(first_layers.values()))


def window_flops(info, tensors: dict, meta: dict, n_ctx: int) -> tuple[float, float]:
    """FLOPs of one window through one (average) block, and through the output head: every matrix times every
    token, attention over the window's causal half, the output matrix times the scored rows."""
    arch, n = info.arch, info.n_layers
    matrices = sum(elements for name, (_, elements) in tensors.items()
                   if block_of(name) is not None and len(info.tensor_shapes.get(name, ())) >= 2)
    width = _first(meta, Keys.LLM.EMBEDDING_LENGTH.format(arch=arch))
    heads = _first(meta, Keys.Attention.HEAD_COUNT.format(arch=arch)) or 1
    key_len = _first(meta, Keys.Attention.KEY_LENGTH.format(arch=arch)) or width // heads
    attention = 2 * 2 * heads * key_len * n_ctx * n_ctx / 2
    head_name = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    head = 2 * tensors.get(head_name, (0, info.n_vocab * width))[1] * (n_ctx - 1 - n_ctx // 2)
    return (2 * n_ctx * matrices / max(n, 1) + attention), float(head)


def _first(meta: dict, key: str) -> int:
    value = meta.get(key, 0)
    return int(max(value) if isinstance(value, list) else value)


def decode_profile(s: StageInputs) -> tuple[float, float, float, str]:
    """(seconds per block per window, seconds of the head per window, seconds of a point's per-window math, in
    words where from): kept beside the stage files."""
    info, n_ctx, threads = s.info, s.n_ctx, s.threads
    memo = _profile_path(s)
    as_is = not _loaded_file(info, s.container, s.cache_dir).exists()
    timed_file = info.path if as_is else _loaded_file(info, s.container, s.cache_dir)
    where = ("on the file as it is (its F32 container is not built yet)" if as_is and s.container == "f32"
             else f"{threads} thread{'s' if threads != 1 else ''}")
    try:
        kept = json.loads(memo.read_text())
        return float(kept["block_s"]), float(kept["head_s"]), float(kept["math_s"]), f"timed before, {where}"
    except (OSError, ValueError, KeyError):
        pass
    with Backend(timed_file, n_ctx, threads, settings=s.compute) as b:
        t0 = time.perf_counter()
        split = blocks_and_head_seconds(b, n_ctx)
        total = time.perf_counter() - t0
        math_s = _math_seconds(b.decode_window(*_window(b, n_ctx)) if split is None else split[2], threads)
    if split is None:  # no node to split at: the whole window, shared by FLOPs
        block_f, head_f = window_flops(info, *gguf_sizes(info.path)[1:], n_ctx)
        blocks_s, after_s = (total * info.n_layers * block_f / (info.n_layers * block_f + head_f),
                             total * head_f / (info.n_layers * block_f + head_f))
    else:
        blocks_s, after_s = split[0], split[1]
    block_s, head_s = blocks_s / info.n_layers, after_s
    try:
        atomic_write_bytes(memo, json.dumps({"block_s": block_s, "head_s": head_s, "math_s": math_s,
                                             "file": str(timed_file)}).encode())
    except OSError:
        pass
    return block_s, head_s, math_s, f"timed now, {where}"


def _window(b, n_ctx: int):
    mask = np.zeros(n_ctx, np.int8)
    mask[n_ctx // 2:n_ctx - 1] = 1
    return np.full(n_ctx, max(b.bos, 0), np.int32), mask


def _math_seconds(logits: np.ndarray, threads: int) -> float:
    """A point's per-window math on these logits (NLL, and KL against a baseline: here, themselves)."""
    targets = np.zeros(len(logits), np.int64)
    with WindowMath(threads) as math:
        base = math(logits, targets)
        t0 = time.perf_counter()
        math(logits, targets, None, BaselineWindow(logits, base["lse"], base["nll"]))
        return time.perf_counter() - t0


def _loaded_file(info, container: str, cache: Path) -> Path:
    return f32_container_path(info.path, cache) if container == "f32" else info.path


def _profile_path(s: StageInputs) -> Path:
    """Where the timed window of this model, container, window, threads and runtime is kept: beside the stage files
    (once per model file and machine, like them), as timed on the loaded file or, before it is built, the source."""
    as_is = not _loaded_file(s.info, s.container, s.cache_dir).exists()
    key = point_key(kind="decode-profile", model_sha256=sha256(s.info.path), container=s.container,
                    timed_as_is=as_is, n_ctx=s.n_ctx, threads=s.threads, runtime=runtime_identity(s.compute))
    return profile_file(s.cache_dir, key)


def _capture_windows(s: StageInputs, starts: list[int]) -> int:
    """Windows the residuals take a decode of their own for: all of them when the baseline is stored already (the
    first point decodes no baseline to read them from) and some stage's residuals are not cached; else none."""
    text = load_text(s.data_path).sha256
    sha, n_ctx = sha256(s.info.path), s.n_ctx
    bkey = baseline_key(sha, s.container, (), text, n_ctx, s.n_windows, runtime_identity(s.compute))
    if not (Store(s.store).root / "baselines" / f"{bkey}.npz").exists():
        return 0
    rkey = residuals_key_of(sha, s.container, text, n_ctx, s.n_windows, s.compute)
    return 0 if all(residuals_file(s.cache_dir, rkey, start).exists() for start in starts if start > 0) \
        else s.n_windows
