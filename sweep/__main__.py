"""`python -m sweep [axis=values ...]`: the sensitivity sweep (a Hydra multirun by default)."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from . import config  # noqa: F401  (registers the schemas)
from .cli import exit_on_user_error
from .grid import plan, wants_hydra_only
from .incomplete import remember_command
from .job import run_job
from .planning import check_resources, costs, print_plan
from .session import Sessions
from .time_limit import time_limit_overrides


def sweep_app(sessions: Sessions):
    """The Hydra app. Jobs run in this process (the basic launcher) share `sessions`: one loaded model, reused
    while consecutive jobs ask for it, closed when the sweep ends. A job run elsewhere (joblib, SLURM) gets a
    copy of its own and closes it when it ends."""

    @hydra.main(version_base="1.3", config_path="../conf", config_name="config")
    def sweep_job(cfg: DictConfig) -> dict:
        hc = HydraConfig.get()
        try:
            return run_job(cfg, sessions, Path(hc.runtime.output_dir), hc.launcher)
        finally:
            if not str(hc.launcher.get("_target_", "")).endswith("BasicLauncher"):
                sessions.close()

    return sweep_job


PLAN_FLAG = "--plan"


def main() -> None:
    argv = sys.argv[1:]
    remember_command(argv)  # the command that finishes an incomplete sweep is this one, as given
    if PLAN_FLAG in argv:  # ours, not Hydra's: print what the sweep would cost, then stop
        overrides = [a for a in argv if not a.startswith("-")]
        exit_on_user_error(print_plan, overrides)
        sys.exit(0)
    if not wants_hydra_only(argv):
        # Validate the whole grid before Hydra launches anything; resolve layer=each from the model; stop here
        # if the store would not fit the disk.
        overrides = [a for a in argv if not a.startswith("-")]
        grid = exit_on_user_error(plan, overrides)
        plan_costs = exit_on_user_error(costs, grid)
        exit_on_user_error(check_resources, plan_costs)
        sys.argv += grid.extra_argv + exit_on_user_error(time_limit_overrides, grid, plan_costs, argv)
    with Sessions() as sessions:
        sweep_app(sessions)()


if __name__ == "__main__":
    main()
