"""The one exception type that reaches the user as a single line, not a traceback."""


class SweepError(Exception):
    """Bad input or an unusable environment: the message says what is wrong and how to fix it."""
