"""The asyncio shell around the sans-I/O core: WebSockets, HTTP health/metrics, and the model thread.

Everything that decides anything lives in core.py. This module moves bytes: it feeds messages to a
ConnectionCore, sends the frames it returns through one ordered outbox per connection, and runs
generation on a single model thread (a llama.cpp context is not thread-safe), taking jobs from a
FairQueue so clients are served in turn. Jobs that share an adapter run together as one batch (the
backend decodes them in lockstep); a job arriving while a batch runs joins it at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
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
from zyke.protocol import AdapterInfo, Adapters, ErrorCode, ReplyDelta, dump_frame

from . import __version__
from .adapters import AdapterRegistry
from .backends.base import Backend, GenerationResult
from .backends.decoding import BatchItem, run_serially
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
        """Take the next job fairly and run it in a batch that compatible jobs may join while it runs."""
        while True:
            job = self.queue.pop()
            if job is None:
                self._work.clear()
                await self._work.wait()
                continue
            self.metrics.queue_depth.set(len(self.queue))
            peer = self._peers.get(job.conn.conn_id)
            if peer is None or job.cancel.is_set():
                if peer is not None:
                    peer.core.job_done(job)
                continue
            batch = _Batch(self, job.adapter)
            batch.admit(peer, job)
            await batch.run()


class _JobRun:
    """One admitted job: its connection, streaming state and timeout (loop thread only, but on_text)."""

    def __init__(self, server: DaemonServer, peer: _Peer, job: SayJob) -> None:
        loop = asyncio.get_running_loop()
        self.server, self.peer, self.job = server, peer, job
        assert server.core is not None
        self.assembler = server.core.assembler(job)
        self.timed_out = False
        self.index = 0
        job.started_at = time.monotonic()
        self.timer = loop.call_later(server.config.request_timeout_s, self._on_timeout)
        self._loop = loop

    def _on_timeout(self) -> None:
        self.timed_out = True
        self.job.cancel.set()

    def on_text(self, piece: str) -> bool:
        """Model thread: feed the assembler, stream the new part of the spoken line."""
        delta, keep_going = self.assembler.feed(piece)
        if delta and self.job.frame.stream:
            self._loop.call_soon_threadsafe(self._send_delta, delta)
        return keep_going

    def _send_delta(self, text: str) -> None:
        job = self.job
        self.peer.send(dump_frame(ReplyDelta(id=job.request_id, npc=job.npc_id, text=text, index=self.index)))
        self.index += 1

    def finish(self, outcome: GenerationResult | BaseException) -> None:
        """Loop thread: the reply frame, or this job's own error frame."""
        self.timer.cancel()
        job, peer, server = self.job, self.peer, self.server
        try:
            if isinstance(outcome, DaemonError):
                raise outcome
            if isinstance(outcome, BaseException):
                log.error("job %s failed", job.request_id, exc_info=outcome)
                peer.send(error_frame(ErrorCode.INTERNAL, "internal error; see the daemon log", job.request_id))
                return
            if self.timed_out:
                raise DaemonError(ErrorCode.TIMEOUT,
                                  f"no reply within {server.config.request_timeout_s:g} s", job.request_id)
            assert server.core is not None
            frame = server.core.finish(job, outcome, self.assembler)
        except DaemonError as exc:
            peer.send(error_frame(exc.code, exc.message, job.request_id))
            return
        except Exception:  # a bug in one job must not stop the others
            log.exception("job %s failed", job.request_id)
            peer.send(error_frame(ErrorCode.INTERNAL, "internal error; see the daemon log", job.request_id))
            return
        finally:
            peer.core.job_done(job)
        server.metrics.tokens.inc(outcome.completion_tokens)
        server.metrics.ttft.observe(outcome.ttft_s)
        server.metrics.latency.observe(time.monotonic() - job.enqueued_at)
        peer.send(frame)


class _Batch:
    """Jobs decoded together on the model thread: one adapter, at most the backend's ``max_batch``.

    The loop thread admits jobs (the first, then any compatible job that is next in fair order while
    there is room); the model thread takes them at step boundaries through ``take``, builds their
    prompts (``DaemonCore.prepare``, on the model thread as before, so a queued line sees the reply
    before it) and hands each outcome back to the loop as soon as that job is done. Backends without
    ``run_batch`` (transformers) run the same contract one job at a time.
    """

    def __init__(self, server: DaemonServer, adapter: str | None) -> None:
        self.server = server
        self.adapter = adapter
        backend = server.backend
        self.capacity = max(1, int(getattr(backend, "max_batch", 1))) if hasattr(backend, "run_batch") else 1
        self._lock = threading.Lock()
        self._incoming: list[_JobRun] = []
        self._live: dict[str, _JobRun] = {}  # admitted and not finished, by request id
        self._loop = asyncio.get_running_loop()

    def admit(self, peer: _Peer, job: SayJob) -> None:
        run = _JobRun(self.server, peer, job)
        self._live[job.request_id] = run
        with self._lock:
            self._incoming.append(run)

    def fill(self) -> None:
        """Loop thread: admit the next queued jobs while they fit (see FairQueue.pop_if)."""
        server = self.server
        while len(self._live) < self.capacity:
            job = server.queue.pop_if(self._compatible)
            if job is None:
                return
            server.metrics.queue_depth.set(len(server.queue))
            peer = server._peers.get(job.conn.conn_id)
            if peer is None or job.cancel.is_set():
                if peer is not None:
                    peer.core.job_done(job)
                continue
            self.admit(peer, job)

    def _compatible(self, job: SayJob) -> bool:
        npc = (job.conn.game, job.npc_id)
        return job.adapter == self.adapter and all(
            (r.job.conn.game, r.job.npc_id) != npc for r in self._live.values())

    async def run(self) -> None:
        server = self.server
        backend = server.backend
        assert backend is not None
        self.fill()
        watcher = asyncio.create_task(self._watch_queue())
        try:
            while True:
                with self._lock:
                    if not self._incoming:
                        break
                batch_run = getattr(backend, "run_batch", None)
                if batch_run is not None:
                    await self._loop.run_in_executor(server._executor, batch_run, self._take)
                else:
                    await self._loop.run_in_executor(server._executor, run_serially, backend.generate, self._take)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _watch_queue(self) -> None:
        """While the batch runs, new jobs that fit join it at the next step."""
        while True:
            await self.server._work.wait()
            self.server._work.clear()
            self.fill()  # the dispatcher pops the queue itself once this batch ends: no signal is lost

    def _take(self, n: int) -> list[BatchItem]:
        """Model thread: up to ``n`` admitted jobs, prepared."""
        server = self.server
        core, backend = server.core, server.backend
        assert core is not None and backend is not None
        with self._lock:
            runs, self._incoming = self._incoming[:n], self._incoming[n:]
        items: list[BatchItem] = []
        for run in runs:
            try:
                server._ensure_adapter(run.job.adapter, run.job.request_id)
                request = core.prepare(run.job, backend.count_tokens, server.config.n_ctx)
            except Exception as exc:
                self._done(run, exc)
                continue
            items.append(BatchItem(request, run.on_text, lambda outcome, run=run: self._done(run, outcome)))
        return items

    def _done(self, run: _JobRun, outcome: GenerationResult | BaseException) -> None:
        """Model thread: hand the outcome to the loop at once (a short reply is not held by a long one)."""
        self._loop.call_soon_threadsafe(self._finished, run, outcome)

    def _finished(self, run: _JobRun, outcome: GenerationResult | BaseException) -> None:
        self._live.pop(run.job.request_id, None)
        run.finish(outcome)
        self.fill()


def _response(status: HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))),
                       ("Connection", "close")])
    return Response(status.value, status.phrase, headers, body)
