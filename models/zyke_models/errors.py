"""Typed errors of the daemon, raised by the model artifacts too (the adapter registry, the embedded model), and
the one error of a Hub upload (``hub``).

They live here so the registry raises the very class the daemon turns into an error frame; ``zyke_daemon.errors``
re-exports them. Each request error carries the protocol error code the client will see.
"""

from __future__ import annotations

from typing import Literal

from zyke.protocol import ErrorCode

#: Why a Hub upload did not happen: huggingface_hub is not installed, no token was found, or the Hub refused the
#: upload or could not be reached.
HubFailure = Literal["no_package", "no_token", "upload"]


class DaemonError(Exception):
    """A request failed in a way the client should hear about as an error frame."""

    def __init__(self, code: ErrorCode, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


class ModelLoadError(Exception):
    """The model could not be found or loaded; raised at start-up, before any client connects."""


class HubError(Exception):
    """An upload to the Hugging Face Hub did not happen (``hub.upload_folder``); ``failure`` says why and ``cause``
    is the exception behind it, if any. Each command turns it into its own user error."""

    def __init__(self, message: str, failure: HubFailure, cause: Exception | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.failure: HubFailure = failure
        self.cause = cause
