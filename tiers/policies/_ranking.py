"""What the prefix policies share: keys in eviction order with the chain clamp, and a bounded
history of each key's last two accesses."""

from __future__ import annotations

import heapq
import itertools
import math
from collections import OrderedDict
from collections.abc import Callable

NEVER = -math.inf

# (rank, last access, -depth, tie-breaking sequence, key)
_Entry = tuple[float, float, int, int, str]


class Ranking:
    """Keys in eviction order: a min-heap with lazy deletion; a block never outranks its parent
    (ties deepest first), so chains are trimmed from the tail."""

    __slots__ = ("entries", "heap", "seq")

    def __init__(self) -> None:
        self.entries: dict[str, _Entry] = {}
        self.heap: list[_Entry] = []
        self.seq = itertools.count()

    def __len__(self) -> int:
        return len(self.entries)

    def rank(self, key: str, rank: float, last: float, depth: int, prev: str | None) -> None:
        if prev is not None:
            parent = self.entries.get(prev)
            if parent is not None and (parent[0], parent[1]) < (rank, last):
                rank, last = parent[0], parent[1]
        entry: _Entry = (rank, last, -depth, next(self.seq), key)
        self.entries[key] = entry
        heapq.heappush(self.heap, entry)
        if len(self.heap) > 2 * len(self.entries) + 64:
            self.heap = list(self.entries.values())
            heapq.heapify(self.heap)

    def victim(self, exclude: Callable[[str], bool] | None = None) -> str | None:
        heap = self.heap
        skipped: list[_Entry] = []
        found: str | None = None
        while heap:
            top = heap[0]
            if self.entries.get(top[4]) is not top:
                heapq.heappop(heap)
                continue
            if exclude is None or not exclude(top[4]):
                found = top[4]
                break
            skipped.append(heapq.heappop(heap))
        for entry in skipped:
            heapq.heappush(heap, entry)
        return found


class AccessHistory:
    """key -> (last access, access before that or :data:`NEVER`), kept for up to
    ``factor`` x the resident count keys (at least ``minimum``), oldest forgotten first: blocks
    that left the cache are recognised when they come back."""

    __slots__ = ("_factor", "_minimum", "_times")

    def __init__(self, *, factor: int, minimum: int) -> None:
        self._times: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._factor = factor
        self._minimum = minimum

    @property
    def factor(self) -> int:
        return self._factor

    @property
    def minimum(self) -> int:
        return self._minimum

    def record(self, key: str, now: float, *, resident: int) -> None:
        times = self._times
        old = times.pop(key, None)
        times[key] = (now, old[0] if old is not None else NEVER)
        limit = max(self._minimum, self._factor * resident)
        while len(times) > limit:
            times.popitem(last=False)

    def last_two(self, key: str, now: float) -> tuple[float, float]:
        """``(last, penultimate)``; a key never seen is seen ``now`` for the first time."""
        return self._times.get(key, (now, NEVER))
