"""The asyncio shell around the sans-I/O core: WebSockets, HTTP health/metrics, and the model thread.

Everything that decides anything lives in core.py. This module moves bytes: it feeds messages to a
ConnectionCore, sends the frames it returns through one ordered outbox per connection, and runs
generation jobs one at a time on a single model thread (a llama.cpp context is not thread-safe),
taking jobs from a FairQueue so clients are served in turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from zyke.paths import runtime_path
from zyke.prompt_format import END_OF_REPLY
from zyke.protocol import AdapterInfo, Adapters, ErrorCode, ReplyDelta, dump_frame

from . import __version__
from .adapters import AdapterRegistry
from .backends.base import Backend
from .config import DaemonConfig
from .core import AdapterOp, CancelJob, ConnectionCore, DaemonCore, SayJob, Send, Submit, error_frame
from .errors import DaemonError, ModelLoadError
from .metrics import Metrics
from .scheduler import FairQueue
from .sessions import SessionStore

log = logging.getLogger(__name__)

#: Hard ceiling for the websockets library; the protocol's own (smaller) cap is checked in the core,
#: so an oversized frame costs one error frame instead of the connection.
_WS_MAX_SIZE = 4 * 1024 * 1024


class _Peer:
    """One connection: its core and an outbox drained by a single writer task, which keeps order."""

    def __init__(self, ws: ServerConnection, core: ConnectionCore, metrics: Metrics) -> None:
        self.ws = ws
        self.core = core
        self.outbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._metrics = metrics

    def send(self, frame: dict[str, Any]) -> None:
        if frame.get("type") == "error":
            self._metrics.errors.labels(frame["code"]).inc()
        self.outbox.put_nowait(frame)

    async def writer(self) -> None:
        while (frame := await self.outbox.get()) is not None:
            try:
                await self.ws.send(json.dumps(frame, ensure_ascii=False))
            except ConnectionClosed:
                return


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
        self.backend: Backend | None = None
        self.core: DaemonCore | None = None
        self.load_error: BaseException | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.metrics = Metrics()
        self.queue: FairQueue[SayJob] = FairQueue()
        self._work = asyncio.Event()
        self._peers: dict[int, _Peer] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zyke-model")
        self._server: Server | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._loader: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = time.monotonic()
        self._write_runtime = write_runtime_file
        self.port: int | None = None

    # -- lifecycle

    async def start(self) -> None:
        self._server = await serve(
            self._handle, self.config.host, self.config.port,
            process_request=self._http, origins=[None, *self.config.allowed_origins],
            max_size=_WS_MAX_SIZE, ping_interval=20, ping_timeout=20,
        )
        self.port = next(iter(self._server.sockets)).getsockname()[1]
        self._dispatcher = asyncio.create_task(self._dispatch(), name="zyke-dispatch")
        self._loader = asyncio.create_task(self._load_model(), name="zyke-load")
        if self._write_runtime:
            path = runtime_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"host": self.config.host, "port": self.port, "pid": os.getpid(),
                                        "version": __version__}))
        log.info("zyke-daemon %s listening on ws://%s:%s", __version__, self.config.host, self.port)

    async def _load_model(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.backend = await loop.run_in_executor(self._executor, self._load)
        except BaseException as exc:
            self.load_error = exc
            self.ready.set_exception(exc)
            return
        self.core = DaemonCore(self.config, self.sessions, self.token, self.backend.model, self.backend.name,
                               adapters=self._adapters)
        self.ready.set_result(None)
        log.info("model %s ready on %s", self.backend.model.name, self.backend.name)

    def _adapters(self) -> list[AdapterInfo]:
        return self.registry.infos(self.backend.loaded_adapters if self.backend else [])

    def _ensure_adapter(self, name: str | None, request_id: str | None) -> None:
        """Model thread: load a registered adapter on first use (checked against this base and its hashes)."""
        backend = self.backend
        if name is None or backend is None or name in backend.loaded_adapters:
            return
        path = self.registry.resolve(name, backend.fingerprint, backend.adapter_kind, request_id)
        try:
            backend.load_adapter(name, path)
        except ModelLoadError as exc:
            raise DaemonError(ErrorCode.ADAPTER_REJECTED, str(exc), request_id) from exc

    async def serve_forever(self) -> None:
        """Run until stopped; raises the model's load error if it could not be loaded."""
        assert self._server is not None
        await self.ready
        await self._server.wait_closed()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in (self._dispatcher, self._loader):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self.backend is not None:
            self.backend.close()
        if self._write_runtime:
            runtime = runtime_path()
            with contextlib.suppress(OSError, ValueError):
                if json.loads(runtime.read_text()).get("pid") == os.getpid():
                    runtime.unlink()

    # -- HTTP on the same port

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return None
        path = request.path.split("?", 1)[0]
        if path == "/health":
            health: dict[str, Any] = {"status": "loading", "version": __version__,
                                      "uptime_s": round(time.monotonic() - self._started, 3)}
            if self.backend is not None:
                health |= {"status": "ready", "model": self.backend.model.name, "backend": self.backend.name}
            elif self.load_error is not None:
                health |= {"status": "error", "error": str(self.load_error)}
            status = HTTPStatus.SERVICE_UNAVAILABLE if self.load_error else HTTPStatus.OK
            return _response(status, json.dumps(health).encode(), "application/json")
        if path == "/metrics":
            self.metrics.queue_depth.set(len(self.queue))
            return _response(HTTPStatus.OK, self.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")
        return _response(HTTPStatus.NOT_FOUND, b"not found: try /health, /metrics or a WebSocket\n", "text/plain")

    # -- WebSocket connections

    async def _handle(self, ws: ServerConnection) -> None:
        try:
            await self.ready
        except BaseException:
            await ws.close(1011, "model failed to load")
            return
        assert self.core is not None
        peer = _Peer(ws, self.core.connect(), self.metrics)
        self._peers[peer.core.conn_id] = peer
        self.metrics.connections.inc()
        writer = asyncio.create_task(peer.writer())
        try:
            async for message in ws:
                for action in peer.core.receive(message):
                    self._apply(peer, action)
        except ConnectionClosed:
            pass
        finally:
            self.metrics.connections.dec()
            for job in peer.core.close():
                self.queue.remove(peer.core.conn_id, job.request_id)
            self.queue.drain(peer.core.conn_id)
            del self._peers[peer.core.conn_id]
            peer.outbox.put_nowait(None)
            await writer

    def _apply(self, peer: _Peer, action: Send | Submit | CancelJob) -> None:
        match action:
            case Send(frame):
                if frame.get("type") != "error":
                    self.metrics.requests.labels(frame["type"]).inc()
                peer.send(frame)
            case Submit(job):
                self.metrics.requests.labels("npc.say").inc()
                self.queue.push(peer.core.conn_id, job.request_id, job)
                self.metrics.queue_depth.set(len(self.queue))
                self._work.set()
            case CancelJob(job):
                if self.queue.remove(peer.core.conn_id, job.request_id) is not None:
                    peer.core.job_done(job)
                    peer.send(error_frame(ErrorCode.CANCELLED, "the request was cancelled", job.request_id))
            case AdapterOp():
                self.metrics.requests.labels(f"adapter.{action.op}").inc()
                task = asyncio.create_task(self._adapter_op(peer, action))
                self._tasks.add(task)  # keep a reference until done, or the loop may drop it
                task.add_done_callback(self._tasks.discard)

    async def _adapter_op(self, peer: _Peer, op: AdapterOp) -> None:
        def run() -> None:
            if op.op == "load":
                self._ensure_adapter(op.name, op.request_id)
            elif self.backend is not None:
                self.backend.unload_adapter(op.name)

        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, run)
        except DaemonError as exc:
            peer.send(error_frame(exc.code, exc.message, op.request_id))
            return
        peer.send(dump_frame(Adapters(id=op.request_id, adapters=self._adapters())))

    # -- the model thread

    async def _dispatch(self) -> None:
        while True:
            job = self.queue.pop()
            if job is None:
                self._work.clear()
                await self._work.wait()
                continue
            self.metrics.queue_depth.set(len(self.queue))
            peer = self._peers.get(job.conn.conn_id)
            if peer is None or job.cancel.is_set():
                continue
            follow_up = None
            try:
                follow_up = await self._run(peer, job)
            except Exception:  # a bug in one job must not stop the dispatcher for everyone
                log.exception("job %s failed", job.request_id)
                peer.send(error_frame(ErrorCode.INTERNAL, "internal error; see the daemon log", job.request_id))
            finally:
                peer.core.job_done(job)
            if follow_up is not None and not len(self.queue):
                await self._prefill_idle(*follow_up)

    async def _prefill_idle(self, text: str, adapter: str | None) -> None:
        """While nobody waits, let the backend evaluate the conversation so far (the next turn's prompt
        starts with it); it stops between chunks as soon as a request is queued."""
        prefill = getattr(self.backend, "prefill_idle", None)
        if prefill is None:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._executor, prefill, text, adapter, lambda: len(self.queue) > 0)
        except Exception:  # only a cache warm-up: the next turn evaluates its prompt anyway
            log.exception("idle prefill failed")

    async def _run(self, peer: _Peer, job: SayJob) -> tuple[str, str | None] | None:
        """Run one say job; returns what to prefill while idle (this prompt and its reply), if anything."""
        loop = asyncio.get_running_loop()
        core, backend = self.core, self.backend
        assert core is not None and backend is not None
        job.started_at = time.monotonic()
        timed_out = False

        def on_timeout() -> None:
            nonlocal timed_out
            timed_out = True
            job.cancel.set()

        timer = loop.call_later(self.config.request_timeout_s, on_timeout)
        index = 0

        def send_delta(text: str) -> None:
            nonlocal index
            peer.send(dump_frame(ReplyDelta(id=job.request_id, npc=job.npc_id, text=text, index=index)))
            index += 1

        try:
            assembler = core.assembler(job)

            def on_text(piece: str) -> bool:
                delta, keep_going = assembler.feed(piece)
                if delta and job.frame.stream:
                    loop.call_soon_threadsafe(send_delta, delta)
                return keep_going

            prompt: list[str] = []

            def generate() -> Any:
                self._ensure_adapter(job.adapter, job.request_id)
                request = core.prepare(job, backend.count_tokens, self.config.n_ctx)
                prompt.append(request.prompt)
                return backend.generate(request, on_text)

            result = await loop.run_in_executor(self._executor, generate)
            if timed_out:
                raise DaemonError(ErrorCode.TIMEOUT,
                                  f"no reply within {self.config.request_timeout_s:g} s", job.request_id)
            frame = core.finish(job, result, assembler)
        except DaemonError as exc:
            peer.send(error_frame(exc.code, exc.message, job.request_id))
            return None
        finally:
            timer.cancel()
        self.metrics.tokens.inc(result.completion_tokens)
        self.metrics.ttft.observe(result.ttft_s)
        self.metrics.latency.observe(time.monotonic() - job.enqueued_at)
        peer.send(frame)
        if result.finish_reason != "stop":
            return None  # a cut-off reply is not what the history will hold
        return prompt[0] + result.text + END_OF_REPLY, job.adapter


def _response(status: HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))),
                       ("Connection", "close")])
    return Response(status.value, status.phrase, headers, body)
