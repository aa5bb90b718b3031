"""The sweep's Hydra sweeper, a plugin of Hydra's public Sweeper interface (Hydra takes plugins from the
`hydra_plugins` namespace only; selected by conf/hydra/sweeper/grid.yaml).

Before any job starts, every point of the grid is composed and validated against its model (sweep/pipeline/grid.py: a
mistake is one `error:` line and exit status 2, with nothing written), `layer=each` becomes one job per block, and
the store's disk is checked (sweep/pipeline/costs.py). With `hydra.sweeper.plan=true` (`sweep plan ...`, or `--plan`) it
prints what the sweep would cost and launches nothing. Otherwise the jobs go to the configured launcher in the order
Hydra's basic sweeper would give them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class GridSweeper(Sweeper):
    def __init__(self, max_batch_size: int | None = None, params: dict | None = None, plan: bool = False):
        self.max_batch_size = max_batch_size
        self.params = params  # read back from the config by grid.plan, with the command line's axes
        self.plan = plan
        self.config: DictConfig | None = None
        self.launcher: Launcher | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                               task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        # deferred: Hydra imports every plugin when any Hydra app starts; the sweep's modules load llama.cpp
        from sweep.choices import LauncherKind, launcher_kind
        from sweep.cluster.preflight import run_checks
        from sweep.cluster.time_limit import set_time_limit
        from sweep.errors import exit_on_user_error
        from sweep.estimate.plan import MapPlan
        from sweep.pipeline.costs import print_grid_plan
        from sweep.pipeline.grid import plan

        config, launcher = self.config, self.launcher
        if config is None or launcher is None:
            raise RuntimeError("the sweeper sweeps after Hydra's setup()")
        # Hydra's own overrides (the sweep directory, the launcher) are part of what is validated, not of a job.
        hydra_overrides = list(config.hydra.overrides.hydra)
        overrides = [*hydra_overrides, *arguments]
        if self.plan:
            exit_on_user_error(print_grid_plan, exit_on_user_error(plan, overrides))
            return []
        # a launcher that runs the jobs elsewhere: the checks too (sweep/cluster/preflight.py): no model loaded here
        elsewhere = launcher_kind(config.hydra.launcher) != LauncherKind.basic
        launch, minutes, map_plan = exit_on_user_error(run_checks, overrides, hydra_overrides, elsewhere)
        set_time_limit(launcher, minutes)
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(config, sweep_dir / "multirun.yaml")
        if map_plan is not None:  # run.estimate=map: its plan beside the jobs, and its own job first
            path = MapPlan.from_json(map_plan).write(sweep_dir)
            launch = [[*launch[0], f"run.map_job={path}"], *launch]
        size = self.max_batch_size or len(launch)
        returns, first = [], 0
        for start in range(0, len(launch), size):
            batch = launch[start:start + size]
            results = launcher.launch(batch, initial_job_idx=first)
            for r in results:
                _ = r.return_value  # a failed job raises here, as with Hydra's basic sweeper
            first += len(batch)
            returns.append(results)
        return returns
