"""Before launch: the stages each model of a sweep decodes from (run.prefix_starts), chosen from the layers and
windows of its points (the plan itself: sweep/scoring/stage_plan.py), as model.container=auto is settled once for
every job (sweep/capacity.py)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from .capacity import gguf_sizes, nearest_existing
from .gencheck import generation_mode
from .llama.container import default_cache_dir
from .llama.model_file import sha256
from .scoring.prefix import disk_bytes, static_fallback, unwritten_stages
from .scoring.stage_plan import StagePlan, plan_stages


def settle_starts(jobs: list[list[str]], points: list, info_of: Callable, windows_of: Callable) -> None:
    """run.prefix_starts for every job that reuses a prefix and does not name its stages: one plan per model file
    and container, from the first layers and windows of its points that can reuse one; each job gets the
    override (so that every job of the sweep uses the same stage files) and its composed config the value.
    info_of(cfg) -> ModelInfo; windows_of(cfg) -> the windows a point of cfg scores. Says the choice once per model."""
    groups: dict[tuple, list] = {}
    for job, (cfg, target) in zip(jobs, points):
        if cfg.run.prefix_reuse and cfg.run.get("prefix_starts") is None:
            key = (str(cfg.model.path), str(cfg.model.container), cfg.model.get("cache_dir"))
            groups.setdefault(key, []).append((job, cfg, target))
    for members in groups.values():
        cfg0 = members[0][1]
        info = info_of(cfg0)
        first_layers: dict[int, float] = {}
        for _, cfg, target in members:
            if target.layers and static_fallback(info.n_experts, bool(cfg.fmt.get("recipe")),
                                                 generation_mode(cfg.metrics.generate) is None) is None:
                first = min(target.layers)
                first_layers[first] = first_layers.get(first, 0) + windows_of(cfg)
        plan = plan_stages(info.n_layers, first_layers, int(cfg0.run.prefix_stages), _fits_disk(cfg0, info))
        for job, cfg, _ in members:
            job.append(f"run.prefix_starts=[{','.join(map(str, plan.starts))}]")
            cfg.run.prefix_starts = list(plan.starts)
        if first_layers:
            print(f"prefix reuse: {_said(plan)} for {info.path.name} ({sum(first_layers.values()):g} point-windows "
                  f"from block {min(first_layers)} on, run.prefix_stages={cfg0.run.prefix_stages})", flush=True)


def _said(plan: StagePlan) -> str:
    if not plan.starts:
        return "no stage pays for its identity check here (every point decodes the full model)"
    return (f"stages at blocks {', '.join(map(str, plan.starts))}, decoding {plan.ratio:.2f} of the full "
            f"decodes' block-windows")


def _cache_dir(cfg) -> Path:
    return Path(cfg.model.cache_dir) if cfg.model.get("cache_dir") else default_cache_dir()


def _fits_disk(cfg, info) -> Callable[[tuple[int, ...]], bool]:
    """Stage files still to write may take half the free disk where they are cached."""
    budget = shutil.disk_usage(nearest_existing(_cache_dir(cfg))).free // 2
    return lambda starts: stage_files_bytes(cfg, info, starts) <= budget


def stage_files_bytes(cfg, info, starts: tuple[int, ...]) -> int:
    """Disk the stage files of `starts` that are not written yet will take."""
    file_bytes, tensors, _ = gguf_sizes(info.path)
    container, cache = str(cfg.model.container), _cache_dir(cfg)
    missing = unwritten_stages(cache, sha256(info.path), container, starts)
    header = file_bytes - sum(b for b, _ in tensors.values())
    return disk_bytes(tensors, info.n_layers, 0, 0, 0, missing, container == "f32", header)[0]
