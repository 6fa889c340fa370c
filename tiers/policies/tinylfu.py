"""W-TinyLFU (Einziger, Friedman & Manes, 2017; the policy of Caffeine).

A small LRU *window* takes every new block; the *main* space is a segmented LRU (probation,
then protected once hit again). When room is needed and the window is over its share, the
window's oldest block (the candidate) competes with main's oldest (the victim): the one the
frequency sketch has seen more often stays. One-hit wonders therefore pass through the window
and leave without displacing blocks with a history, while a burst of new blocks still gets a
short recency chance in the window.

The policy never learns its tier's capacity: shares are fractions of how many blocks it holds,
which equals the capacity whenever ``victim`` is asked (the tier is full).
"""

from __future__ import annotations

from collections.abc import Callable

from tiers.policies._keylist import KeyList
from tiers.policies.sketch import FrequencySketch
from tiers.policy import Access


def _first(keys: KeyList, exclude: Callable[[str], bool] | None) -> str | None:
    if exclude is None:
        return keys.oldest()
    for key in keys:
        if not exclude(key):
            return key
    return None


class WTinyLFUPolicy:
    name = "w-tinylfu"

    def __init__(self, *, window: float = 0.01, protected: float = 0.8) -> None:
        self._window_share = window
        self._protected_share = protected
        self._window = KeyList()
        self._probation = KeyList()
        self._protected = KeyList()
        self.sketch = FrequencySketch()
        self._evicting = False

    def __len__(self) -> int:
        return len(self._window) + len(self._probation) + len(self._protected)

    def admit(self, access: Access) -> bool:
        return True

    def on_miss(self, access: Access) -> None:
        self.sketch.increment(access.key)

    def on_insert(self, access: Access) -> None:
        key = access.key
        if key in self or not key:
            return
        self._window.push_newest(key)
        n = len(self)
        self.sketch.ensure_capacity(n)
        # While the tier fills (no victim asked for yet) main takes the window's overflow
        # freely; once full, the window drains only through the admission contest in victim().
        # Twice the share is the slack kept for a tier that shrank by deletions.
        limit = max(1, int(self._window_share * n))
        if self._evicting:
            limit *= 2
        while len(self._window) > limit:
            moved = self._window.pop_oldest()
            if moved is None:
                break
            self._probation.push_newest(moved)

    def __contains__(self, key: str) -> bool:
        return key in self._window or key in self._probation or key in self._protected

    def on_hit(self, access: Access) -> None:
        key = access.key
        self.sketch.increment(key)
        if key in self._window:
            self._window.push_newest(key)
        elif key in self._probation:
            self._probation.discard(key)
            self._protected.push_newest(key)
            limit = max(1, int(self._protected_share * len(self)))
            while len(self._protected) > limit:
                demoted = self._protected.pop_oldest()
                if demoted is None:
                    break
                self._probation.push_newest(demoted)
        elif key in self._protected:
            self._protected.push_newest(key)

    def on_remove(self, key: str) -> None:
        if not self._window.discard(key) and not self._probation.discard(key):
            self._protected.discard(key)

    def victim(self, exclude: Callable[[str], bool] | None = None) -> str | None:
        self._evicting = True
        window_limit = max(1, int(self._window_share * len(self)))
        if len(self._window) > window_limit:
            candidate = _first(self._window, exclude)
            incumbent = _first(self._probation, exclude) or _first(self._protected, exclude)
            if candidate is None:
                return incumbent
            if incumbent is None:
                return candidate
            if self.sketch.estimate(candidate) > self.sketch.estimate(incumbent):
                # The candidate earns its place in main; the incumbent goes.
                self._window.discard(candidate)
                self._probation.push_newest(candidate)
                return incumbent
            return candidate
        return (
            _first(self._probation, exclude)
            or _first(self._protected, exclude)
            or _first(self._window, exclude)
        )
