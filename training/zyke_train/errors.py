"""The training package's user-facing errors: problems the user can fix, printed by the CLI without a traceback."""

from __future__ import annotations


class TrainError(Exception):
    """A problem the user can fix (bad flag, missing optional package, unusable data): the CLI prints it."""


class PrepareError(Exception):
    """A problem with the inputs or the output directory that the user must fix (exit 2)."""


class AdapterError(Exception):
    """An adapter named on the command line is neither a PEFT folder nor a registered adapter that resolves; each
    command reports it as its own error (``TrainError``, ``RlError``)."""
