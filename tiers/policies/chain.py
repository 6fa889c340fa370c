"""Chain-aware LRU: a block is never more recent than its parent."""

from __future__ import annotations

from collections.abc import Callable

from tiers.policies._keylist import KeyList
from tiers.policy import Access


class ChainLRUPolicy:
    name = "chain-lru"

    def __init__(self) -> None:
        self._order = KeyList()

    def _touch(self, access: Access) -> None:
        prev = access.prev
        if prev is None or not self._order.push_below(access.key, prev):
            self._order.push_newest(access.key)

    def admit(self, access: Access) -> bool:
        return True

    def on_insert(self, access: Access) -> None:
        self._touch(access)

    def on_hit(self, access: Access) -> None:
        if access.key in self._order:
            self._touch(access)

    def on_miss(self, access: Access) -> None:
        return None

    def on_remove(self, key: str) -> None:
        self._order.discard(key)

    def victim(self, exclude: Callable[[str], bool] | None = None) -> str | None:
        for key in self._order:
            if exclude is None or not exclude(key):
                return key
        return None

    def __len__(self) -> int:
        return len(self._order)
