"""The asyncio shell around the sans-I/O core: WebSockets and HTTP.

Everything that decides anything lives in core.py (and scheduler.py). This module moves bytes: it feeds messages
to a ConnectionCore, sends the frames it returns through one ordered outbox per connection, and hands generation
jobs to the worker (worker.py), which owns the one model thread, the backend and adapters, and pops the shared
queue itself (foreground first, clients in turn within a priority); the worker posts deltas and completions back
to the loop as events. Timers (timeouts, deadlines) and each connection's job bookkeeping stay here, on the loop.

uvicorn serves the port (one ASGI app, http_api.py): WebSockets come back here through a small adapter
(asgi_ws.py), and the HTTP API's generation requests join the same queue as virtual connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import uvicorn
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State
from zyke.paths import runtime_path
from zyke.protocol import AdapterInfo, Adapters, ErrorCode, dump_frame

from . import __version__, experience
from .adapters import AdapterRegistry
from .asgi_ws import AsgiWebSocket, Receive, Scope, WsProtocol, header, refuse
from .asgi_ws import Send as AsgiSend
from .backends.base import Backend
from .completions import CompletionResult
from .config import DaemonConfig
from .core import (
    Action,
    AdapterOp,
    CancelJob,
    Close,
    ConnectionCore,
    DaemonCore,
    RecordFeedback,
    Send,
    Submit,
    error_frame,
)
from .errors import DaemonError
from .metrics import Metrics
from .scheduler import PRIORITIES
from .sessions import SessionStore
from .worker import Job, Peer, Worker

log = logging.getLogger(__name__)

#: Hard ceiling for the websockets library; the protocol's own (smaller) cap is checked in the core,
#: so an oversized frame costs one error frame instead of the connection.
_WS_MAX_SIZE = 4 * 1024 * 1024


#: How long a connection closed by a cap gets to take its close frame before the socket is dropped (a client
#: that does not read never takes it). Whole seconds: uvicorn types ``timeout_graceful_shutdown`` as an int.
_CLOSE_GRACE_S = 2


class _Peer:
    """One connection: its core and an outbox drained by a single writer task, which keeps order.

    The outbox is bounded in bytes (``max_send_queue_bytes``): a client that never reads once grew the daemon by
    39 MiB per 45 MiB it sent. Past a quarter of the bound the connection's frames are not read until the client
    has read its answers (``drained``), so a client that pipelines requests is slowed, not closed; past the bound
    (replies still arriving for a client that reads nothing) the connection is closed (1008)."""

    def __init__(self, ws: AsgiWebSocket, core: ConnectionCore, metrics: Metrics,
                 max_queued_bytes: int = 4 * 1024 * 1024) -> None:
        self.ws = ws
        self.core = core
        self.outbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.queued_bytes = 0
        self.closing: asyncio.Task[None] | None = None
        self._max_queued_bytes = max_queued_bytes
        self._metrics = metrics
        self._drained = asyncio.Event()  # set while queued_bytes is below the low-water mark
        self._drained.set()

    def send(self, frame: dict[str, Any]) -> None:
        if self.closing is not None:
            return
        if frame.get("type") == "error":
            self._metrics.errors.labels(frame["code"]).inc()
        data = json.dumps(frame, ensure_ascii=False).encode("utf-8")
        if self.queued_bytes + len(data) > self._max_queued_bytes:
            log.warning("connection %s: over %d bytes of answers unread; closing it", self.core.conn_id,
                        self._max_queued_bytes)
            self.close(1008, "max_send_queue_bytes: answers are not being read", "max_send_queue_bytes")
            return
        self.queued_bytes += len(data)
        if self.queued_bytes > self._max_queued_bytes // 4:
            self._drained.clear()
        self.outbox.put_nowait(data)

    async def drained(self) -> None:
        """Wait until the client has read most of its answers (or the connection is closing): the handler stops
        reading this client's frames meanwhile, so TCP pushes back on it instead of the outbox growing."""
        await self._drained.wait()

    def close(self, code: int, reason: str, cap: str) -> None:
        """Close the connection because a documented cap was reached (counted in /metrics by ``cap``)."""
        if self.closing is not None:
            return
        self._metrics.closed_by_cap.labels(cap).inc()
        self._drained.set()
        self.closing = asyncio.create_task(self._close(code, reason))

    async def _close(self, code: int, reason: str) -> None:
        await asyncio.sleep(0)  # let the writer take what is already queued (the error frame saying why)
        try:
            async with asyncio.timeout(_CLOSE_GRACE_S):
                while not self.outbox.empty() and self.ws.state is State.OPEN:
                    await asyncio.sleep(0.01)
                await self.ws.close(code, reason)
        except TimeoutError:
            self.ws.transport.abort()

    async def writer(self) -> None:
        try:
            while (data := await self.outbox.get()) is not None:
                try:
                    await self.ws.send(data, text=True)
                except ConnectionClosed:
                    return
                finally:
                    self.queued_bytes -= len(data)
                    if self.queued_bytes <= self._max_queued_bytes // 8:
                        self._drained.set()
        finally:
            self._drained.set()  # nothing more will be sent: never leave the handler waiting


class HttpPeer(_Peer):
    """The virtual connection of one HTTP API request (http_api.py): the frames, text deltas and completion
    results the model side hands it wait in ``events`` for the request's handler, instead of a socket's outbox.
    It goes through the same queue, timeouts and metrics as a WebSocket connection's jobs."""

    def __init__(self, core: ConnectionCore, metrics: Metrics) -> None:
        super().__init__(None, core, metrics)  # type: ignore[arg-type]
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def send(self, frame: dict[str, Any]) -> None:
        if frame.get("type") == "error":
            self._metrics.errors.labels(frame["code"]).inc()
        self.events.put_nowait(("frame", frame))

    def delta(self, text: str) -> None:
        self.events.put_nowait(("delta", text))

    def complete(self, result: CompletionResult) -> None:
        self.events.put_nowait(("done", result))

    def close(self, code: int, reason: str, cap: str) -> None:
        """A cap that closes a WebSocket (an HTTP request never authenticates by token frames): nothing to close."""


class DaemonServer:
    """Listens at once and loads the model in the background: /health says "loading" meanwhile and
    WebSocket messages wait for the model, so a game that starts the daemon can connect straight away."""

    def __init__(self, config: DaemonConfig, sessions: SessionStore, token: str, load: Callable[[], Backend],
                 registry: AdapterRegistry, write_runtime_file: bool = True) -> None:
        self.config = config
        self.registry = registry
        self.sessions = sessions
        self.token = token
        self._load = load
        self.core: DaemonCore | None = None
        self.load_error: BaseException | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.metrics = Metrics()
        self._peers: dict[int, _Peer] = {}
        #: the model side: the model thread, the backend, adapters, the batch loop (worker.py)
        self.worker = Worker(config, registry, self.metrics, self._peers, self._drop_expired)
        #: the one job queue, shared with the model thread (pushed and removed here, popped there)
        self.queue = self.worker.queue
        self._open = 0  # WebSocket connections being handled, those waiting for the model included
        self._server: uvicorn.Server | None = None
        self._sockets: list[socket.socket] = []
        self._ticker: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        #: HTTP requests waiting for the model (http_api.py), capped by max_connections like WebSockets
        self.http_inflight = 0
        self._loader: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = time.monotonic()
        self._write_runtime = write_runtime_file
        self.port: int | None = None
        # a file moved aside is worth a look: count it where an operator already watches
        sessions.on_corrupt = lambda _path: self.metrics.corrupt_files.labels("session").inc()
        registry.on_corrupt = lambda _path: self.metrics.corrupt_files.labels("manifest").inc()

    # -- lifecycle

    async def start(self) -> None:
        from .http_api import build_app  # the routes need this module's classes

        config = uvicorn.Config(
            build_app(self), http="h11", ws=WsProtocol, ws_max_size=_WS_MAX_SIZE, ws_ping_interval=20,
            ws_ping_timeout=20, lifespan="off", interface="asgi3", log_config=None, access_log=False,
            proxy_headers=False, server_header=False, timeout_graceful_shutdown=_CLOSE_GRACE_S,
        )
        config.load()
        # uvicorn logs every accepted WebSocket at info; the daemon logs what matters itself
        logging.getLogger("uvicorn.error").setLevel(max(logging.WARNING, log.getEffectiveLevel()))
        self._sockets = _listen(self.config.host, self.config.port)
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        try:
            await server.startup(sockets=self._sockets)
        except BaseException:
            for sock in self._sockets:
                sock.close()
            raise
        self._server = server
        self._ticker = asyncio.create_task(server.main_loop(), name="zyke-http-tick")  # Date headers
        self.port = self._sockets[0].getsockname()[1]
        self._loader = asyncio.create_task(self._load_model(), name="zyke-load")
        if self._write_runtime:
            path = runtime_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"host": self.config.host, "port": self.port, "pid": os.getpid(),
                                        "version": __version__}))
        log.info("zyke-daemon %s listening on ws://%s:%s (HTTP API under /v1 on the same port)", __version__,
                 self.config.host, self.port)
        if not is_loopback_host(self.config.host):
            log.warning("listening on %s, not a loopback address: other machines on the network can reach this "
                        "daemon (the token guards NPCs, /health and /metrics need none). Use --host 127.0.0.1 "
                        "unless that is what you want.", self.config.host)

    @property
    def backend(self) -> Backend | None:
        """The loaded backend (the worker's), or None while the model loads or when it failed to."""
        return self.worker.backend

    async def _load_model(self) -> None:
        try:
            backend = await self.worker.load(self._load)
        except BaseException as exc:
            self.load_error = exc
            self.ready.set_exception(exc)
            return
        self.core = DaemonCore(self.config, self.sessions, self.token, backend.model, backend.name,
                               adapters=self._adapters, default_adapter=self._default_adapter())
        self.worker.start(self.core)
        self.ready.set_result(None)
        log.info("model %s ready on %s", backend.model.name, backend.name)

    def _default_adapter(self) -> str | None:
        """The configured default adapter if it is registered for the model being served, else None (logged):
        a custom base model keeps working without it instead of failing every request."""
        name, backend = self.config.default_adapter, self.backend
        if name is None or backend is None:
            return None
        try:
            self.registry.resolve(name, backend.fingerprint, backend.adapter_kind)
        except DaemonError as exc:
            log.warning("not using the default adapter %r: %s", name, exc.message)
            return None
        log.info("NPCs that name no adapter use %r", name)
        return name

    def _adapters(self) -> list[AdapterInfo]:
        return self.registry.infos(self.backend.loaded_adapters if self.backend else [])

    async def serve_forever(self) -> None:
        """Run until stopped; raises the model's load error if it could not be loaded."""
        assert self._server is not None
        await self.ready
        await self._closed.wait()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            await self._server.shutdown(sockets=self._sockets)  # WebSockets get 1012, HTTP requests finish
            if self._ticker is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._ticker
        self._closed.set()
        if self._loader is not None:
            self._loader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._loader
        await self.worker.stop()  # the model thread's work in hand ends first, then the backend closes
        if self._write_runtime:
            runtime = runtime_path()
            with contextlib.suppress(OSError, ValueError):
                if json.loads(runtime.read_text()).get("pid") == os.getpid():
                    runtime.unlink()

    # -- HTTP on the same port (the routes are in http_api.py)

    def health(self) -> tuple[int, dict[str, Any]]:
        """``GET /health``: the status code and document (no token needed: launchers poll it)."""
        health: dict[str, Any] = {"status": "loading", "version": __version__,
                                  "uptime_s": round(time.monotonic() - self._started, 3)}
        if self.backend is not None:
            health |= {"status": "ready", "model": self.backend.model.name, "backend": self.backend.name}
        elif self.load_error is not None:
            health |= {"status": "error", "error": str(self.load_error)}
        return (HTTPStatus.SERVICE_UNAVAILABLE if self.load_error else HTTPStatus.OK), health

    def render_metrics(self) -> bytes:
        """``GET /metrics``: Prometheus text, with the queue gauges read now."""
        self.metrics.queue_depth.set(len(self.queue))
        for name, depth in zip(PRIORITIES, self.queue.depths(), strict=True):
            self.metrics.queue_depth_by_priority.labels(name).set(depth)
        return self.metrics.render()

    def http_connection(self, game: str) -> HttpPeer:
        """A virtual connection for one HTTP API request, already authenticated (the HTTP layer checked the
        bearer token) and in ``game``'s NPC namespace, so its NPCs are the ones a WebSocket of that game sees."""
        assert self.core is not None
        core = self.core.connect()
        core.authenticated, core.game = True, game
        peer = HttpPeer(core, self.metrics)
        self._peers[core.conn_id] = peer
        return peer

    def release(self, peer: HttpPeer) -> None:
        """The HTTP request is answered or its client left: cancel and unqueue what it still has in flight."""
        for job in peer.core.close():
            if job.timer is not None:
                job.timer.cancel()
            self.queue.remove(peer.core.conn_id, job.request_id)
        self.queue.drain(peer.core.conn_id)
        self._peers.pop(peer.core.conn_id, None)
        self.metrics.queue_depth.set(len(self.queue))

    async def websocket(self, scope: Scope, receive: Receive, send: AsgiSend) -> None:
        """ASGI entry of one WebSocket (its Host already checked): the browser Origin rule the websockets
        library's ``origins=`` applied (no Origin, or one of ``allowed_origins``; else HTTP 403), then the
        connection as ever."""
        if (await receive())["type"] != "websocket.connect":
            return
        origin = header(scope, b"origin")
        if origin is not None and origin not in self.config.allowed_origins:
            await refuse(send, HTTPStatus.FORBIDDEN, b"Failed to open a WebSocket connection: invalid Origin "
                         b"header; start the daemon with --allow-origin to let a browser page connect\n")
            return
        await send({"type": "websocket.accept"})
        await self._handle(AsgiWebSocket(scope, receive, send))

    # -- WebSocket connections

    async def _handle(self, ws: AsgiWebSocket) -> None:
        self._open += 1
        try:
            if self._open > self.config.max_connections:
                await self._refuse(ws)
                return
            await self._serve_connection(ws)
        finally:
            self._open -= 1

    async def _refuse(self, ws: AsgiWebSocket) -> None:
        """Past ``max_connections``: say why in a typed error frame, then close with 1013 (try again later)."""
        limit = self.config.max_connections
        self.metrics.errors.labels(ErrorCode.TOO_MANY_CONNECTIONS.value).inc()
        self.metrics.closed_by_cap.labels("max_connections").inc()
        frame = error_frame(ErrorCode.TOO_MANY_CONNECTIONS,
                            f"the daemon already serves {limit} connections (max_connections); close one or retry",
                            None)
        try:
            async with asyncio.timeout(_CLOSE_GRACE_S):
                await ws.send(json.dumps(frame))
                await ws.close(1013, "max_connections reached")
        except (TimeoutError, ConnectionClosed):
            ws.transport.abort()

    def _hello_expired(self, peer: _Peer) -> None:
        if not peer.core.authenticated:
            peer.send(error_frame(ErrorCode.NOT_AUTHENTICATED,
                                  f"no hello with the daemon's token within {self.config.hello_timeout_s:g} s "
                                  "(hello_timeout_s); closing", None))
            peer.close(1008, "hello_timeout: no hello in time", "hello_timeout")

    async def _serve_connection(self, ws: AsgiWebSocket) -> None:
        try:
            await self.ready
        except BaseException:
            await ws.close(1011, "model failed to load")
            return
        assert self.core is not None
        peer = _Peer(ws, self.core.connect(), self.metrics, self.config.max_send_queue_bytes)
        self._peers[peer.core.conn_id] = peer
        self.metrics.connections.inc()
        writer = asyncio.create_task(peer.writer())
        # counted from the model being ready, when the connection's frames start being read
        hello_timer = asyncio.get_running_loop().call_later(self.config.hello_timeout_s, self._hello_expired, peer)
        try:
            async for message in ws:
                for action in peer.core.receive(message):
                    self._apply(peer, action)
                await peer.drained()  # a client that does not read its answers is not read either
        except ConnectionClosed:
            pass
        finally:
            hello_timer.cancel()
            self.metrics.connections.dec()
            for job in peer.core.close():
                if job.timer is not None:
                    job.timer.cancel()
                self.queue.remove(peer.core.conn_id, job.request_id)
            self.queue.drain(peer.core.conn_id)
            del self._peers[peer.core.conn_id]
            peer.outbox.put_nowait(None)
            await writer

    def _apply(self, peer: _Peer, action: Action) -> None:
        match action:
            case Close(code, reason, cap):
                peer.close(code, reason, cap)
            case Send(frame):
                if frame.get("type") != "error":
                    self.metrics.requests.labels(frame["type"]).inc()
                peer.send(frame)
            case Submit(job):
                self.metrics.requests.labels(getattr(job, "kind", "npc.say")).inc()
                # the deadline runs from now: time in the queue counts (issue 14: a say queued behind a huge
                # one waited minutes with no timeout)
                job.timer = asyncio.get_running_loop().call_later(
                    self.config.request_timeout_s, self._expire, peer, job)
                self.worker.submit(peer.core.conn_id, job)  # the model thread may take it from here on
                if job.deadline_at is not None:  # dropped when still queued then (docs/SCHEDULING.md)
                    asyncio.get_running_loop().call_later(max(job.deadline_at - time.monotonic(), 0),
                                                          self._deadline, peer, job)
                self.metrics.queue_depth.set(len(self.queue))
            case CancelJob(job):
                if self.queue.remove(peer.core.conn_id, job.request_id) is not None:
                    if job.timer is not None:
                        job.timer.cancel()
                    peer.core.job_done(job)
                    peer.send(error_frame(ErrorCode.CANCELLED, "the request was cancelled", job.request_id))
            case AdapterOp():
                self.metrics.requests.labels(f"adapter.{action.op}").inc()
                task = asyncio.create_task(self._adapter_op(peer, action))
                self._tasks.add(task)  # keep a reference until done, or the loop may drop it
                task.add_done_callback(self._tasks.discard)
            case RecordFeedback():  # appended off the loop, then answered ok (docs/EXPERIENCE.md)
                experience.record_feedback(peer.core.daemon, action, peer.send)

    def _expire(self, peer: _Peer, job: Job) -> None:
        """``request_timeout_s`` after a say was queued: a job still waiting is answered ``timeout`` here; a
        running one is cancelled (the backend checks between prompt chunks and tokens) and answered by its run."""
        job.timed_out = True
        job.cancel.set()
        if self.queue.remove(peer.core.conn_id, job.request_id) is job:
            self.metrics.queue_depth.set(len(self.queue))
            peer.core.job_done(job)
            peer.send(error_frame(ErrorCode.TIMEOUT, f"no reply within {self.config.request_timeout_s:g} s "
                                  "(still queued behind other requests)", job.request_id))

    def _deadline(self, peer: _Peer, job: Job) -> None:
        """A say's ``deadline_ms`` is up: if it is still queued (not started, not answered, its id not reused
        by a newer say), drop it with the typed ``expired`` error instead of answering it late."""
        if peer.core.pending.get(job.request_id) is not job or job.started_at is not None:
            return
        if self.queue.remove(peer.core.conn_id, job.request_id) is job:
            self.metrics.queue_depth.set(len(self.queue))
            self._drop_expired(peer, job)

    def _drop_expired(self, peer: Peer, job: Job) -> None:
        """Answer a job still queued past its deadline with ``expired`` (loop thread: from its deadline timer, or
        posted by the worker when the model thread popped it late)."""
        if job.timer is not None:
            job.timer.cancel()
        peer.core.job_done(job)
        self.metrics.expired.labels(PRIORITIES[job.rank]).inc()
        waited_ms = (time.monotonic() - job.enqueued_at) * 1000
        peer.send(error_frame(ErrorCode.EXPIRED, f"dropped unanswered: it waited {waited_ms:.0f} ms in the queue, "
                              f"past its deadline ({PRIORITIES[job.rank]} priority)", job.request_id))

    async def _adapter_op(self, peer: _Peer, op: AdapterOp) -> None:
        try:
            await self.worker.adapter_op(op)  # on the model thread, between batches
        except DaemonError as exc:
            peer.send(error_frame(exc.code, exc.message, op.request_id))
            return
        peer.send(dump_frame(Adapters(id=op.request_id, adapters=self._adapters())))


_WILDCARD_HOSTS = {"0.0.0.0", "::", ""}


def is_loopback_host(host: str) -> bool:
    """Whether binding ``host`` keeps the daemon on this machine: ``localhost`` or a loopback address."""
    name = host.strip().strip("[]").lower().rstrip(".")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_allowed(header: str, config: DaemonConfig) -> bool:
    """Whether a request's Host header names this daemon: a loopback name or address, the address it is bound to,
    any address when bound to all interfaces, or a name in ``allowed_hosts``.

    DNS rebinding points a web page's own name at 127.0.0.1, so the page's requests arrive with ``Host: evil.example``;
    refusing unknown names keeps /health and /metrics (which need no token) from being read by it. An address
    literal cannot be rebound, so addresses only need to be reachable."""
    name = header.strip().lower()
    if name.startswith("["):  # [::1]:7341
        name = name[1:name.find("]")] if "]" in name else name[1:]
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    name = name.rstrip(".")
    allowed = {h.strip().lower().rstrip(".") for h in config.allowed_hosts}
    bound = config.host.strip("[]").lower()
    if "*" in allowed or (name and name in allowed | {"localhost", bound}):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    return address.is_loopback or bound in _WILDCARD_HOSTS


def _listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for ``host`` (every address it resolves to, as asyncio's create_server binds) on ``port``;
    with port 0, the first socket's free port for all of them, so the daemon has one port to publish."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(128)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets
