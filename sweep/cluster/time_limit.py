"""`hydra/launcher=slurm` without `hydra.launcher.timeout_min` on the command line: the time limit of each task from
what `--plan` estimates for one task (load + one point + a baseline + the generation check, timed on one real
window here), with a margin, because the cluster's nodes differ from this machine and a slow shared file system
adds to the load. A task that still reaches it is requeued (`max_num_timeout`) and resumes from the store."""

from __future__ import annotations

import math

from ..choices import LauncherKind, launcher_kind
from ..cores import available_cores
from ..pipeline.costs import Costs, time_one_window
from ..pipeline.grid import Plan

TIMEOUT_FLAG = "hydra.launcher.timeout_min="
MARGIN_FACTOR = 3  # x the estimate: nodes slower than this machine, several tasks on one node
MARGIN_MINUTES = 5  # plus: the F32 container built by the first task, a cold file system


def task_seconds(grid: Plan, c: Costs) -> float:
    """The longest task the plan foresees: load, one point, its baseline when missing, the generation check."""
    cores = available_cores()
    text_path = grid.points[0][0].data.path
    longest = 0.0
    for g in c.groups:
        t = time_one_window(g, text_path, min(c.threads, cores))
        point_s = t.point_window_s + (t.baseline_window_s if g.recompute else 0.0)
        longest = max(longest, t.load_s + g.n_windows * (point_s + t.baseline_window_s) + t.generation_s)
    return longest


def time_limit(grid: Plan, c: Costs, hydra_overrides: list[str]) -> int | None:
    """The minutes of a SLURM sweep whose command line sets no `hydra.launcher.timeout_min`; None otherwise."""
    if launcher_kind(grid.launcher) != LauncherKind.slurm or any(a.startswith(TIMEOUT_FLAG) for a in hydra_overrides):
        return None
    estimate = task_seconds(grid, c)
    minutes = math.ceil(MARGIN_FACTOR * estimate / 60) + MARGIN_MINUTES
    print(f"time limit per task: {TIMEOUT_FLAG}{minutes} ({MARGIN_FACTOR} x the ~{estimate:.0f} s one task takes "
          f"here + {MARGIN_MINUTES} min; set {TIMEOUT_FLAG}N to choose it)", flush=True)
    return minutes


def set_time_limit(launcher, minutes: int | None) -> None:
    if minutes is not None:
        launcher.params["timeout_min"] = minutes  # hydra-submitit-launcher's parameters, read when it submits
