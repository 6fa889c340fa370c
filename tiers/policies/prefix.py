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

from collections.abc import Callable

from tiers.policies._ranking import AccessHistory, Ranking
from tiers.policy import Access


class PrefixLRU2Policy:
    name = "prefix-lru2"

    def __init__(self, *, history_factor: int = 8, min_history: int = 1024) -> None:
        self._ranking = Ranking()
        self._history = AccessHistory(factor=history_factor, minimum=min_history)

    def __len__(self) -> int:
        return len(self._ranking)

    def __contains__(self, key: str) -> bool:
        return key in self._ranking.entries

    def _record(self, access: Access) -> None:
        self._history.record(access.key, access.now, resident=len(self._ranking))

    def _rank(self, access: Access) -> None:
        last, penult = self._history.last_two(access.key, access.now)
        self._ranking.rank(access.key, penult, last, access.depth or 0, access.prev)

    def admit(self, access: Access) -> bool:
        return True

    def on_miss(self, access: Access) -> None:
        self._record(access)

    def on_insert(self, access: Access) -> None:
        self._rank(access)

    def on_hit(self, access: Access) -> None:
        self._record(access)
        if access.key in self._ranking.entries:
            self._rank(access)

    def on_remove(self, key: str) -> None:
        self._ranking.entries.pop(key, None)

    def victim(self, exclude: Callable[[str], bool] | None = None) -> str | None:
        return self._ranking.victim(exclude)
