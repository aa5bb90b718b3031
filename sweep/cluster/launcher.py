"""`hydra/launcher=slurm`: hydra-submitit-launcher's SLURM launcher, made to lose nothing and to compute nothing on
the launching node.

- hydra-submitit-launcher waits for each task's result in turn and raises the first UncompletedJobError (a task
  cancelled, killed, or timed out more than `max_num_timeout` times) out of `launch()`: Hydra's end-of-sweep
  callback never runs and no table is written. Here every task is waited for; the tasks without a result are listed
  in the sweep dir (sweep/cluster/incomplete.py) and the sweep ends with the table of what finished.
- The generation check of `metrics.generate=top:N` (sweep/pipeline/gencheck.py) needs the model; it runs as one more
  task through the same executor once the points are known, not in the launching process.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from hydra.utils import get_class
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf

from ..choices import LauncherKind, launcher_kind
from ..pipeline.gencheck import check_worst
from ..scoring.generation import generation_mode
from ..store.records import gather
from .incomplete import write_missing

log = logging.getLogger(__name__)

# submitit's own executor parameters (not sbatch's), passed to AutoExecutor under the cluster's prefix
EXECUTOR_INIT_KEYS = {"max_num_timeout"}


def launch(launcher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
    """hydra-submitit-launcher's `launch` for `launcher` (one array task per point), waiting for every task."""
    from submitit.core.utils import FailedJobError, UncompletedJobError  # deferred like the plugin's: submitit

    assert launcher.config is not None and len(job_overrides) > 0
    executor = make_executor(launcher)
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if "mode" in launcher.config.hydra.sweep:  # as the plugin: hydra.sweep.mode, octal
        os.chmod(sweep_dir, mode=int(str(launcher.config.hydra.sweep.mode), 8))
    args = []
    for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
        log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        args.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
    jobs = executor.map_array(launcher, *zip(*args))
    returns, missing = [], []
    for job, overrides in zip(jobs, job_overrides):
        try:
            returns.append(job.results()[0])
        except (UncompletedJobError, FailedJobError) as e:  # a task without a result: listed, not raised
            reason = why_no_result(e)
            missing.append({"job": job.job_id, "overrides": list(filter_overrides(overrides)), "reason": reason})
            log.warning("task %s returned no result: %s", job.job_id, reason)
    write_missing(sweep_dir, missing)
    metrics = launcher.config.metrics
    generation_check(generation_mode(metrics.generate), str(metrics.rank_by), executor, sweep_dir)
    return returns


def why_no_result(error: Exception) -> str:
    """submitit's message in a few words: the task's final state (CANCELLED, TIMEOUT, OUT_OF_MEMORY, ...) when it
    names one, else its first line."""
    text = str(error)
    state = re.search(r"\(state: ([^)]*)\)", text)
    if state:
        return f"state {state.group(1).strip()}"
    return next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)[:300]


def make_executor(launcher):
    """submitit's executor for the launcher's parameters (as hydra-submitit-launcher builds it in `launch`)."""
    import submitit

    cluster = launcher._EXECUTOR
    params = dict(launcher.params)
    init = {"folder": params.pop("submitit_folder")}
    init.update({f"{cluster}_{k}": params.pop(k) for k in EXECUTOR_INIT_KEYS if k in params})
    executor = submitit.AutoExecutor(cluster=cluster, **init)
    shared = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in shared else f"{cluster}_{k}": v for k, v in params.items()})
    return executor


def generation_check(n: int | None, rank_by: str, executor, sweep_dir: Path) -> None:
    """metrics.generate=top:N (n = N): one more task checks the N worst points and adds the result to their records,
    which the end-of-sweep callback then gathers (it finds them done and loads no model)."""
    if not n:
        return
    executor.update_parameters(name="generation_check")
    job = executor.submit(check_worst_points, str(sweep_dir), rank_by, n)
    try:
        job.result()
    except Exception as e:  # the points are measured; only the check is missing: say so, keep the table
        lines = [line for line in str(e).splitlines() if line.strip()]
        log.warning("the generation check (task %s) did not finish: %s", job.job_id,
                    lines[-1] if lines else type(e).__name__)


def check_worst_points(sweep_dir: str, metric: str, n: int) -> None:
    """In a cluster task: the generation check of the n worst points of the sweep, written into their records."""
    df = gather([Path(sweep_dir)])
    if not df.empty:
        check_worst(df, Path(sweep_dir), metric, n)


def checks_generation_in_a_task(launcher_cfg: Any) -> bool:
    """Whether this launcher runs the generation check as a task of its own (the callback then only gathers): its
    class says so (ours, hydra_plugins/sweep_launchers; not hydra-submitit-launcher's own)."""
    if launcher_kind(launcher_cfg) != LauncherKind.slurm:
        return False
    try:
        launcher_class = get_class(str(launcher_cfg._target_))  # imported already: Hydra imports every plugin
    except Exception:  # not a class that can be imported here: not ours
        return False
    return bool(getattr(launcher_class, "RUNS_GENERATION_CHECK", False))
