"""What the command-line entry points share: a user error is one line on stderr and a non-zero exit."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import hydra
from omegaconf import DictConfig

from .config import CONF_DIR, compose
from .errors import SweepError

EXIT_USER_ERROR = 2


def exit_on_user_error(fn: Callable, *args):
    try:
        return fn(*args)
    except SweepError as e:
        logging.getLogger("sweep").debug("user error", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def hydra_command(config_name: str, run: Callable[[DictConfig], object]) -> Callable[[], None]:
    """A `python -m sweep.<tool>` entry point: `run` on the config `conf/<config_name>.yaml` composes, a user
    error as one line."""

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)
    def app(cfg: DictConfig) -> None:
        exit_on_user_error(run, cfg)

    def main() -> None:
        overrides = [a for a in sys.argv[1:] if not a.startswith("-")]
        if overrides == sys.argv[1:]:  # no Hydra flag (--help, --cfg, ...): bad values are one line, not Hydra's
            exit_on_user_error(compose, overrides, config_name)
        app()

    return main
