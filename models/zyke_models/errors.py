"""Typed errors of the daemon, raised by the model artifacts too (the adapter registry, the embedded model).

They live here so the registry raises the very class the daemon turns into an error frame; ``zyke_daemon.errors``
re-exports them. Each request error carries the protocol error code the client will see.
"""

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
