"""Prefix-aware LRU-2: the default policy for prefix (KV) caches.

Two mechanisms, each with a reason in how prefix caches are used:

* **Order by the second-to-last access (LRU-2, O'Neil et al., 1993).** Most blocks of a
  prompt are never asked for again (on the Mooncake trace 58% of distinct blocks are seen once);
  plain LRU lets each flood of new blocks push out blocks that have already proven reuse.
  Ranking by the penultimate access time puts every block seen once behind every block seen
  twice (among themselves they are LRU), so one-hit wonders churn in the space they need and
  returning sessions keep theirs. A small bounded history (a few times the resident count)
  remembers last-access times of blocks that left, so a block coming back is recognised.
* **A block never outranks its parent.** A block at depth *d* is only useful while blocks
  0..d-1 survive, and every request that uses a block also uses its parent, so a parent is
  always at least as valuable. Each block's rank is clamped to its parent's (``Access.prev``)
  and ties go deepest first: chains are trimmed from the tail, never cut at the head, which
  would strand every block after the cut.

Without ``depth``/``prev`` hints it degrades to plain LRU-2. O(log n) per access (a heap with
lazy deletion).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import OrderedDict
from collections.abc import Callable

from tiers.policy import Access

_NEVER = -math.inf
# (penultimate access or -inf, last access, -depth, tie-breaking sequence, key)
_Entry = tuple[float, float, int, int, str]


class PrefixLRU2Policy:
    name = "prefix-lru2"

    def __init__(self, *, history_factor: int = 8, min_history: int = 1024) -> None:
        self._entries: dict[str, _Entry] = {}
        self._heap: list[_Entry] = []
        self._seq = itertools.count()
        # key -> (last access, access before that); bounded, oldest forgotten first
        self._history: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._history_factor = history_factor
        self._min_history = min_history

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def _record(self, access: Access) -> None:
        old = self._history.pop(access.key, None)
        self._history[access.key] = (access.now, old[0] if old is not None else _NEVER)
        limit = max(self._min_history, self._history_factor * len(self._entries))
        while len(self._history) > limit:
            self._history.popitem(last=False)

    def _rank(self, access: Access) -> None:
        key = access.key
        last, penult = self._history.get(key, (access.now, _NEVER))
        prev = access.prev
        if prev is not None:
            parent = self._entries.get(prev)
            if parent is not None and (parent[0], parent[1]) < (penult, last):
                penult, last = parent[0], parent[1]
        entry: _Entry = (penult, last, -(access.depth or 0), next(self._seq), key)
        self._entries[key] = entry
        heapq.heappush(self._heap, entry)
        if len(self._heap) > 2 * len(self._entries) + 64:
            self._heap = list(self._entries.values())
            heapq.heapify(self._heap)

    def admit(self, access: Access) -> bool:
        return True

    def on_miss(self, access: Access) -> None:
        self._record(access)

    def on_insert(self, access: Access) -> None:
        self._rank(access)

    def on_hit(self, access: Access) -> None:
        self._record(access)
        if access.key in self._entries:
            self._rank(access)

    def on_remove(self, key: str) -> None:
        self._entries.pop(key, None)

    def victim(self, exclude: Callable[[str], bool] | None = None) -> str | None:
        heap = self._heap
        skipped: list[_Entry] = []
        found: str | None = None
        while heap:
            top = heap[0]
            if self._entries.get(top[4]) is not top:
                heapq.heappop(heap)
                continue
            if exclude is None or not exclude(top[4]):
                found = top[4]
                break
            skipped.append(heapq.heappop(heap))
        for entry in skipped:
            heapq.heappush(heap, entry)
        return found
