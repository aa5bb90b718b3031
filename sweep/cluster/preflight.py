"""What the sweep checks before its first job: the whole grid validated and expanded (grid.py), what it will cost
against the disk and the memory (costs.py), a SLURM task's time limit (cluster/time_limit.py).

The checks load the model (its graph's nodes, one window timed). With the basic launcher the jobs then run in the
same process, which loads the model anyway, so the checks run there too. With any other launcher they run in a
child process: the launching process (on a cluster, the login node) never holds a model, only the jobs' overrides.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

from ..pipeline.costs import check_resources, costs
from ..pipeline.grid import plan
from .time_limit import time_limit

Checked = tuple[list[list[str]], int | None, dict | None]


def checks(overrides: list[str], hydra_overrides: list[str]) -> Checked:
    """Every job's overrides, in launch order, the SLURM time limit to set (None: none to set), and the map's plan
    (run.estimate=map, as JSON; None without it)."""
    grid = plan(overrides)
    c = costs(grid)
    check_resources(c)
    return grid.launch, time_limit(grid, c, hydra_overrides), grid.map.to_json() if grid.map else None


def run_checks(overrides: list[str], hydra_overrides: list[str], in_child: bool) -> Checked:
    """`checks`, here or in a fresh child process (spawned: no copy of this process's state or threads); a
    SweepError there is raised here."""
    if not in_child:
        return checks(overrides, hydra_overrides)
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(checks, overrides, hydra_overrides).result()
