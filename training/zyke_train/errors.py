"""The training package's user-facing errors: problems the user can fix, printed by the CLI without a traceback."""

from __future__ import annotations


class TrainError(Exception):
    """A problem the user can fix (bad flag, missing optional package, unusable data): the CLI prints it."""


class PrepareError(Exception):
    """A problem with the inputs or the output directory that the user must fix (exit 2)."""
