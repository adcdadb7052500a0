"""Typed exceptions of the Zyke SDK.

Game code should be able to tell "the daemon is not there" (show a hint, maybe fall back to canned
lines) from "the player's line took too long" (retry later) from "the NPC definition is wrong" (a bug
to fix), without parsing messages. Everything the SDK raises on purpose derives from ``ZykeError``.
Every error raised for a daemon's error frame carries its stable ``code`` (a ``zyke.protocol.ErrorCode``;
a plain string for a code newer than this SDK), with ``message``, ``request_id`` and ``details``::

    ZykeError                     anything the SDK raises on purpose
    ├── DaemonNotRunning          nothing answers at the URL (also a ConnectionError)
    ├── ConnectionLost            the connection dropped with the request in flight (also a ConnectionError)
    ├── ZykeTimeout               no answer in time, client's timeout or daemon's ``timeout`` (also a TimeoutError)
    └── ProtocolError             any other daemon error (``code``), or a frame the SDK could not read
        ├── AuthenticationError   ``unauthorized``, ``not_authenticated``
        ├── Cancelled             ``cancelled``
        ├── UnknownNpc            ``unknown_npc``
        ├── UnknownAdapter        ``unknown_adapter``
        ├── UnknownAction         ``unknown_action``
        ├── AdapterRejected       ``adapter_rejected``
        ├── QueueFull             ``queue_full``
        ├── Expired               ``expired``
        ├── UnknownReply          ``unknown_reply``
        ├── NotRecording          ``not_recording``
        │   └── ExperienceFull    ``experience_full``
        ├── BadLabel              ``bad_label``
        └── GenerationFailed      ``generation_failed``, ``model_error``

``ZykeTimeout`` is not a ``ProtocolError``: a timeout is the one error game code retries, and the client's
own timeout is no protocol error at all. It has the same ``code`` / ``message`` / ``request_id`` /
``details`` attributes (from the ``_ErrorFields`` mixin the two share), so code reading them keeps working.
"""

from __future__ import annotations

from typing import Any

from .protocol import ErrorCode

START_HINT = "start it with: zyke-daemon start (or pass autostart=True to Client)"


class ZykeError(Exception):
    """Base of every error the SDK raises on purpose: ``except ZykeError`` catches them all."""


class DaemonNotRunning(ZykeError, ConnectionError):
    """No daemon answers at the URL (or it could not be started). Also a ``ConnectionError``."""


class ConnectionLost(ZykeError, ConnectionError):
    """The connection dropped while this request was in flight.

    The request is not retried, because the daemon may already have recorded the turn; the next
    call reconnects (and re-defines this client's NPCs) by itself.
    """


class _ErrorFields(ZykeError):
    """The attributes of an error tied to a request: ``code``, ``message``, ``request_id``, ``details``."""

    def __init__(self, message: str, code: str | None = None, request_id: str | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.request_id = request_id
        self.details = details or {}

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}" if self.code else self.message

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.code, self.request_id, self.details))


class ZykeTimeout(_ErrorFields, TimeoutError):
    """No answer in time: the client's own timeout (the request is then cancelled on the daemon)
    or the daemon's (its error frame's code ``timeout``). Also a builtin ``TimeoutError``; not a
    ``ProtocolError``. ``code`` is ``"timeout"`` either way and ``request_id`` the request's id."""


class ProtocolError(_ErrorFields):
    """The daemon answered a request with an error frame (or sent one the SDK could not read).

    ``code`` is the daemon's stable error code (a ``zyke.protocol.ErrorCode`` value, or ``None`` when
    the error was detected client-side), ``message`` its human explanation, ``request_id`` the id of
    the request it answers and ``details`` any extra data the daemon attached.
    """


class AuthenticationError(ProtocolError):
    """The daemon refused the token (codes ``unauthorized`` / ``not_authenticated``)."""


class Cancelled(ProtocolError):
    """The request was cancelled (code ``cancelled``), by ``stream.cancel()`` or another cancel frame."""


class UnknownNpc(ProtocolError):
    """The daemon has no NPC of that id in this game (code ``unknown_npc``)."""


class UnknownAdapter(ProtocolError):
    """No LoRA adapter of that name is registered with the daemon (code ``unknown_adapter``)."""


class UnknownAction(ProtocolError):
    """``allowed_actions`` named an action the NPC was not defined with (code ``unknown_action``).

    A bug in the game's call, not in the model: the message names the bad labels and the declared ones.
    """


class AdapterRejected(ProtocolError):
    """The adapter exists but the daemon refused to load it (code ``adapter_rejected``): it was trained on
    another base model, or its files changed since it was registered."""


class QueueFull(ProtocolError):
    """Too many requests in flight on this connection (code ``queue_full``); wait for a reply."""


class Expired(ProtocolError):
    """The line waited in the daemon's queue past its deadline (``deadline_ms``, or the daemon's default for
    background lines) and was dropped unanswered (code ``expired``): a late bark is worse than none."""


class UnknownReply(ProtocolError):
    """``feedback`` named a reply the daemon has no record of (code ``unknown_reply``): not a recorded reply of
    that NPC since the daemon started, or its record was cleared. Rate replies by ``response.request_id``."""


class NotRecording(ProtocolError):
    """``feedback`` on an NPC whose replies are not recorded (code ``not_recording``): the daemon runs without
    ``--record-experience``, or the NPC was defined without ``record=True`` (docs/EXPERIENCE.md)."""


class ExperienceFull(NotRecording):
    """The experience file, or the reply's record, holds all it may (code ``experience_full``): export and clear
    it (``zyke-daemon experience export``, ``clear``)."""


class BadLabel(ProtocolError):
    """``feedback``'s label names an action the reply's turn did not allow, or an emotion the NPC did not declare
    (code ``bad_label``)."""


class GenerationFailed(ProtocolError):
    """The model failed to produce a valid reply (codes ``generation_failed`` / ``model_error``)."""


#: The error a daemon's error frame raises: a ``ZykeTimeout`` or a ``ProtocolError``, always with the frame's code.
CodedError = ProtocolError | ZykeTimeout

_BY_CODE: dict[str, type[ProtocolError] | type[ZykeTimeout]] = {
    ErrorCode.UNAUTHORIZED: AuthenticationError,
    ErrorCode.NOT_AUTHENTICATED: AuthenticationError,
    ErrorCode.TIMEOUT: ZykeTimeout,
    ErrorCode.CANCELLED: Cancelled,
    ErrorCode.UNKNOWN_NPC: UnknownNpc,
    ErrorCode.UNKNOWN_ADAPTER: UnknownAdapter,
    ErrorCode.UNKNOWN_ACTION: UnknownAction,
    ErrorCode.ADAPTER_REJECTED: AdapterRejected,
    ErrorCode.QUEUE_FULL: QueueFull,
    ErrorCode.EXPIRED: Expired,
    ErrorCode.GENERATION_FAILED: GenerationFailed,
    ErrorCode.MODEL_ERROR: GenerationFailed,
    ErrorCode.UNKNOWN_REPLY: UnknownReply,
    ErrorCode.NOT_RECORDING: NotRecording,
    ErrorCode.EXPERIENCE_FULL: ExperienceFull,
    ErrorCode.BAD_LABEL: BadLabel,
}
_KNOWN_CODES = frozenset(ErrorCode)


def error_for_code(code: str, message: str, request_id: str | None = None,
                   details: dict[str, Any] | None = None) -> CodedError:
    """The typed exception for a daemon error code (``ProtocolError`` itself for the rest), carrying the code:
    an ``ErrorCode`` member when this SDK knows it, else the string as sent (codes are an open set)."""
    known: str = ErrorCode(code) if code in _KNOWN_CODES else code
    return _BY_CODE.get(code, ProtocolError)(message, code=known, request_id=request_id, details=details)
