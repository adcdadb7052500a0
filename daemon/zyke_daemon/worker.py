"""The model side of the daemon: the one model thread, the backend on it, adapters, and the batch loop.

A llama.cpp context is not thread-safe, so everything that touches the model runs on one thread, the ``Worker``'s:
loading the model, loading and unloading adapters, preparing prompts, decoding, idle prefill. The event loop
(server.py) only pushes jobs into the shared queue (``scheduler.SharedPriorityQueue``) and removes the ones it
cancels, times out or drops; the model thread pops the queue itself, before every decode step while a batch runs
(``take`` and ``preempt`` of ``BatchingBackend.run_batch``), with no round trip into the event loop. What has to
happen on the loop (sending frames, a connection's job bookkeeping, timers) is posted there with
``loop.call_soon_threadsafe`` as events: a reply's deltas, its completion, a queued request dropped past its
deadline. Who joins a running batch is the scheduler's pure rule, ``scheduler.admits``.

The loop still drives one batch at a time (``_drive``): it hands the model thread a batch to run, waits for it
(one wake-up per batch, not per step), lets the finished replies settle, and asks for an idle prefill when nothing
waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeAlias, cast

from zyke.prompt_format import END_OF_REPLY
from zyke.protocol import ErrorCode, ReplyDelta, dump_frame

from . import experience
from .adapters import AdapterRegistry
from .backends.base import (
    Backend,
    BatchingBackend,
    BatchItem,
    GenerationRequest,
    GenerationResult,
    IdlePrefillBackend,
    run_batch_of_one,
)
from .completions import CompletionJob, CompletionRun
from .config import DaemonConfig
from .core import AdapterOp, ConnectionCore, DaemonCore, SayJob, error_frame, outcome_error
from .errors import DaemonError, ModelLoadError
from .metrics import Metrics
from .reply_stream import ReplyAssembler
from .scheduler import BACKGROUND, FOREGROUND, PRIORITIES, SharedPriorityQueue, admits

log = logging.getLogger(__name__)

#: A job of the model queue: an NPC's line, or an HTTP API completion (completions.py).
Job: TypeAlias = SayJob | CompletionJob
#: What a finished reply leaves to prefill while idle: its prompt and reply, and its adapter (None: nothing).
FollowUp: TypeAlias = tuple[str, str | None] | None


class Peer(Protocol):
    """The server's side of one connection (a WebSocket's, or an HTTP request's virtual one): its core and how to
    send it a frame. Only ever used on the loop thread."""

    core: ConnectionCore

    def send(self, frame: dict[str, Any]) -> None: ...


class Run(Protocol):
    """One job in the model: ``prepare`` and ``on_text`` on the model thread, ``finish`` on the loop thread."""

    def prepare(self) -> GenerationRequest: ...

    def on_text(self, piece: str) -> bool: ...

    def finish(self, outcome: GenerationResult | BaseException) -> FollowUp: ...


class _Batch:
    """The book of one batch-loop run, shared by the model thread and the loop thread.

    ``active`` holds every reply whose outcome the loop has not finished yet, by (connection, NPC): a queued line
    for that NPC may not join before its previous reply is in the NPC's history (``scheduler.admits``). The model
    thread adds to it, the loop removes from it, under ``lock``. ``running`` (model thread only) counts the replies
    handed to the backend and not yet done, for the batch-size metric."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active: dict[tuple[int, str], Run] = {}
        self.running: set[int] = set()
        self.widest = 0
        self.follow_ups: list[FollowUp] = []
        #: an exception of the batch loop itself (a bug): every reply still unfinished is answered with it
        self.error: Exception | None = None

    def unfinished(self) -> set[tuple[int, str]]:
        with self.lock:
            return set(self.active)

    def finish(self, key: tuple[int, str], run: Run, outcome: GenerationResult | BaseException) -> None:
        """Loop thread: send ``run``'s reply (or error), then let its NPC's next line join."""
        with self.lock:
            if self.active.get(key) is not run:
                return  # answered already
        try:
            self.follow_ups.append(run.finish(outcome))
        finally:
            with self.lock:
                if self.active.get(key) is run:
                    del self.active[key]


class Worker:
    """Owns the model thread and everything on it; the server hands it jobs (``submit``) and adapter operations.

    ``peers`` is the server's live map of connections (read on the model thread to skip a gone one);
    ``on_expired`` drops a queued job past its deadline with the typed ``expired`` error (loop thread)."""

    def __init__(self, config: DaemonConfig, registry: AdapterRegistry, metrics: Metrics,
                 peers: Mapping[int, Peer], on_expired: Callable[[Peer, Job], None]) -> None:
        self.config = config
        self.registry = registry
        self.metrics = metrics
        self.queue: SharedPriorityQueue[Job] = SharedPriorityQueue(config.starve_after)
        self.backend: Backend | None = None
        self.core: DaemonCore | None = None
        #: the event loop the worker posts its events to (the server's; the worker is made on it)
        self.loop = asyncio.get_running_loop()
        self._peers = peers
        self._on_expired = on_expired
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zyke-model")
        self._work = asyncio.Event()
        self._driver: asyncio.Task[None] | None = None
        #: set by ``stop``: the batch in hand takes no more jobs, so it ends with the replies it has
        self._stopping = False

    # -- lifecycle (loop thread)

    async def load(self, load: Callable[[], Backend]) -> Backend:
        """Load the model on the model thread."""
        self.backend = await self.loop.run_in_executor(self._executor, load)
        return self.backend

    def start(self, core: DaemonCore) -> None:
        """Start taking jobs, once the model is loaded and ``core`` built for it."""
        backend = self.backend
        assert backend is not None
        if backend.supports_batching:  # how its batch treats priorities (docs/SCHEDULING.md)
            batching = cast(BatchingBackend, backend)
            batching.foreground_solo_tokens = self.config.foreground_solo_tokens
            batching.starve_after = self.config.starve_after
            batching.background_tokens_per_s = self.config.background_tokens_per_s
        self.core = core
        self._driver = asyncio.create_task(self._drive(), name="zyke-dispatch")

    async def stop(self) -> None:
        """Stop taking jobs, wait for the model thread's work in hand, and close the backend."""
        self._stopping = True
        if self._driver is not None:
            self._driver.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._driver
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self.backend is not None:
            self.backend.close()

    # -- from the loop thread

    def submit(self, client: int, job: Job) -> int:
        """Queue ``job`` for ``client`` (a connection id); returns the rank it waits at (``PriorityQueue.push``)."""
        with self.queue.lock:  # the model thread may pop it at once: its rank is noted before that can happen
            job.queued_rank = self.queue.push(client, job.request_id, job, job.rank, group=job.npc_id)
        self._work.set()
        return job.queued_rank

    async def adapter_op(self, op: AdapterOp) -> None:
        """``adapter.load`` or ``adapter.unload`` on the model thread; raises the DaemonError to answer with."""
        def run() -> None:
            if op.op == "load":
                self.ensure_adapter(op.name, op.request_id)
            elif self.backend is not None:
                self.backend.unload_adapter(op.name)

        await self.loop.run_in_executor(self._executor, run)

    # -- the model thread

    def ensure_adapter(self, name: str | None, request_id: str | None) -> None:
        """Model thread: load a registered adapter on first use (checked against this base and its hashes)."""
        backend = self.backend
        if name is None or backend is None or name in backend.loaded_adapters:
            return
        path = self.registry.resolve(name, backend.fingerprint, backend.adapter_kind, request_id)
        try:
            backend.load_adapter(name, path)
        except ModelLoadError as exc:
            raise DaemonError(ErrorCode.ADAPTER_REJECTED, str(exc), request_id) from exc

    def _runnable(self, job: Job) -> bool:
        """Whether the model thread may take ``job`` off the queue: not one the loop is about to remove and answer
        itself (cancelled, timed out, its connection gone). Checked under the queue's lock, so exactly one side
        takes it; a job cancelled after the model thread took it is answered by its run."""
        return not job.cancel.is_set() and job.conn.conn_id in self._peers

    def _popped(self, job: Job, rank: int) -> Peer | None:
        """Model thread: bookkeeping for a job taken off the queue; its peer when it should run (None: its
        connection is gone, or it is past its deadline and dropped with ``expired`` on the loop)."""
        job.queued_rank = rank
        peer = self._peers.get(job.conn.conn_id)
        if peer is None:
            return None
        if job.deadline_at is not None and time.monotonic() >= job.deadline_at:
            self.loop.call_soon_threadsafe(self._expired, peer, job)  # its timer has not fired yet
            return None
        self.metrics.queue_wait.labels(PRIORITIES[job.rank]).observe(time.monotonic() - job.enqueued_at)
        return peer

    def _expired(self, peer: Peer, job: Job) -> None:
        """Loop thread: drop a job the model thread found past its deadline, unless nobody waits for it any more
        (its connection closed)."""
        if peer.core.pending.get(job.request_id) is job:
            self._on_expired(peer, job)

    def _job_run(self, peer: Peer, job: Job) -> Run:
        """The run of a queued job: an NPC line's, or an HTTP API completion's (completions.py)."""
        if isinstance(job, CompletionJob):
            return CompletionRun(self, peer, job)
        return JobRun(self, peer, job)

    def _run_next(self) -> _Batch | None:
        """Model thread: pop the next job and run the batch it starts; None when nothing is waiting."""
        while (popped := self.queue.pop_ranked(self._runnable)) is not None:
            job, rank = popped
            self.metrics.queue_depth.set(len(self.queue))
            peer = self._popped(job, rank)
            if peer is not None:
                return self._run_batch(peer, job)
        return None

    def _run_batch(self, peer: Peer, job: Job) -> _Batch:
        """Model thread: run ``job`` and every request that can join it in one lockstep batch (a backend that
        ``supports_batching``); on any other backend ``job`` is a batch of one (``run_batch_of_one``).

        A request joins when it is the oldest of its client's queue and ``scheduler.admits`` it: it uses the
        batch's adapter, and its NPC has no unfinished reply in the batch (its prompt must include that reply)."""
        loop = self.loop
        batch = _Batch()

        def item(peer: Peer, job: Job) -> BatchItem:
            run = self._job_run(peer, job)
            key = (job.conn.conn_id, job.npc_id)
            with batch.lock:
                batch.active[key] = run
            batch.running.add(id(run))
            batch.widest = max(batch.widest, len(batch.running))

            def done(outcome: GenerationResult | BaseException) -> None:  # model thread
                batch.running.discard(id(run))
                loop.call_soon_threadsafe(batch.finish, key, run, outcome)

            return BatchItem(run.prepare, run.on_text, done,
                             priority=job.queued_rank if job.queued_rank is not None else job.rank)

        first = [item(peer, job)]

        def more(n: int, adapter: object, max_rank: int = BACKGROUND) -> list[BatchItem]:
            wanted = adapter  # ANY_ADAPTER until the first request taken here sets it
            unfinished = batch.unfinished()

            def fits(job: Job) -> bool:
                return self._runnable(job) and admits(job.adapter, (job.conn.conn_id, job.npc_id), wanted, unfinished)

            out: list[BatchItem] = []
            while len(out) < n and (popped := self.queue.pop_ranked(fits, max_rank)) is not None:
                job, rank = popped
                joiner = self._popped(job, rank)
                if joiner is not None:
                    wanted = job.adapter
                    out.append(item(joiner, job))
                    unfinished.add((job.conn.conn_id, job.npc_id))
            self.metrics.queue_depth.set(len(self.queue))
            return out

        def take(n: int, adapter: object) -> list[BatchItem]:  # before every step
            if first:
                return [first.pop()]
            if self._stopping or not len(self.queue):
                return []
            return more(n, adapter)

        def urgent() -> bool:  # a foreground line waits: newcomers not yet prefilled let it go first
            return not self._stopping and self.queue.waiting(FOREGROUND) > 0

        def preempt(n: int, adapter: object) -> list[BatchItem]:  # before every step, even with the batch full
            return more(n, adapter, FOREGROUND) if urgent() else []

        backend = self.backend
        assert backend is not None
        batching = backend.supports_batching
        preempted = backend.preemptions
        try:
            if batching:
                cast(BatchingBackend, backend).run_batch(take, preempt=preempt, urgent=urgent)
            else:
                run_batch_of_one(backend, take)
        except Exception as exc:  # a bug in the batch loop itself: the loop answers what is left (_settle)
            log.exception("batch failed")
            batch.error = exc
        if batching:  # a batch of one is no lockstep batch: the metric stays the batching backend's
            self.metrics.batch_size.observe(batch.widest)
            self.metrics.preemptions.inc(backend.preemptions - preempted)
        return batch

    def _prefill_idle(self, text: str, adapter: str | None) -> None:
        """Model thread: while nobody waits, let the backend evaluate the conversation so far (the next turn's
        prompt starts with it); it stops between chunks as soon as a request is queued."""
        backend = self.backend
        if backend is None or not backend.supports_idle_prefill:
            return
        try:
            cast(IdlePrefillBackend, backend).prefill_idle(text, adapter, lambda: len(self.queue) > 0)
        except Exception:  # only a cache warm-up: the next turn evaluates its prompt anyway
            log.exception("idle prefill failed")

    # -- the driver (loop thread)

    async def _drive(self) -> None:
        """Hand the model thread one batch at a time; after each, prefill what the finished replies leave while
        the queue stays empty."""
        loop = self.loop
        while True:
            self._work.clear()  # a job pushed from now on sets it again
            batch = await loop.run_in_executor(self._executor, self._run_next)
            if batch is None:
                await self._work.wait()
                continue
            for follow_up in await self._settle(batch):
                if follow_up is not None and not len(self.queue):
                    await loop.run_in_executor(self._executor, self._prefill_idle, *follow_up)

    async def _settle(self, batch: _Batch) -> list[FollowUp]:
        """Once the batch loop returned: let its last replies' completions (posted before it returned) run, and
        answer every reply still without an outcome with the batch loop's own error, if it failed."""
        await asyncio.sleep(0)
        if batch.error is not None:
            with batch.lock:
                left = list(batch.active.items())
            for key, run in left:
                batch.finish(key, run, batch.error)
        return batch.follow_ups


class JobRun:
    """One say job in the model: its timeout, its streamed deltas, and the frame that ends it."""

    def __init__(self, worker: Worker, peer: Peer, job: SayJob) -> None:
        self.worker, self.peer, self.job = worker, peer, job
        self.loop = worker.loop
        job.started_at = time.monotonic()
        self.index = 0
        self.assembler: ReplyAssembler | None = None
        self.prompt = ""

    def prepare(self) -> GenerationRequest:
        """The generation request (model thread: it may load the job's adapter)."""
        core, backend = self.worker.core, self.worker.backend
        assert core is not None and backend is not None
        self.assembler = core.assembler(self.job)
        self.worker.ensure_adapter(self.job.adapter, self.job.request_id)
        request = core.prepare(self.job, backend.count_tokens, self.worker.config.n_ctx)
        self.prompt = request.prompt
        return request

    def on_text(self, piece: str) -> bool:
        """Model thread: feed the assembler; a say delta, when the client streams, is posted to the loop."""
        assert self.assembler is not None
        delta, keep_going = self.assembler.feed(piece)
        if delta and self.job.frame.stream:
            self.loop.call_soon_threadsafe(self._send_delta, delta)
        return keep_going

    def _send_delta(self, text: str) -> None:
        job = self.job
        self.peer.send(dump_frame(ReplyDelta(id=job.request_id, npc=job.npc_id, text=text, index=self.index)))
        self.index += 1

    def finish(self, outcome: GenerationResult | BaseException) -> FollowUp:
        """Send the reply (or the error) for ``outcome``, a GenerationResult or an exception; returns what
        to prefill while idle (this prompt and its reply), if anything. Loop thread."""
        job, peer, core, metrics = self.job, self.peer, self.worker.core, self.worker.metrics
        assert core is not None
        if job.timer is not None:
            job.timer.cancel()
        try:
            error = outcome_error(outcome, job.request_id, job.timed_out, self.worker.config.request_timeout_s)
            if error is not None:
                raise error
            result = cast(GenerationResult, outcome)
            frame = core.finish(job, result, cast(ReplyAssembler, self.assembler))
        except DaemonError as exc:
            peer.send(error_frame(exc.code, exc.message, job.request_id))
            return None
        finally:
            peer.core.job_done(job)
        metrics.tokens.inc(result.completion_tokens)
        metrics.ttft.observe(result.ttft_s)
        metrics.latency.observe(time.monotonic() - job.enqueued_at)
        metrics.count_safety(job.safety)
        peer.send(frame)
        experience.record_reply(core, job)  # queued for the recorder's thread when the daemon and the NPC record
        if result.finish_reason != "stop":
            return None  # a cut-off reply is not what the history will hold
        return self.prompt + result.text + END_OF_REPLY, job.adapter
