"""`python -m sweep [axis=values ...]` (or `sweep AXIS=VALUES ...`): the sensitivity sweep, a Hydra multirun by
default. The grid is validated and expanded by the sweep's sweeper (hydra_plugins/sweep_sweeper/grid_sweeper.py)
before any job runs."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.plugins import Plugins
from omegaconf import DictConfig

from hydra_plugins.sweep_launchers.slurm_launcher import SlurmLauncher
from hydra_plugins.sweep_sweeper.grid_sweeper import GridSweeper

from .choices import LauncherKind, launcher_kind
from .errors import exit_on_user_error
from .pipeline.config import CONF_DIR  # (importing it registers the schemas)
from .pipeline.grid import check_composes
from .pipeline.job import run_job
from .pipeline.session import Sessions
from .store.record import Record

# Hydra finds plugins by walking the hydra_plugins namespace on sys.path; an editable install's import hook hides this
# project's part of it outside the project's directory, so the sweep registers its own by hand as well.
for _plugin in (GridSweeper, SlurmLauncher):
    Plugins.instance().register(_plugin)

PLAN_FLAG = "--plan"  # ours: the sweeper's plan mode, as `sweep plan ...`
PLAN_MODE = "hydra.sweeper.plan=true"


def sweep_app(sessions: Sessions):
    """The Hydra app. Jobs run in this process (the basic launcher) share `sessions`: one loaded model, reused
    while consecutive jobs ask for it, closed when the sweep ends. A job run elsewhere (joblib, SLURM) gets a
    copy of its own and closes it when it ends."""

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")  # absolute: also when imported
    def sweep_job(cfg: DictConfig) -> Record | None:
        hc = HydraConfig.get()
        try:
            return run_job(cfg, sessions, Path(hc.runtime.output_dir), hc.launcher)
        finally:
            if launcher_kind(hc.launcher) != LauncherKind.basic:
                sessions.close()

    return sweep_job


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    """The sweep on `argv` (default: the command line); `--plan` prints what it would cost instead."""
    args = sys.argv[1:] if argv is None else list(argv)
    args = [PLAN_MODE if a == PLAN_FLAG else a for a in args]
    if all(not a.startswith("-") for a in args):  # no Hydra flag (--help, --cfg, ...): a bad value is one line
        exit_on_user_error(check_composes, args)
    sys.argv = [prog or sys.argv[0], *args]  # what Hydra reads
    with Sessions() as sessions:
        sweep_app(sessions)()


if __name__ == "__main__":  # `python -m sweep COMMAND ...` is `sweep COMMAND ...`
    from .commands.cli import COMMANDS
    from .commands.cli import main as command

    first = sys.argv[1:2]
    if first == ["plan"]:  # (here, not through the cli: it would import this module a second time)
        main([*sys.argv[2:], PLAN_FLAG], prog="python -m sweep plan")
    elif first and first[0] in [*COMMANDS, "--help", "-h", "help"]:
        command()
    else:
        main()
