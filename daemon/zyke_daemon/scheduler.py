"""A fair request queue: round-robin across clients, by priority, and who may join a running batch. Pure data, no
asyncio.

One model context generates one reply at a time, so who goes next matters: a client that queues
eight requests must not starve a client that queued one. Each client has its own FIFO and the
scheduler takes from the clients in turn. On top of that, ``PriorityQueue`` keeps one such queue per
priority (foreground, normal, background): the NPC the player is talking to goes before ambient
chatter, and ageing (``level_order``) keeps the chatter from waiting forever (docs/SCHEDULING.md).
``admits`` is the rule for a request joining a lockstep batch that already runs, and ``SharedPriorityQueue`` the
one queue the event loop fills and the model thread pops (worker.py), under one lock.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Container, Hashable, Sequence
from typing import Final, Generic, TypeVar

T = TypeVar("T")

#: The adapter of a batch that nothing runs in yet: any adapter may start it (``admits``; a batching backend's
#: ``take(n, adapter)`` is handed it, ``backends.base`` re-exports it).
ANY_ADAPTER: Final = object()


def admits(job_adapter: str | None, job_key: Hashable, batch_adapter: object,
           active_keys: Container[Hashable]) -> bool:
    """Whether a queued request may join a running lockstep batch (pure; the batch admission rule).

    It joins when it uses the batch's adapter (a batch cannot mix adapters; ``ANY_ADAPTER``: nothing runs yet, so
    any adapter may start it) and its NPC (``job_key``, the client and the NPC) has no reply in the batch that is
    not finished yet: its prompt must include that reply. That only a client's oldest request is considered (a
    client's own order is never jumped) is the queue's part (``FairQueue.pop`` with ``accept``)."""
    return (batch_adapter is ANY_ADAPTER or job_adapter == batch_adapter) and job_key not in active_keys


class FairQueue(Generic[T]):
    """Per-client FIFOs served in turn; the per-client cap is enforced by the connection core."""

    def __init__(self) -> None:
        self._queues: OrderedDict[Hashable, deque[tuple[str, T]]] = OrderedDict()

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def count(self, client: Hashable) -> int:
        return len(self._queues.get(client, ()))

    def push(self, client: Hashable, key: str, item: T) -> None:
        self._queues.setdefault(client, deque()).append((key, item))

    def pop(self, accept: Callable[[T], bool] | None = None) -> T | None:
        """The next item, taking from the client that has waited longest since it was last served.

        With ``accept``, only a client's oldest item is considered and only if ``accept`` takes it (a
        client's own order is never jumped): how a running batch picks requests that can join it."""
        entry = self.pop_entry(accept)
        return entry[2] if entry else None

    def pop_entry(self, accept: Callable[[T], bool] | None = None) -> tuple[Hashable, str, T] | None:
        """Like ``pop``, with the client and key the item was pushed with."""
        for client in list(self._queues):
            queue = self._queues[client]
            if queue and accept is not None and not accept(queue[0][1]):
                continue
            if queue:
                key, item = queue.popleft()
                self._queues.move_to_end(client)
                if not queue:
                    del self._queues[client]
                return client, key, item
            del self._queues[client]
        return None

    def remove(self, client: Hashable, key: str) -> T | None:
        queue = self._queues.get(client)
        if not queue:
            return None
        for i, (k, item) in enumerate(queue):
            if k == key:
                del queue[i]
                return item
        return None

    def drain(self, client: Hashable) -> list[T]:
        return [item for _, item in self._queues.pop(client, ())]


# --- priorities -----------------------------------------------------------------------------------

#: The protocol's priorities (``Priority`` in schemas/common.json), most urgent first; a rank is an index here.
PRIORITIES: tuple[str, ...] = ("foreground", "normal", "background")
FOREGROUND, NORMAL, BACKGROUND = 0, 1, 2


def rank_of(priority: str | None) -> int:
    """The rank of a protocol priority (None: normal); lower ranks are served first."""
    return NORMAL if priority is None else PRIORITIES.index(priority)


def level_order(waiting: Sequence[int], passed: Sequence[int], starve_after: int) -> list[int]:
    """The order in which to look at the priority levels for the next admission (pure; the admission rule).

    ``waiting[r]`` is how many requests of rank ``r`` wait, ``passed[r]`` how many admissions of more urgent
    ranks that level has waited through since it was last served. Levels are tried most urgent first, except
    that a level passed over ``starve_after`` times or more goes first (the most urgent such level first):
    a steady stream of foreground lines then still lets one background line through every ``starve_after``
    admissions, so no line waits forever. Empty levels are left out. ``starve_after`` 0 turns ageing off."""
    ready = [r for r in range(len(waiting)) if waiting[r] > 0]
    if starve_after <= 0:
        return ready
    starved = [r for r in ready if passed[r] >= starve_after]
    return starved + [r for r in ready if r not in starved]


def after_admission(waiting: Sequence[int], passed: Sequence[int], served: int) -> list[int]:
    """``passed`` once a request of rank ``served`` was admitted: that level starts over, every less urgent
    level that still has requests waiting has been passed over once more (pure)."""
    return [0 if r == served else p + 1 if r > served and waiting[r] > 0 else p
            for r, p in enumerate(passed)]


class PriorityQueue(Generic[T]):
    """One ``FairQueue`` per priority: the most urgent level first, fair between clients within a level,
    with ageing (``level_order``) so that lower levels are never starved.

    A request for an NPC never overtakes an earlier one for the same NPC of the same client (its prompt must
    hold that earlier reply): pushing it with ``group`` lifts the earlier ones to its level (priority
    inheritance) instead."""

    def __init__(self, starve_after: int = 4) -> None:
        self.starve_after = starve_after
        self._levels: list[FairQueue[T]] = [FairQueue() for _ in PRIORITIES]
        self._passed = [0] * len(PRIORITIES)
        #: requests waiting per rank, kept as plain ints so another thread may read them (``waiting``)
        self._counts = [0] * len(PRIORITIES)
        self._where: dict[tuple[Hashable, str], tuple[int, Hashable | None, int]] = {}
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._where)

    def depths(self) -> list[int]:
        """How many requests wait at each rank."""
        return list(self._counts)

    def waiting(self, rank: int) -> int:
        """How many requests wait at ``rank``; cheap and safe to call from the model thread."""
        return self._counts[rank]

    def count(self, client: Hashable) -> int:
        return sum(level.count(client) for level in self._levels)

    def rank(self, client: Hashable, key: str) -> int | None:
        """The rank a queued request waits at (raised by inheritance, maybe), or None when not queued."""
        where = self._where.get((client, key))
        return where[0] if where else None

    def push(self, client: Hashable, key: str, item: T, rank: int = NORMAL, group: Hashable | None = None) -> int:
        """Queue ``item``; returns the rank it waits at (more urgent than ``rank`` when an earlier request of its
        ``group`` waits at a more urgent one: ageing must not let it overtake that one)."""
        if group is not None:
            rank = min([rank, *(r for (c, _k), (r, g, _s) in self._where.items() if c == client and g == group)])
            lifted = sorted((seq, k) for (c, k), (r, g, seq) in self._where.items()
                            if c == client and g == group and r > rank)
            for seq, k in lifted:
                old = self._where[(client, k)][0]
                moved = self._levels[old].remove(client, k)
                assert moved is not None
                self._levels[rank].push(client, k, moved)
                self._where[(client, k)] = (rank, group, seq)
                self._counts[old] -= 1
                self._counts[rank] += 1
        self._levels[rank].push(client, key, item)
        self._where[(client, key)] = (rank, group, next(self._seq))
        self._counts[rank] += 1
        return rank

    def pop(self, accept: Callable[[T], bool] | None = None, max_rank: int = BACKGROUND) -> T | None:
        popped = self.pop_ranked(accept, max_rank)
        return popped[0] if popped else None

    def pop_ranked(self, accept: Callable[[T], bool] | None = None,
                   max_rank: int = BACKGROUND) -> tuple[T, int] | None:
        """The next item and the rank it is served at (its level's, or FOREGROUND when ageing served it ahead
        of more urgent work), looking only at ranks up to ``max_rank`` (``accept`` as in ``FairQueue.pop``).
        A level that ageing puts first wins over ``max_rank``: while it is due, asking for foreground only
        (the batch's pre-emption) gets nothing, so the next free seat goes to that level."""
        waiting = self.depths()
        order = level_order(waiting, self._passed, self.starve_after)
        if order and order[0] > max_rank:
            return None
        for r in order:
            if r > max_rank:
                continue
            entry = self._levels[r].pop_entry(accept)
            if entry is None:
                continue
            client, key, item = entry
            del self._where[(client, key)]
            self._counts[r] -= 1
            # served by ageing ahead of more urgent work: it runs as foreground from here (the batch neither
            # pauses it nor makes it sit out), so its wait stays bounded by starve_after admissions
            promoted = self._passed[r] >= self.starve_after > 0 and any(waiting[:r])
            self._passed = after_admission(waiting, self._passed, r)
            return item, FOREGROUND if promoted else r
        return None

    def remove(self, client: Hashable, key: str) -> T | None:
        where = self._where.pop((client, key), None)
        if where is None:
            return None
        self._counts[where[0]] -= 1
        return self._levels[where[0]].remove(client, key)

    def drain(self, client: Hashable) -> list[T]:
        for c, k in [ck for ck in self._where if ck[0] == client]:
            self._counts[self._where.pop((c, k))[0]] -= 1
        return [item for level in self._levels for item in level.drain(client)]


class SharedPriorityQueue(PriorityQueue[T]):
    """A ``PriorityQueue`` two threads share: the event loop pushes, removes and drains, the model thread pops
    (worker.py). Each call holds ``lock`` (an ``accept`` callback runs under it), so a request is taken by exactly
    one of them: a pop and a removal never both get it. Same behaviour as ``PriorityQueue`` otherwise."""

    def __init__(self, starve_after: int = 4) -> None:
        super().__init__(starve_after)
        #: held by every call; re-entrant, so a caller may hold it across several (push, then note the rank)
        self.lock = threading.RLock()

    def __len__(self) -> int:
        with self.lock:
            return super().__len__()

    def depths(self) -> list[int]:
        with self.lock:
            return super().depths()

    def count(self, client: Hashable) -> int:
        with self.lock:
            return super().count(client)

    def rank(self, client: Hashable, key: str) -> int | None:
        with self.lock:
            return super().rank(client, key)

    def push(self, client: Hashable, key: str, item: T, rank: int = NORMAL, group: Hashable | None = None) -> int:
        with self.lock:
            return super().push(client, key, item, rank, group)

    def pop_ranked(self, accept: Callable[[T], bool] | None = None,
                   max_rank: int = BACKGROUND) -> tuple[T, int] | None:
        with self.lock:
            return super().pop_ranked(accept, max_rank)

    def remove(self, client: Hashable, key: str) -> T | None:
        with self.lock:
            return super().remove(client, key)

    def drain(self, client: Hashable) -> list[T]:
        with self.lock:
            return super().drain(client)
