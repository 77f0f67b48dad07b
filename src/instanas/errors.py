"""The errors a user can fix: each message is one line that names the problem and the fix.

The command line prints these as ``instanas: error: ...`` with exit code 2 instead of a
traceback (:data:`USER_ERRORS`). They live here, apart from the code that raises them, so a
module that only reports a bad value does not import that code (and torch with it). This module
imports nothing: ``runtime.py`` takes :class:`ExportError` from here inside the package
and defines its own copy where it runs alone inside an export folder.
"""

from __future__ import annotations


def _one_line(message: str) -> str:
    # Wrapped texts (YAML parser errors, nested exception texts) span lines; the command
    # prints one.
    return " ".join(message.split())


class ConfigError(ValueError):
    """A bad preset, key or value, or a command-line option that does not fit the run."""

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(message))


class DataError(ValueError):
    """Bad or missing data."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.splitlines()))


class CheckpointError(ValueError):
    """A missing, corrupt or mismatched checkpoint."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN)."""


class ExportError(ValueError):
    """A missing, changed or unusable export folder, or bad input to it."""

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(message))


# What the command line reports in one line (exit code 2).
USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    DataError,
    CheckpointError,
    TrainingError,
    ExportError,
)
