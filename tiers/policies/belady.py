"""Belady's offline optimum (MIN): evict the block whose next use lies furthest in the future.

Only the trace simulator can drive it: it needs a :class:`FutureOracle` built from the whole
trace. It is the yardstick for the online policies, not a policy to serve with. With a
``capacity`` it also refuses to admit a block that would be the first to go (bypass), which is
what the optimum does when a block's next use is further away than everything cached.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable

from tiers.policy import Access

NEVER = math.inf


class FutureOracle:
    """Next-use positions of every access of a trace, advanced one access at a time."""

    def __init__(self, accesses: Iterable[str]) -> None:
        seq = list(accesses)
        upcoming: dict[str, float] = {}
        nxt: list[float] = [NEVER] * len(seq)
        for pos in range(len(seq) - 1, -1, -1):
            key = seq[pos]
            nxt[pos] = upcoming.get(key, NEVER)
            upcoming[key] = pos
        self._seq = seq
        self._next = nxt
        self._upcoming = upcoming
        self._cursor = 0

    @property
    def cursor(self) -> int:
        return self._cursor

    def advance(self, key: str) -> None:
        """The access at the cursor happened; it must be ``key``."""
        pos = self._cursor
        if pos >= len(self._seq) or self._seq[pos] != key:
            raise ValueError(f"oracle out of step at access {pos}: got {key!r}")
        self._upcoming[key] = self._next[pos]
        self._cursor = pos + 1

    def next_use(self, key: str) -> float:
        """Position of the next access of ``key`` after the cursor; ``inf`` when never."""
        return self._upcoming.get(key, NEVER)


class BeladyPolicy:
    name = "belady"

    def __init__(self, oracle: FutureOracle, *, capacity: int | None = None) -> None:
        self._oracle = oracle
        self._capacity = capacity
        self._next: dict[str, float] = {}
        # Max-heap by next use via negation, with lazy deletion: stale entries are skipped.
        self._heap: list[tuple[float, str]] = []

    def _touch(self, key: str) -> None:
        nu = self._oracle.next_use(key)
        self._next[key] = nu
        heapq.heappush(self._heap, (-nu, key))
        if len(self._heap) > 4 * len(self._next) + 64:
            self._heap = [(-v, k) for k, v in self._next.items()]
            heapq.heapify(self._heap)

    def _top(self) -> tuple[float, str] | None:
        heap = self._heap
        while heap:
            neg, key = heap[0]
            if self._next.get(key) == -neg:
                return heap[0]
            heapq.heappop(heap)
        return None

    def admit(self, access: Access) -> bool:
        if self._capacity is None or len(self._next) < self._capacity:
            return True
        top = self._top()
        return top is None or self._oracle.next_use(access.key) < -top[0]

    def on_insert(self, access: Access) -> None:
        self._touch(access.key)

    def on_hit(self, access: Access) -> None:
        if access.key in self._next:
            self._touch(access.key)

    def on_miss(self, access: Access) -> None:
        return None

    def on_remove(self, key: str) -> None:
        self._next.pop(key, None)

    def victim(self, exclude: Callable[[str], bool] | None = None) -> str | None:
        skipped: list[tuple[float, str]] = []
        found: str | None = None
        while (top := self._top()) is not None:
            if exclude is None or not exclude(top[1]):
                found = top[1]
                break
            skipped.append(heapq.heappop(self._heap))
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        return found

    def __len__(self) -> int:
        return len(self._next)
