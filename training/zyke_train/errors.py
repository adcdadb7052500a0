"""The training package's user-facing error: a problem the user can fix, printed by the CLI without a traceback."""

from __future__ import annotations


class TrainError(Exception):
    """A problem the user can fix (bad flag, missing optional package, unusable data): the CLI prints it."""
