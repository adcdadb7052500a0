"""Batch admission (``scheduler.admits``, pure) and the queue the event loop and the model thread share
(``scheduler.SharedPriorityQueue``): who may join a running lockstep batch, and a request taken exactly once."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from zyke_daemon.backends import base
from zyke_daemon.scheduler import (
    ANY_ADAPTER,
    BACKGROUND,
    FOREGROUND,
    NORMAL,
    PriorityQueue,
    SharedPriorityQueue,
    admits,
)


@dataclass(frozen=True)
class Job:
    conn: int
    npc: str
    adapter: str | None


def test_nothing_running_admits_any_adapter() -> None:
    for adapter in (None, "npc-default", "guards"):
        assert admits(adapter, (1, "mira"), ANY_ADAPTER, set())


def test_a_running_batch_admits_only_its_own_adapter() -> None:
    assert admits("guards", (1, "mira"), "guards", set())
    assert not admits("npc-default", (1, "mira"), "guards", set())
    assert not admits(None, (1, "mira"), "guards", set())  # the bare model is an adapter choice of its own
    assert not admits("guards", (1, "mira"), None, set())
    assert admits(None, (1, "mira"), None, set())


def test_an_npc_with_an_unfinished_reply_in_the_batch_waits() -> None:
    active = {(1, "mira")}
    assert not admits(None, (1, "mira"), None, active)  # its prompt must include that reply
    assert not admits(None, (1, "mira"), ANY_ADAPTER, active)
    assert admits(None, (1, "bram"), None, active)  # another NPC of the same client joins
    assert admits(None, (2, "mira"), None, active)  # the same NPC name on another connection is another NPC


def test_the_backend_contract_hands_the_same_sentinel() -> None:
    assert base.ANY_ADAPTER is ANY_ADAPTER


def test_admission_through_the_queue_never_jumps_a_clients_order() -> None:
    """As the worker uses it: ``accept`` sees only each client's oldest request."""
    q: PriorityQueue[Job] = PriorityQueue()
    q.push(1, "a", Job(1, "mira", "other"))
    q.push(1, "b", Job(1, "bram", None))  # would fit, but client 1's older request does not
    q.push(2, "c", Job(2, "mira", None))
    active = {(3, "x")}

    def fits(job: Job) -> bool:
        return admits(job.adapter, (job.conn, job.npc), None, active)

    assert q.pop(fits) == Job(2, "mira", None)
    assert q.pop(fits) is None
    assert len(q) == 2


def test_the_shared_queue_behaves_as_the_priority_queue() -> None:
    plain: PriorityQueue[str] = PriorityQueue(starve_after=2)
    shared: SharedPriorityQueue[str] = SharedPriorityQueue(starve_after=2)
    for q in (plain, shared):
        q.push("a", "1", "a1", BACKGROUND)
        q.push("b", "1", "b1", FOREGROUND)
        q.push("a", "2", "a2", FOREGROUND, group="g")
        q.push("c", "1", "c1", NORMAL)
        q.push("b", "2", "b2", FOREGROUND)
    assert shared.depths() == plain.depths()
    assert shared.rank("a", "2") == plain.rank("a", "2")
    assert shared.count("a") == plain.count("a")
    assert shared.remove("c", "1") == plain.remove("c", "1") == "c1"
    order = [plain.pop_ranked() for _ in range(5)]
    assert [shared.pop_ranked() for _ in range(5)] == order
    assert len(shared) == len(plain) == 0


def test_a_request_is_taken_by_exactly_one_thread() -> None:
    """The loop removes (cancel, timeout, deadline) while the model thread pops: never both, never neither."""
    q: SharedPriorityQueue[int] = SharedPriorityQueue()
    n = 4000
    for i in range(n):
        q.push(i % 7, str(i), i, i % 3)
    popped: list[int] = []
    removed: list[int] = []
    start = threading.Event()

    def pop() -> None:
        start.wait()
        while (got := q.pop_ranked(lambda item: item % 5 != 0)) is not None:
            popped.append(got[0])

    def remove() -> None:
        start.wait()
        for i in range(n):
            item = q.remove(i % 7, str(i))
            if item is not None:
                removed.append(item)

    threads = [threading.Thread(target=pop), threading.Thread(target=remove)]
    for t in threads:
        t.start()
    start.set()
    for t in threads:
        t.join(30)
    assert sorted(popped + removed) == list(range(n))
    assert len(q) == 0 and q.depths() == [0, 0, 0]
