"""The connection under ``AsyncClient``: one WebSocket to the daemon, many requests multiplexed on it by id.

One reader task per connection routes every frame the daemon sends to the queue of the request
whose id it carries, so any number of NPC lines can be in flight at once and a slow reply never
blocks a fast one. The synchronous ``zyke.Client`` runs this same code on a background thread.

Reconnecting is lazy: when the socket drops, requests in flight fail with ``ConnectionLost`` (a say
is never retried behind the game's back, since the daemon may have recorded the turn), and the next
call opens a new connection, says hello again and re-defines every NPC this client defined. The
daemon keeps NPC history on disk and ``npc.define`` keeps it, so a restarted daemon resumes the
conversation where it stopped.

One request lifecycle. ``_Connector`` keeps the connection (open, hello, reconnect, close); ``_Requests``
keeps what each request needs. Each request's register -> send -> await -> cleanup is written once:
``_Conn.exchange`` for the requests answered by one frame (definitions, state, adapters, ping, cancel,
feedback), ``_Call`` for an ``npc.say`` (a queue slot, the reply awaited whole or streamed piece by piece,
a cancel sent on the daemon when the caller gives up).

Separate from aio.py, as websockets and httpx keep their connections apart from their client API: aio.py
is what game code calls (``AsyncClient`` and its handles), this module is the machinery under it, and
nothing here is for game code. It never imports aio.py: the client hands it its settings (``_Settings``)
and the one handle call it needs (``_RaterFor``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from .autostart import LocalDaemon
from .errors import (
    START_HINT,
    AuthenticationError,
    CodedError,
    ConnectionLost,
    DaemonNotRunning,
    ProtocolError,
    ZykeError,
    ZykeTimeout,
    error_for_code,
)
from .paths import default_url, read_token, token_path
from .protocol import (
    PROTOCOL_VERSION,
    SERVER_FRAMES,
    AdapterList,
    AdapterLoad,
    AdapterUnload,
    Cancel,
    Error,
    Feedback,
    Frame,
    Hello,
    NpcDefine,
    NpcDefined,
    NpcReset,
    NpcSay,
    NpcSpec,
    NpcStateGet,
    NpcStateSet,
    Ok,
    Ping,
    Reply,
    Welcome,
    dump_frame,
)
from .protocol.models import ClientInfo
from .response import NpcResponse
from .say_options import DEFAULT, Timeout, _Unset

log = logging.getLogger("zyke")

#: Frames up to this size are accepted from the daemon (its replies are far smaller).
MAX_FRAME_BYTES = 4 * 1024 * 1024


_Item = Frame | BaseException
_Request = (NpcDefine | NpcStateGet | NpcStateSet | NpcReset | AdapterList | AdapterLoad | AdapterUnload | Ping
            | Cancel | Feedback)
F = TypeVar("F", bound=Frame)


_NOT_SENT_MESSAGE = "the connection to the daemon dropped before the request was sent"


class _NotSent(Exception):
    """The socket was already closed when we tried to send: the daemon never saw the frame."""


@dataclass(eq=False)
class _Conn:
    """One open, authenticated WebSocket and the requests waiting on it."""

    ws: ClientConnection
    welcome: Welcome
    loop: asyncio.AbstractEventLoop
    pending: dict[str, asyncio.Queue[_Item]] = field(default_factory=dict)
    abandoned: set[str] = field(default_factory=set)  # cancelled by us: their late answers are expected
    reader: asyncio.Task[None] | None = None
    alive: bool = True

    def register(self, request_id: str) -> asyncio.Queue[_Item]:
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        self.pending[request_id] = queue
        return queue

    async def send(self, frame: Frame) -> None:
        if not self.alive:
            raise _NotSent
        if isinstance(frame, NpcSay) and frame.safety_report is None and "safety" in self.welcome.capabilities:
            # this SDK reads the reply's safety field, so it asks for it; an older daemon never sees the field
            frame = frame.model_copy(update={"safety_report": True})
        try:
            await self.ws.send(json.dumps(dump_frame(frame), ensure_ascii=False))
        except ConnectionClosed:
            self.alive = False
            raise _NotSent from None

    async def exchange(self, frame: _Request, deadline: float | None, seconds: float | None) -> _Item:
        """One request answered by one frame: register, send, await the answer, unregister.

        Raises ``_NotSent`` when the socket was closed before the frame left (the caller may retry).
        """
        queue = self.register(frame.id)
        try:
            await self.send(frame)
            return await _next(queue, deadline, seconds, frame.id)
        finally:
            self.pending.pop(frame.id, None)

    def fail_all(self, exc: BaseException) -> None:
        self.alive = False
        for queue in self.pending.values():
            queue.put_nowait(exc)


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else asyncio.get_running_loop().time() + timeout


class _Settings(Protocol):
    """The client's settings this module reads (``AsyncClient``'s public attributes).

    Read each time they are used, never copied: game code may change them between calls.
    """

    timeout: float | None
    connect_timeout: float
    reconnect_window: float
    autostart: bool
    autostart_timeout: float
    game: str | None
    client_name: str


#: Given the requests and an NPC's id, the feedback call a reply's ``rate`` is bound to (``AsyncNpc.feedback``;
#: the handles are aio.py's).
_RaterFor = Callable[["_Requests", str], Callable[..., Awaitable[None]]]


class _Connector:
    """Opens an ``AsyncClient``'s connection, keeps it, and opens a new one when it has dropped.

    ``connect`` returns the open connection or opens one (retrying with backoff within the client's
    ``reconnect_window`` once it has been connected, starting a local daemon when ``autostart``); the
    reader task of each connection routes its frames and fails its requests when it ends. ``close``
    closes it for good and stops an autostarted daemon. The client owns one; ``requests`` is the
    interface its handles get.
    """

    def __init__(self, settings: _Settings, url: str | None, token: str | None, rater_for: _RaterFor) -> None:
        self._settings = settings
        self._url = url
        self._token = token
        self.conn: _Conn | None = None
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        self.requests = _Requests(settings, self.connect, rater_for)
        self._ever_connected = False
        self.closed = False
        self.daemon: LocalDaemon | None = None

    @property
    def url(self) -> str:
        if self._url:
            return self._url
        if self.daemon is not None:
            return self.daemon.url
        return default_url()

    def _loop_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            if self.conn is not None and self.conn.loop is not loop:
                if not self.conn.loop.is_closed():
                    raise RuntimeError("this AsyncClient is in use on another event loop; make one per loop")
                self.conn = None
            self._lock, self._lock_loop, self.requests.slots = asyncio.Lock(), loop, None
        return self._lock

    async def connect(self) -> _Conn:
        if self.closed:
            raise ZykeError("this client is closed")
        lock = self._loop_lock()
        conn = self.conn
        if conn is not None and conn.alive:
            return conn
        async with lock:
            conn = self.conn
            if conn is not None and conn.alive:
                return conn
            conn = await self._connect_with_retry()
            self.conn = conn
            self._ever_connected = True
            return conn

    async def _connect_with_retry(self) -> _Conn:
        loop = asyncio.get_running_loop()
        window = self._settings.reconnect_window if self._ever_connected else 0.0
        deadline = loop.time() + window
        delay = 0.05
        while True:
            try:
                return await self._connect_once()
            except DaemonNotRunning:
                if self._settings.autostart and self.daemon is None:
                    await self._start_daemon()
                    continue
                if loop.time() + delay > deadline:
                    raise
                log.info("daemon not reachable; retrying in %.2fs", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _start_daemon(self) -> None:
        self.daemon = await asyncio.to_thread(LocalDaemon.start, self._url, self._token,
                                              self._settings.autostart_timeout)

    async def _connect_once(self) -> _Conn:
        from . import __version__

        settings = self._settings
        url = self.url
        try:
            ws = await connect(url, open_timeout=settings.connect_timeout, max_size=MAX_FRAME_BYTES, proxy=None,
                               compression=None, close_timeout=2, ping_interval=20, ping_timeout=20)
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            raise DaemonNotRunning(f"no Zyke daemon answers at {url} ({exc or type(exc).__name__}); "
                                   f"{START_HINT}") from exc
        token = self._token or read_token()  # read after connecting: an autostarted daemon has written it
        if not token:
            await ws.close()
            raise AuthenticationError(
                f"no token to present to the daemon: set ZYKE_TOKEN, pass token=, or start the daemon "
                f"once so it writes {token_path()}", code="unauthorized")
        loop = asyncio.get_running_loop()
        hello = Hello(id=self.requests.new_id("h"), token=token, protocol=PROTOCOL_VERSION, game=settings.game,
                      client=ClientInfo(name=settings.client_name, version=__version__))
        try:
            await ws.send(json.dumps(dump_frame(hello)))
            async with asyncio.timeout(settings.connect_timeout):
                while True:  # the first answer carrying the hello's id (nothing else is in flight yet)
                    raw = json.loads(await ws.recv())
                    if raw.get("id") == hello.id:
                        break
        except (ConnectionClosed, OSError, TimeoutError, ValueError) as exc:
            await ws.close()
            raise DaemonNotRunning(f"the daemon at {url} did not complete the hello handshake "
                                   f"({exc or type(exc).__name__}); {START_HINT}") from exc
        if raw.get("type") == "error":
            await ws.close()
            error = Error.model_validate(raw)
            message = error.message
            if error.code == "unauthorized":
                message += f" (the token comes from ZYKE_TOKEN, the token file {token_path()}, or token=)"
            raise error_for_code(error.code, message, error.id, error.details)
        welcome = Welcome.model_validate(raw)
        conn = _Conn(ws=ws, welcome=welcome, loop=loop)
        conn.reader = loop.create_task(self._read(conn), name="zyke-reader")
        if self.requests.slots is None:
            limit = welcome.limits.max_queued_per_client if welcome.limits else None
            self.requests.slots = asyncio.Semaphore(limit or 8)
        # Bring the daemon back to what this client defined (history is kept on its disk).
        try:
            for spec in list(self.requests.npcs.values()):
                frame = NpcDefine(id=self.requests.new_id("d"), npc=spec)
                item = await conn.exchange(frame, _deadline(settings.connect_timeout), settings.connect_timeout)
                _expect(item, NpcDefined)
        except (_NotSent, ConnectionLost) as exc:
            conn.alive = False
            raise DaemonNotRunning(f"the daemon at {url} dropped the connection while NPCs were being "
                                   f"re-defined; {START_HINT}") from exc
        if self._ever_connected:
            log.info("reconnected to %s and re-defined %d NPC(s)", url, len(self.requests.npcs))
        return conn

    async def _read(self, conn: _Conn) -> None:
        """Route every frame from the daemon to the request it answers."""
        reason = "the connection to the daemon was closed"
        try:
            async for message in conn.ws:
                _route(conn, message)
        except ConnectionClosed as exc:
            reason = f"the connection to the daemon was lost ({exc})"
        except Exception as exc:  # never leave requests hanging on a reader bug
            log.exception("zyke reader failed")
            reason = f"the client's reader failed: {exc!r}"
        finally:
            if self.conn is conn:
                self.conn = None
            conn.fail_all(ConnectionLost(f"{reason} while this request was in flight; it was not retried "
                                         "(the next call reconnects)"))

    async def close(self) -> None:
        """Close the connection (requests in flight fail with ConnectionLost); stop an autostarted daemon."""
        if self.closed:
            return
        self.closed = True
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.fail_all(ConnectionLost("the client was closed while this request was in flight"))
            with contextlib.suppress(Exception):
                await conn.ws.close()
            if conn.reader is not None:
                conn.reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await conn.reader
        for task in list(self.requests.background):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 2)
        if self.daemon is not None:
            daemon, self.daemon = self.daemon, None
            await asyncio.to_thread(daemon.stop)


class _Requests:
    """The internal interface an ``AsyncClient`` gives its handles (see aio.py's module docstring).

    The client's ``_Connector`` owns one and keeps the connection (``connect`` returns the open one or
    opens one); this keeps what every request needs: ids, the NPCs defined (re-defined after a
    reconnect), the slots that keep the client within the daemon's per-connection queue, and the
    cancels sent in the background. Not for game code.
    """

    def __init__(self, client: _Settings, connect: Callable[[], Awaitable[_Conn]], rater_for: _RaterFor) -> None:
        self._client = client  # read for its public settings only: timeout, connect_timeout
        self.connect = connect
        self._rater_for = rater_for
        self.npcs: dict[str, NpcSpec] = {}
        self.slots: asyncio.Semaphore | None = None
        self.background: set[asyncio.Task[Any]] = set()
        self._ids = itertools.count(1)

    def new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids)}"

    def seconds(self, timeout: Timeout) -> float | None:
        """A call's ``timeout`` in seconds (``DEFAULT``: the client's, read now)."""
        return self._client.timeout if isinstance(timeout, _Unset) else timeout

    async def request(self, frame: _Request, expect: type[F], *, timeout: Timeout = DEFAULT,
                      idempotent: bool = True) -> F:
        """Send one request and wait for its single answer. Retried once when the connection dropped, if
        ``idempotent`` (npc.say goes through ``say``/``stream``; feedback is not retried once sent: it may have
        been recorded, and a second rating would count twice)."""
        seconds = self.seconds(timeout)
        deadline = _deadline(seconds)
        for attempt in range(2):
            conn = await self.connect()
            try:
                item = await conn.exchange(frame, deadline, seconds)
            except _NotSent:
                if attempt == 0:
                    continue
                raise ConnectionLost(_NOT_SENT_MESSAGE) from None
            if isinstance(item, ConnectionLost) and attempt == 0 and idempotent:
                continue
            return _expect(item, expect)
        raise AssertionError("unreachable")

    async def say(self, frame: NpcSay, timeout: Timeout) -> NpcResponse:
        """An npc.say answered whole (cancelled on the daemon if this task is cancelled or times out)."""
        call = _Call(self, frame, timeout)
        await call.start()
        try:
            item = await call.next()
        finally:
            call.finish()
        return self.response(item)

    def stream(self, frame: NpcSay, timeout: Timeout) -> _Call:
        """An npc.say whose frames the caller reads one by one (nothing is sent before ``start``)."""
        return _Call(self, frame, timeout)

    def response(self, item: _Item) -> NpcResponse:
        """The reply a say ended with (or its error raised); ``response.rate(...)`` sends feedback through here."""
        response = NpcResponse.from_frame(_expect(item, Reply))
        return response._bind(self._rater_for(self, response.npc))

    async def acquire_slot(self, deadline: float | None, seconds: float | None, request_id: str) -> None:
        """Wait for room in the daemon's per-connection queue instead of getting queue_full."""
        if self.slots is None:
            await self.connect()
        assert self.slots is not None
        remaining = None if deadline is None else deadline - asyncio.get_running_loop().time()
        try:
            await asyncio.wait_for(self.slots.acquire(), remaining)
        except TimeoutError:
            raise _timeout_error(seconds, request_id) from None

    def release_slot(self) -> None:
        if self.slots is not None:
            self.slots.release()

    def cancel_soon(self, conn: _Conn, target: str) -> None:
        """Send a cancel for ``target`` without waiting for its ok (safe from finally blocks)."""
        if not conn.alive or conn.loop.is_closed():
            return

        async def send() -> None:
            with contextlib.suppress(_NotSent):
                await conn.send(Cancel(id=self.new_id("c"), target=target))

        conn.abandoned.add(target)
        task = conn.loop.create_task(send())
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def cancel(self, conn: _Conn, target: str) -> None:
        """Send a cancel and wait for the daemon's answer (ok, or unknown_request if already done)."""
        seconds = self._client.connect_timeout
        try:
            _expect(await conn.exchange(Cancel(id=self.new_id("c"), target=target), _deadline(seconds), seconds), Ok)
        except _NotSent:
            return


class _Call:
    """One npc.say from its queue slot to its cleanup, whether the reply is awaited whole or streamed.

    ``start`` waits for a slot, registers the id and sends the frame (again, on a fresh connection,
    only when it provably never left this process: the daemon may have recorded a turn it saw);
    ``next`` awaits the next frame before the deadline and, when the caller gives up (timeout,
    cancelled task), stops the work on the daemon; ``finish`` unregisters and frees the slot
    (idempotent). ``cancel`` waits for the daemon to confirm; ``abandon`` does not.
    """

    def __init__(self, requests: _Requests, frame: NpcSay, timeout: Timeout) -> None:
        self._requests = requests
        self.frame = frame
        self.seconds = requests.seconds(timeout)
        self._deadline: float | None = None
        self._conn: _Conn | None = None
        self._queue: asyncio.Queue[_Item] | None = None
        self._slot = False
        self.done = False

    @property
    def started(self) -> bool:
        return self._queue is not None

    async def start(self) -> None:
        self._deadline = _deadline(self.seconds)
        try:
            await self._requests.acquire_slot(self._deadline, self.seconds, self.frame.id)
        except BaseException:
            self.done = True
            raise
        self._slot = True
        try:
            for attempt in range(2):
                conn = await self._requests.connect()
                queue = conn.register(self.frame.id)
                self._conn = conn
                try:
                    await conn.send(self.frame)
                except _NotSent:
                    conn.pending.pop(self.frame.id, None)
                    self._conn = None
                    if attempt == 0:
                        continue
                    raise ConnectionLost(_NOT_SENT_MESSAGE) from None
                self._queue = queue
                return
        except BaseException:
            self.finish()
            raise

    async def next(self) -> _Item:
        """The next frame (or error) for this request."""
        assert self._queue is not None
        try:
            return await _next(self._queue, self._deadline, self.seconds, self.frame.id)
        except BaseException:  # timeout, or the task was cancelled: stop the daemon's work too
            self.abandon()
            raise

    def finish(self) -> None:
        self.done = True
        if self._conn is not None:
            self._conn.pending.pop(self.frame.id, None)
        if self._slot:
            self._slot = False
            self._requests.release_slot()

    async def cancel(self) -> None:
        """Stop the generation on the daemon and wait for its answer; the reply's frame then says cancelled."""
        if self.done:
            return
        if self._conn is None or self._queue is None:  # never sent: nothing to stop on the daemon
            self.finish()
            return
        try:
            await self._requests.cancel(self._conn, self.frame.id)
        except ProtocolError as exc:
            if exc.code != "unknown_request":  # it finished meanwhile; its reply is in the queue
                raise

    def abandon(self) -> None:
        """Give up on the reply: an unfinished request is cancelled on the daemon without waiting."""
        if not self.done and self._conn is not None:
            self._requests.cancel_soon(self._conn, self.frame.id)
        self.finish()

    def abandon_threadsafe(self) -> None:
        """``abandon`` from any thread (a finalizer): scheduled on the connection's loop."""
        if not self.done and self._conn is not None:
            self._conn.loop.call_soon_threadsafe(self.abandon)


def _route(conn: _Conn, message: str | bytes) -> None:
    try:
        raw = json.loads(message)
    except ValueError:
        log.warning("daemon sent a frame that is not JSON: %.200r", message)
        return
    if not isinstance(raw, dict):
        return
    request_id = raw.get("id")
    model = SERVER_FRAMES.get(raw.get("type", ""))
    queue = conn.pending.get(request_id) if isinstance(request_id, str) else None
    if queue is None and isinstance(request_id, str) and request_id in conn.abandoned:
        if raw.get("type") in ("reply", "error"):
            conn.abandoned.discard(request_id)
        return
    if model is None:
        log.debug("ignoring frame of unknown type %r", raw.get("type"))
        return
    item: _Item
    try:
        item = model.model_validate(raw)
    except ValidationError as exc:
        item = _unknown_code_error(raw) or ProtocolError(
            f"the daemon sent an invalid {raw.get('type')} frame: {exc}", request_id=request_id)
    if queue is not None:
        queue.put_nowait(item)
    elif isinstance(item, Error):
        log.warning("daemon error not tied to a pending request: [%s] %s (id %s)",
                    item.code, item.message, item.id)


def _unknown_code_error(raw: dict[str, Any]) -> CodedError | None:
    """An error frame whose code is newer than this SDK still fails its request with that code.

    Error codes are an open set (docs/PROTOCOL.md): a newer daemon may send one ``ErrorCode`` lacks,
    and game code should still see ``.code`` rather than a parse failure that hides it.
    """
    code, message, details = raw.get("code"), raw.get("message"), raw.get("details")
    if raw.get("type") != "error" or not isinstance(code, str) or not isinstance(message, str):
        return None
    request_id = raw.get("id") if isinstance(raw.get("id"), str) else None
    return error_for_code(code, message, request_id, details if isinstance(details, dict) else None)


def _timeout_error(seconds: float | None, request_id: str) -> ZykeTimeout:
    return ZykeTimeout(f"no answer within {seconds:g} s (client timeout); the request was cancelled",
                       code="timeout", request_id=request_id)


async def _next(queue: asyncio.Queue[_Item], deadline: float | None, seconds: float | None,
                request_id: str) -> _Item:
    remaining = None if deadline is None else deadline - asyncio.get_running_loop().time()
    if remaining is not None and remaining <= 0 and queue.empty():
        raise _timeout_error(seconds, request_id)
    try:
        return await asyncio.wait_for(queue.get(), remaining)
    except TimeoutError:
        raise _timeout_error(seconds, request_id) from None


def _expect(item: _Item, expect: type[F]) -> F:
    if isinstance(item, BaseException):
        raise item
    if isinstance(item, Error):
        raise error_for_code(item.code, item.message, item.id, item.details)
    if not isinstance(item, expect):
        raise ProtocolError(f"expected a {expect.__name__} frame, the daemon sent {type(item).__name__}",
                            request_id=getattr(item, "id", None))
    return item
