"""Errors meant for people: the CLI prints their message (no traceback) and exits non-zero."""


class RecsysError(Exception):
    """Base class: the message says what was wrong, where, and how to fix it."""


class ConfigError(RecsysError):
    """A bad config key, value or file."""


class DataError(RecsysError):
    """Input data that breaks the dataset contract (names file, column and row count)."""


class RunError(RecsysError):
    """A run directory that lacks what a step needs (e.g. `train` before `prepare`)."""
