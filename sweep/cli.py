"""What the command-line entry points share: a user error is one line on stderr and a non-zero exit."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from .errors import SweepError

EXIT_USER_ERROR = 2


def exit_on_user_error(fn: Callable, *args):
    try:
        return fn(*args)
    except SweepError as e:
        logging.getLogger("sweep").debug("user error", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
