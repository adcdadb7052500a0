"""The worker (worker.py) with a fake batching backend: the model thread pops the queue itself, so a batch takes new
work while the event loop is busy (it used to wait for a round trip into the loop before every step), and the
outcomes come back to the loop as events."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from zyke_daemon.backends.base import ANY_ADAPTER, BatchItem, TakeItems
from zyke_daemon.config import DaemonConfig
from zyke_daemon.metrics import Metrics
from zyke_daemon.scheduler import NORMAL
from zyke_daemon.worker import Worker


@dataclass
class Conn:
    conn_id: int


@dataclass(eq=False)
class Job:
    """The fields of a ``SayJob`` the queue and the worker read."""

    request_id: str
    conn: Conn
    npc_id: str
    adapter: str | None = None
    rank: int = NORMAL
    enqueued_at: float = field(default_factory=time.monotonic)
    deadline_at: float | None = None
    queued_rank: int | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    started_at: float | None = None
    timed_out: bool = False
    timer: Any = None


class PeerCore:
    def __init__(self) -> None:
        self.pending: dict[str, Job] = {}

    def job_done(self, job: Job) -> None:
        self.pending.pop(job.request_id, None)


class Peer:
    def __init__(self) -> None:
        self.core = PeerCore()
        self.frames: list[dict[str, Any]] = []
        self.threads: list[str] = []

    def send(self, frame: dict[str, Any]) -> None:
        self.frames.append(frame)
        self.threads.append(threading.current_thread().name)


class Backend:
    """Takes the first reply, waits for the test to queue more and block the event loop, takes again, and fails
    every reply it took (a failed reply is answered with an error frame, which is all this test needs)."""

    supports_batching: ClassVar[bool] = True
    supports_idle_prefill: ClassVar[bool] = False
    preemptions = 0

    def __init__(self) -> None:
        self.took_first = threading.Event()
        self.queued = threading.Event()
        self.took_second = threading.Event()
        self.second: list[BatchItem] = []

    def run_batch(self, take: TakeItems, max_batch: int = 4, preempt: TakeItems | None = None,
                  urgent: Callable[[], bool] | None = None) -> None:
        first = take(max_batch, ANY_ADAPTER)
        self.took_first.set()
        assert self.queued.wait(30)
        self.second = take(max_batch, ANY_ADAPTER)
        self.took_second.set()
        for item in first + self.second:
            item.done(RuntimeError("the fake backend fails every reply"))

    def close(self) -> None:
        pass


def test_the_model_thread_takes_queued_work_while_the_loop_is_blocked() -> None:
    async def main() -> None:
        peers = {1: Peer(), 2: Peer(), 3: Peer()}
        expired: list[Job] = []
        metrics = Metrics()
        worker = Worker(DaemonConfig(), None, metrics, peers, lambda _peer, job: expired.append(job))  # type: ignore
        backend = Backend()
        worker.backend = backend  # type: ignore[assignment]

        def submit(client: int, job: Job) -> None:
            peers[client].core.pending[job.request_id] = job
            worker.submit(client, job)  # type: ignore[arg-type]

        first = Job("a", Conn(1), "mira")
        submit(1, first)
        worker.start(object())  # type: ignore[arg-type]  # the core is not reached: every reply fails
        assert await asyncio.to_thread(backend.took_first.wait, 30)

        joins = Job("b", Conn(1), "bram")
        cancelled = Job("c", Conn(2), "mira")
        cancelled.cancel.set()  # the loop removes and answers it itself: the model thread leaves it
        late = Job("d", Conn(3), "mira", deadline_at=time.monotonic() - 1)
        for client, job in ((1, joins), (2, cancelled), (3, late)):
            submit(client, job)
        backend.queued.set()
        # block the event loop: the model thread must take the new work without it
        assert backend.took_second.wait(30)
        assert [item.priority for item in backend.second] == [NORMAL]
        assert worker.queue.rank(2, "c") is not None  # still queued, for the loop to remove

        async with asyncio.timeout(30):
            while len(peers[1].frames) < 2 or not expired:
                await asyncio.sleep(0.01)
        assert [f["id"] for f in peers[1].frames] == ["a", "b"]
        assert all(f["type"] == "error" and f["code"] == "internal" for f in peers[1].frames)
        assert set(peers[1].threads) == {threading.current_thread().name}  # sent on the loop thread
        assert expired == [late]  # posted to the loop, which drops it with ``expired``
        assert first.started_at is not None and joins.started_at is not None and late.started_at is None
        assert "zyke_batch_replies_sum 2.0" in metrics.render().decode()  # both replies were in the batch at once
        await worker.stop()

    asyncio.run(main())


class BrokenBackend(Backend):
    """A bug in the batch loop itself: it takes a reply and raises without an outcome for it."""

    def run_batch(self, take: TakeItems, max_batch: int = 4, preempt: TakeItems | None = None,
                  urgent: Callable[[], bool] | None = None) -> None:
        take(max_batch, ANY_ADAPTER)
        raise RuntimeError("a bug in the batch loop")


def test_a_batch_loop_bug_answers_every_unfinished_reply() -> None:
    async def main() -> None:
        peers = {1: Peer()}
        worker = Worker(DaemonConfig(), None, Metrics(), peers, lambda _peer, _job: None)  # type: ignore
        worker.backend = BrokenBackend()  # type: ignore[assignment]
        job = Job("a", Conn(1), "mira")
        peers[1].core.pending["a"] = job
        worker.submit(1, job)  # type: ignore[arg-type]
        worker.start(object())  # type: ignore[arg-type]
        async with asyncio.timeout(30):
            while not peers[1].frames:
                await asyncio.sleep(0.01)
        assert [(f["id"], f["code"]) for f in peers[1].frames] == [("a", "internal")]
        assert not peers[1].core.pending
        await worker.stop()

    asyncio.run(main())
