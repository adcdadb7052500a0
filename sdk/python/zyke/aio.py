"""The asyncio client: one WebSocket to the daemon, many requests multiplexed on it by id.

One reader task per connection routes every frame the daemon sends to the queue of the request
whose id it carries, so any number of NPC lines can be in flight at once and a slow reply never
blocks a fast one. The synchronous ``zyke.Client`` runs this same code on a background thread.

Reconnecting is lazy: when the socket drops, requests in flight fail with ``ConnectionLost`` (a say
is never retried behind the game's back, since the daemon may have recorded the turn), and the next
call opens a new connection, says hello again and re-defines every NPC this client defined. The
daemon keeps NPC history on disk and ``npc.define`` keeps it, so a restarted daemon resumes the
conversation where it stopped.

One request lifecycle. ``AsyncNpc``, ``AsyncReplyStream`` (and, through them, the synchronous
``Client``) never touch an ``AsyncClient``'s private members: a handle receives the client's
``_Requests``, a small object the client owns and whose un-underscored methods are the whole
internal interface between them (ids, the NPCs defined, ``request``, ``say``, ``stream``). The
client keeps the connection; ``_Requests`` keeps what each request needs. Each request's
register -> send -> await -> cleanup is written once: ``_Conn.exchange`` for the requests answered
by one frame (definitions, state, adapters, ping, cancel, feedback), ``_Call`` for an ``npc.say``
(a queue slot, the reply awaited whole or streamed piece by piece, a cancel sent on the daemon when
the caller gives up). A separate object rather than un-underscored methods on ``AsyncClient``: game
code sees the client's surface, and this interface is not part of it. The sync client only
schedules these coroutines on its loop thread (client.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self, TypeVar, Unpack

from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from .autostart import LocalDaemon
from .choices import ChoicesLike, build_choices
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
    AdapterInfo,
    AdapterList,
    AdapterLoad,
    Adapters,
    AdapterUnload,
    Cancel,
    Error,
    Feedback,
    FeedbackLabel,
    Frame,
    Hello,
    NpcDefaults,
    NpcDefine,
    NpcDefined,
    NpcReset,
    NpcSay,
    NpcSpec,
    NpcState,
    NpcStateFrame,
    NpcStateGet,
    NpcStateSet,
    Ok,
    Ping,
    Pong,
    Reply,
    ReplyDelta,
    Welcome,
    dump_frame,
)
from .protocol.models import Audience, ClientInfo, Priority
from .response import LabelLike, NpcResponse, OptionsLike, Source, build_options
from .say_options import DEFAULT, SayOptions, Timeout, _Unset, say_frame

log = logging.getLogger("zyke")

#: Frames up to this size are accepted from the daemon (its replies are far smaller).
MAX_FRAME_BYTES = 4 * 1024 * 1024
DEFAULT_TIMEOUT = 60.0
DEFAULT_CONNECT_TIMEOUT = 30.0
DEFAULT_RECONNECT_WINDOW = 10.0


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


class AsyncClient:
    """Talk to the local Zyke daemon from asyncio code.

    With no arguments it finds the daemon by itself: ``ZYKE_URL`` or the daemon's runtime file for the
    address, ``ZYKE_TOKEN`` or the token file for the token (both re-read on every reconnect, so a
    daemon restarted on another port is found again). ``url``/``token`` override that.

    ``timeout`` is the default number of seconds a request may take once sent (``None``: wait as long
    as the daemon does); every call can override it. ``connect_timeout`` bounds opening the socket and
    the hello handshake (which waits while the daemon loads its model). ``reconnect_window`` is how
    long a call keeps retrying, with backoff, to reach a daemon it was connected to before.
    ``game`` namespaces NPC ids and saved sessions on the daemon. ``autostart=True`` starts a local
    daemon when none answers and stops it on close.

    Use it as ``async with AsyncClient() as client:`` or call ``aclose()``. An instance belongs to the
    event loop that first uses it.
    """

    def __init__(self, url: str | None = None, token: str | None = None, *, game: str | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 reconnect_window: float = DEFAULT_RECONNECT_WINDOW, autostart: bool = False,
                 autostart_timeout: float = 180.0, client_name: str = "zyke-python") -> None:
        self._url = url
        self._token = token
        self.game = game
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.reconnect_window = reconnect_window
        self.autostart = autostart
        self.autostart_timeout = autostart_timeout
        self.client_name = client_name
        self._conn: _Conn | None = None
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None
        self._requests = _Requests(self, self._ensure_connected)
        self._ever_connected = False
        self._closed = False
        self._daemon: LocalDaemon | None = None

    # -- public surface

    @property
    def url(self) -> str:
        """The daemon's address this client uses now (explicit, autostarted, or discovered)."""
        if self._url:
            return self._url
        if self._daemon is not None:
            return self._daemon.url
        return default_url()

    @property
    def daemon_info(self) -> Welcome | None:
        """The daemon's ``welcome`` (version, model, limits) of the current connection, if connected."""
        return self._conn.welcome if self._conn is not None and self._conn.alive else None

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._conn.alive

    @property
    def closed(self) -> bool:
        return self._closed

    async def connect(self) -> Welcome:
        """Connect now (calls connect lazily anyway); returns the daemon's welcome."""
        return (await self._ensure_connected()).welcome

    async def npc(self, npc_id: str, persona: str, actions: ChoicesLike = ("none",),
                  emotions: ChoicesLike = ("neutral",), *, name: str | None = None,
                  adapter: str | None = None, max_history: int | None = None,
                  default_emotion: str | None = None, default_action: str | None = None,
                  options: OptionsLike = None, priority: Priority | None = None,
                  audience: Audience | None = None, refusal_action: str | None = None,
                  blocked_words: Sequence[str] | None = None, record: bool | None = None) -> AsyncNpc:
        """Define (or update) an NPC on the daemon and return a handle to talk to it.

        An NPC that already exists keeps its conversation history, so a game can define its NPCs on
        every start. ``actions``/``emotions`` are the only labels replies may use: a list of names, a
        list mixing names and ``Choice``/``{"name", "description"}`` dicts, or a dict of name to
        description (``{"trade": "buy or sell goods"}``, order kept). The model reads descriptions, so
        labels it never saw in training (``ferry_across``) still get used when they fit. ``adapter`` is
        the NPC's default LoRA adapter and ``options`` its default generation options;
        ``default_emotion`` / ``default_action`` are what the daemon falls back to when the model is cut off.
        ``priority`` (``"foreground"``, ``"normal"``, ``"background"``) is how soon the daemon serves this
        NPC's lines when a call names none (docs/SCHEDULING.md; needs the daemon's ``priority`` capability).
        ``audience`` (``"minor"``, ``"teen"``, ``"adult"``) narrows the daemon's safety audience for this NPC (it
        can never loosen it), ``refusal_action`` is the declared action a deflected reply takes, and
        ``blocked_words`` are extra words it never says (docs/SAFETY.md). ``record=True`` opts the NPC in to
        experience recording (its replies and the feedback on them are kept on this machine when the daemon
        records too, ``zyke-daemon start --record-experience``; docs/EXPERIENCE.md).
        """
        defaults = None
        opts = build_options(options)
        if default_emotion is not None or default_action is not None or opts is not None or priority is not None:
            defaults = NpcDefaults(emotion=default_emotion, action=default_action, options=opts, priority=priority)
        spec = NpcSpec(id=npc_id, name=name, persona=persona, actions=build_choices(actions, "actions"),
                       emotions=build_choices(emotions, "emotions"), defaults=defaults, adapter=adapter,
                       max_history=max_history, audience=audience, refusal_action=refusal_action,
                       blocked_words=list(blocked_words) if blocked_words is not None else None,
                       record=record)
        return await self.define(spec)

    async def define(self, spec: NpcSpec) -> AsyncNpc:
        """Define an NPC from a ready ``NpcSpec`` (see ``npc`` for the keyword form)."""
        requests = self._requests
        await requests.request(NpcDefine(id=requests.new_id("d"), npc=spec), NpcDefined)
        requests.npcs[spec.id] = spec
        return AsyncNpc(requests, spec.id)

    async def get_npc(self, npc_id: str) -> AsyncNpc:
        """A handle to an NPC the daemon already knows (from an earlier run), without redefining it.

        Raises ``UnknownNpc`` when the daemon has no NPC of that id in this game.
        """
        requests = self._requests
        frame = await requests.request(NpcStateGet(id=requests.new_id("g"), npc=npc_id), NpcStateFrame)
        requests.npcs[npc_id] = frame.state.npc
        return AsyncNpc(requests, npc_id)

    async def adapters(self) -> list[AdapterInfo]:
        """The LoRA adapters the daemon can serve (names to pass as ``adapter=``)."""
        return (await self._requests.request(AdapterList(id=self._requests.new_id("a")), Adapters)).adapters

    async def load_adapter(self, name: str) -> list[AdapterInfo]:
        """Load a registered adapter now rather than on its first line (avoids that line's load delay)."""
        return (await self._requests.request(AdapterLoad(id=self._requests.new_id("a"), name=name), Adapters)).adapters

    async def unload_adapter(self, name: str) -> list[AdapterInfo]:
        """Free a loaded adapter; a later line that names it loads it again."""
        frame = AdapterUnload(id=self._requests.new_id("a"), name=name)
        return (await self._requests.request(frame, Adapters)).adapters

    async def ping(self, timeout: Timeout = DEFAULT) -> None:
        """One round trip to the daemon; raises if it does not answer."""
        await self._requests.request(Ping(id=self._requests.new_id("p")), Pong, timeout=timeout)

    async def aclose(self) -> None:
        """Close the connection (requests in flight fail with ConnectionLost); stop an autostarted daemon."""
        if self._closed:
            return
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.fail_all(ConnectionLost("the client was closed while this request was in flight"))
            with contextlib.suppress(Exception):
                await conn.ws.close()
            if conn.reader is not None:
                conn.reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await conn.reader
        for task in list(self._requests.background):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 2)
        if self._daemon is not None:
            daemon, self._daemon = self._daemon, None
            await asyncio.to_thread(daemon.stop)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    # -- connection

    def _loop_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            if self._conn is not None and self._conn.loop is not loop:
                if not self._conn.loop.is_closed():
                    raise RuntimeError("this AsyncClient is in use on another event loop; make one per loop")
                self._conn = None
            self._lock, self._lock_loop, self._requests.slots = asyncio.Lock(), loop, None
        return self._lock

    async def _ensure_connected(self) -> _Conn:
        if self._closed:
            raise ZykeError("this client is closed")
        lock = self._loop_lock()
        conn = self._conn
        if conn is not None and conn.alive:
            return conn
        async with lock:
            conn = self._conn
            if conn is not None and conn.alive:
                return conn
            conn = await self._connect_with_retry()
            self._conn = conn
            self._ever_connected = True
            return conn

    async def _connect_with_retry(self) -> _Conn:
        loop = asyncio.get_running_loop()
        window = self.reconnect_window if self._ever_connected else 0.0
        deadline = loop.time() + window
        delay = 0.05
        while True:
            try:
                return await self._connect_once()
            except DaemonNotRunning:
                if self.autostart and self._daemon is None:
                    await self._start_daemon()
                    continue
                if loop.time() + delay > deadline:
                    raise
                log.info("daemon not reachable; retrying in %.2fs", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _start_daemon(self) -> None:
        self._daemon = await asyncio.to_thread(LocalDaemon.start, self._url, self._token,
                                               self.autostart_timeout)

    async def _connect_once(self) -> _Conn:
        from . import __version__

        url = self.url
        try:
            ws = await connect(url, open_timeout=self.connect_timeout, max_size=MAX_FRAME_BYTES, proxy=None,
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
        hello = Hello(id=self._requests.new_id("h"), token=token, protocol=PROTOCOL_VERSION, game=self.game,
                      client=ClientInfo(name=self.client_name, version=__version__))
        try:
            await ws.send(json.dumps(dump_frame(hello)))
            async with asyncio.timeout(self.connect_timeout):
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
        if self._requests.slots is None:
            limit = welcome.limits.max_queued_per_client if welcome.limits else None
            self._requests.slots = asyncio.Semaphore(limit or 8)
        # Bring the daemon back to what this client defined (history is kept on its disk).
        try:
            for spec in list(self._requests.npcs.values()):
                frame = NpcDefine(id=self._requests.new_id("d"), npc=spec)
                item = await conn.exchange(frame, _deadline(self.connect_timeout), self.connect_timeout)
                _expect(item, NpcDefined)
        except (_NotSent, ConnectionLost) as exc:
            conn.alive = False
            raise DaemonNotRunning(f"the daemon at {url} dropped the connection while NPCs were being "
                                   f"re-defined; {START_HINT}") from exc
        if self._ever_connected:
            log.info("reconnected to %s and re-defined %d NPC(s)", url, len(self._requests.npcs))
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
            if self._conn is conn:
                self._conn = None
            conn.fail_all(ConnectionLost(f"{reason} while this request was in flight; it was not retried "
                                         "(the next call reconnects)"))


class _Requests:
    """The internal interface an ``AsyncClient`` gives its handles (see the module docstring).

    The client owns one and keeps the connection (``connect`` returns the open one or opens one);
    this keeps what every request needs: ids, the NPCs defined (re-defined after a reconnect), the
    slots that keep the client within the daemon's per-connection queue, and the cancels sent in the
    background. Not for game code.
    """

    def __init__(self, client: AsyncClient, connect: Callable[[], Awaitable[_Conn]]) -> None:
        self._client = client  # read for its public settings only: timeout, connect_timeout
        self.connect = connect
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
        return response._bind(AsyncNpc(self, response.npc).feedback)

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


class AsyncNpc:
    """A handle to one NPC defined through an ``AsyncClient``. Cheap; make as many as you like."""

    def __init__(self, requests: _Requests, npc_id: str) -> None:
        self._requests = requests
        self.id = npc_id

    @property
    def spec(self) -> NpcSpec:
        """The NPC's current definition (updated by ``load``)."""
        return self._requests.npcs[self.id]

    @property
    def name(self) -> str:
        return self.spec.display_name

    @property
    def actions(self) -> list[str]:
        """The declared actions' names (descriptions, if any, are in ``spec.actions``)."""
        return self.spec.action_names

    @property
    def emotions(self) -> list[str]:
        """The declared emotions' names."""
        return self.spec.emotion_names

    def __repr__(self) -> str:
        return f"AsyncNpc({self.id!r})"

    async def say(self, text: str, **kwargs: Unpack[SayOptions]) -> NpcResponse:
        """Say a line to the NPC and wait for its whole reply.

        The keywords (``state``, generation options, ``adapter``, ``timeout``, ``allowed_actions``,
        ``priority``, ``deadline_ms``...) are ``zyke.say_options.SayOptions``'s, documented there; an
        unknown one is a ``TypeError``. When ``timeout`` expires the request is cancelled on the daemon
        and ``ZykeTimeout`` raised; cancelling the awaiting task cancels it on the daemon too.
        """
        frame = say_frame(self.id, self._requests.new_id("s"), text, False, kwargs, "AsyncNpc.say")
        return await self._requests.say(frame, kwargs.get("timeout", DEFAULT))

    def stream(self, text: str, **kwargs: Unpack[SayOptions]) -> AsyncReplyStream:
        """Say a line and get the reply as it is generated: ``async for piece in npc.stream(...)``.

        Each item is the next piece of the spoken line (a ``str``); they concatenate to the final
        ``stream.response.say``. The request is sent on the first iteration. Leaving the loop early
        and closing the stream (``async with`` does it) cancels the request on the daemon. The
        keywords are ``say``'s (``zyke.say_options.SayOptions``).
        """
        frame = say_frame(self.id, self._requests.new_id("s"), text, True, kwargs, "AsyncNpc.stream")
        return AsyncReplyStream(self._requests, frame, kwargs.get("timeout", DEFAULT))

    async def save(self) -> dict[str, Any]:
        """The NPC's full state (definition and history) as a JSON-ready dict for a game's save file."""
        request = NpcStateGet(id=self._requests.new_id("g"), npc=self.id)
        frame = await self._requests.request(request, NpcStateFrame)
        return frame.state.model_dump(mode="json", exclude_none=True)

    async def load(self, state: NpcState | Mapping[str, Any]) -> None:
        """Restore a state from ``save()``: its history and definition replace the current ones."""
        parsed = state if isinstance(state, NpcState) else NpcState.model_validate(state)
        if parsed.npc.id != self.id:
            raise ValueError(f"this state belongs to NPC {parsed.npc.id!r}, not {self.id!r}")
        request = NpcStateSet(id=self._requests.new_id("l"), state=parsed)
        frame = await self._requests.request(request, NpcStateFrame)
        self._requests.npcs[self.id] = frame.state.npc

    async def reset(self) -> None:
        """Forget the conversation history; the definition stays."""
        await self._requests.request(NpcReset(id=self._requests.new_id("r"), npc=self.id), Ok)

    async def feedback(self, reply_id: str | NpcResponse, reward: float, *, label: LabelLike = None,
                       source: Source | None = None, note: str | None = None, timeout: Timeout = DEFAULT) -> None:
        """Rate one of this NPC's replies after the fact (``reply_id``: its ``response.request_id``, or the
        response itself): ``reward`` in [-1, 1], ``label`` what would have been right (``{"action": "refuse"}``,
        an action the turn allowed, an emotion the NPC declared, or a ``say`` line), ``source`` who rated
        (``"game"``, ``"player"``, ``"simulated"``), ``note`` free text never trained on.

        Recorded with the reply when the daemon records experience and the NPC was defined with ``record=True``
        (docs/EXPERIENCE.md); returns once it is stored. Raises ``NotRecording`` (recording is off for the daemon
        or the NPC), ``UnknownReply`` (no such recorded reply), ``BadLabel``, ``ExperienceFull``; a bad value
        (``reward=2``) raises pydantic's ``ValidationError`` before anything is sent. Not retried after a lost
        connection (``ConnectionLost``): the daemon may have recorded it.
        """
        rid = reply_id.request_id if isinstance(reply_id, NpcResponse) else reply_id
        parsed = label if label is None or isinstance(label, FeedbackLabel) else FeedbackLabel.model_validate(
            dict(label))
        frame = Feedback(id=self._requests.new_id("f"), npc=self.id, reply_id=rid, reward=reward, label=parsed,
                         source=source, note=note)
        await self._requests.request(frame, Ok, timeout=timeout, idempotent=False)


class AsyncReplyStream:
    """A streamed reply: async-iterate for pieces of text, then read ``response``.

    ``cancel()`` stops the generation on the daemon (iteration then raises ``Cancelled``); ``aclose()``
    (or leaving an ``async with`` block) abandons it quietly, cancelling it on the daemon when unfinished.
    """

    def __init__(self, requests: _Requests, frame: NpcSay, timeout: Timeout) -> None:
        self._requests = requests
        self._call = requests.stream(frame, timeout)
        self.text = ""
        """The spoken text received so far."""
        self.response: NpcResponse | None = None
        """The final reply once the stream is exhausted."""

    @property
    def request_id(self) -> str:
        return self._call.frame.id

    @property
    def done(self) -> bool:
        return self._call.done

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> str:
        piece = await self._next_piece()
        if piece is None:
            raise StopAsyncIteration
        return piece

    async def _next_piece(self) -> str | None:
        """The next piece of text, or None at the end."""
        call = self._call
        if call.done:
            return None
        if not call.started:
            await call.start()
        item = await call.next()
        if isinstance(item, ReplyDelta):
            self.text += item.text
            return item.text
        call.finish()
        self.response = self._requests.response(item)
        return None

    async def final(self) -> NpcResponse:
        """Consume what is left of the stream and return the whole reply."""
        while await self._next_piece() is not None:
            pass
        if self.response is None:
            raise ZykeError("the stream was closed before the reply arrived")
        return self.response

    async def cancel(self) -> None:
        """Stop the generation on the daemon; the next iteration raises ``Cancelled``.

        Does nothing when the reply has already fully arrived.
        """
        await self._call.cancel()

    async def aclose(self) -> None:
        """Abandon the stream; an unfinished request is cancelled on the daemon."""
        self._call.abandon()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # Breaking out of ``async for`` without closing: still stop the work on the daemon.
        call = getattr(self, "_call", None)
        if call is not None:
            with contextlib.suppress(Exception):
                call.abandon_threadsafe()
