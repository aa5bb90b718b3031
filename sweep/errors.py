"""The one exception type that reaches the user as a single line, not a traceback, and the one way every command
reports it: `error: ...` on stderr, exit status 2."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

EXIT_USER_ERROR = 2


class SweepError(Exception):
    """Bad input or an unusable environment: the message says what is wrong and how to fix it."""


def exit_on_user_error(fn: Callable, *args):
    try:
        return fn(*args)
    except SweepError as e:
        logging.getLogger("sweep").debug("user error", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
