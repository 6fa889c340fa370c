"""An ordered set of keys with O(1) insert-anywhere, the building block of the LRU variants.

``OrderedDict`` can only append or move to either end; chain-aware recency needs to place a
block immediately below its parent, so this is a small intrusive doubly linked list keyed by a
dict. Oldest first.
"""

from __future__ import annotations

from collections.abc import Iterator

# A node is [prev, next, key]; lists rather than objects because they are the cheapest mutable
# record CPython has, and this sits on the hot path of every access.
_PREV = 0
_NEXT = 1
_KEY = 2


class KeyList:
    __slots__ = ("_nodes", "_root")

    def __init__(self) -> None:
        root: list[object] = [None, None, None]
        root[_PREV] = root
        root[_NEXT] = root
        self._root = root
        self._nodes: dict[str, list[object]] = {}

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, key: object) -> bool:
        return key in self._nodes

    def __iter__(self) -> Iterator[str]:
        """Oldest first. Do not mutate while iterating."""
        node = self._root[_NEXT]
        root = self._root
        while node is not root:
            assert isinstance(node, list)
            yield node[_KEY]
            node = node[_NEXT]

    def oldest(self) -> str | None:
        node = self._root[_NEXT]
        if node is self._root:
            return None
        assert isinstance(node, list)
        key: str = node[_KEY]
        return key

    def _unlink(self, node: list[object]) -> None:
        prev = node[_PREV]
        nxt = node[_NEXT]
        assert isinstance(prev, list) and isinstance(nxt, list)
        prev[_NEXT] = nxt
        nxt[_PREV] = prev

    def _link_before(self, node: list[object], succ: list[object]) -> None:
        prev = succ[_PREV]
        assert isinstance(prev, list)
        node[_PREV] = prev
        node[_NEXT] = succ
        prev[_NEXT] = node
        succ[_PREV] = node

    def push_newest(self, key: str) -> None:
        """Add ``key`` (or move it) to the newest end."""
        node = self._nodes.get(key)
        if node is None:
            node = [None, None, key]
            self._nodes[key] = node
        else:
            self._unlink(node)
        self._link_before(node, self._root)

    def push_below(self, key: str, anchor: str) -> bool:
        """Place ``key`` (add or move) immediately older than ``anchor``; False if no anchor."""
        succ = self._nodes.get(anchor)
        if succ is None or anchor == key:
            return False
        node = self._nodes.get(key)
        if node is None:
            node = [None, None, key]
            self._nodes[key] = node
        else:
            self._unlink(node)
        self._link_before(node, succ)
        return True

    def discard(self, key: str) -> bool:
        node = self._nodes.pop(key, None)
        if node is None:
            return False
        self._unlink(node)
        return True

    def pop_oldest(self) -> str | None:
        key = self.oldest()
        if key is not None:
            self.discard(key)
        return key
