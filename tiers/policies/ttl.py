"""TTL expiry: a block may be served for ``ttl`` seconds after it was last used.

Victims go in deadline order (the next block to expire goes first), and :meth:`expired` hands
the hierarchy every block past its deadline so it can drop them before they are served
(``X-KV-TTL`` on PUT arrives as ``Access.ttl`` and overrides the default). With one default TTL
and sliding deadlines the victim order is LRU; the policy exists for bounding staleness, not
for hit ratio.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable

from tiers.policy import Access

_Entry = tuple[float, int, str]


class TTLPolicy:
    name = "ttl"

    def __init__(self, *, ttl: float = 3600.0, sliding: bool = True) -> None:
        if not ttl > 0:
            raise ValueError("ttl must be > 0 seconds")
        self._ttl = ttl
        self._sliding = sliding
        self._entries: dict[str, _Entry] = {}
        self._own_ttl: dict[str, float] = {}
        self._heap: list[_Entry] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def _set(self, key: str, deadline: float) -> None:
        entry = (deadline, next(self._seq), key)
        self._entries[key] = entry
        heapq.heappush(self._heap, entry)
        if len(self._heap) > 2 * len(self._entries) + 64:
            self._heap = list(self._entries.values())
            heapq.heapify(self._heap)

    def deadline(self, key: str) -> float | None:
        entry = self._entries.get(key)
        return None if entry is None else entry[0]

    def admit(self, access: Access) -> bool:
        return access.ttl is None or access.ttl > 0

    def on_insert(self, access: Access) -> None:
        ttl = self._ttl
        if access.ttl is not None:
            ttl = access.ttl
            self._own_ttl[access.key] = ttl
        self._set(access.key, access.now + ttl)

    def on_hit(self, access: Access) -> None:
        if self._sliding and access.key in self._entries:
            ttl = self._own_ttl.get(access.key, self._ttl)
            self._set(access.key, access.now + ttl)

    def on_miss(self, access: Access) -> None:
        return None

    def on_remove(self, key: str) -> None:
        self._entries.pop(key, None)
        self._own_ttl.pop(key, None)

    def _top(self) -> _Entry | None:
        heap = self._heap
        while heap:
            if self._entries.get(heap[0][2]) is heap[0]:
                return heap[0]
            heapq.heappop(heap)
        return None

    def expired(self, now: float, limit: int | None = None) -> list[str]:
        """Keys whose deadline has passed, soonest first; they stay until ``on_remove``."""
        out: list[str] = []
        skipped: list[_Entry] = []
        cap = math.inf if limit is None else limit
        while len(out) < cap and (top := self._top()) is not None and top[0] <= now:
            out.append(top[2])
            skipped.append(heapq.heappop(self._heap))
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        return out

    def victim(self, exclude: Callable[[str], bool] | None = None) -> str | None:
        skipped: list[_Entry] = []
        found: str | None = None
        while (top := self._top()) is not None:
            if exclude is None or not exclude(top[2]):
                found = top[2]
                break
            skipped.append(heapq.heappop(self._heap))
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        return found
