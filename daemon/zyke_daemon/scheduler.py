"""A fair request queue: round-robin across clients. Pure data, no asyncio.

One model context generates one reply at a time, so who goes next matters: a client that queues
eight requests must not starve a client that queued one. Each client has its own FIFO and the
scheduler takes from the clients in turn.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


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
        for client in list(self._queues):
            queue = self._queues[client]
            if queue and accept is not None and not accept(queue[0][1]):
                continue
            if queue:
                _, item = queue.popleft()
                self._queues.move_to_end(client)
                if not queue:
                    del self._queues[client]
                return item
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
