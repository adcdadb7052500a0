"""Typed errors of the daemon. Each carries the protocol error code the client will see."""

from __future__ import annotations

from zyke.protocol import ErrorCode


class DaemonError(Exception):
    """A request failed in a way the client should hear about as an error frame."""

    def __init__(self, code: ErrorCode, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


class ModelLoadError(Exception):
    """The model could not be found or loaded; raised at start-up, before any client connects."""
