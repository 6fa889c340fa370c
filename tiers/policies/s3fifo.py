"""S3-FIFO at chain granularity: quick demotion of new prompts, a ghost queue for returners.

S3-FIFO (Yang et al., SOSP 2023) rests on one observation: most objects are never reused, so
new objects should pass through a small probationary FIFO and leave it quickly unless they are
asked for again; a ghost queue remembers what left the small queue, so an object that comes
back soon after goes straight to the main queue (FIFO with reinsertion of objects re-used
while resident, a two-bit CLOCK).

In a prefix cache the natural object is a **chain** (all blocks under one first block), not a
block: a request reads or writes the whole chain, a chain is only worth its surviving prefix,
and the Mooncake trace's chains are disjoint documents requested again as a whole. So queues
hold chains; a chain's frequency counts requests (accesses of its first block); evicting a
chain removes its blocks deepest first, so what survives is always a usable prefix. The small
queue's share (10%) is S3-FIFO's published default; the ghost remembers as many blocks' worth
of chains as the tier holds. Without ``depth``/``prev`` hints every block is its own chain and
this is plain S3-FIFO on blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from tiers.policy import Access

_MAX_FREQ = 3


class _Chain:
    __slots__ = ("blocks", "freq", "main", "peak")

    def __init__(self, *, main: bool) -> None:
        # key -> None, in insertion order: blocks arrive head first, so the last is the deepest
        self.blocks: dict[str, None] = {}
        self.freq = 0
        self.main = main
        self.peak = 0  # most blocks it held: its size in the ghost


class ChainS3FIFOPolicy:
    name = "chain-s3fifo"

    def __init__(self, *, small_fraction: float = 0.1, ghost_factor: float = 1.0) -> None:
        self._small_fraction = small_fraction
        self._ghost_factor = ghost_factor
        self._chain_of: dict[str, str] = {}  # resident block -> its chain's first block
        self._chains: dict[str, _Chain] = {}
        self._small: OrderedDict[str, None] = OrderedDict()  # chain ids, oldest first
        self._main: OrderedDict[str, None] = OrderedDict()
        self._ghost: OrderedDict[str, int] = OrderedDict()  # chain id -> blocks it had
        self._ghost_blocks = 0
        self._small_blocks = 0

    def __len__(self) -> int:
        return len(self._chain_of)

    def __contains__(self, key: str) -> bool:
        return key in self._chain_of

    def _chain_id(self, access: Access) -> str:
        prev = access.prev
        if prev is None or access.depth == 0:
            return access.key
        return self._chain_of.get(prev, prev)

    def admit(self, access: Access) -> bool:
        return True

    def on_miss(self, access: Access) -> None:
        return None

    def on_hit(self, access: Access) -> None:
        cid = self._chain_of.get(access.key)
        if cid is not None and cid == access.key:  # a request (re)reading the chain's head
            chain = self._chains[cid]
            chain.freq = min(chain.freq + 1, _MAX_FREQ)

    def on_insert(self, access: Access) -> None:
        key = access.key
        if key in self._chain_of:
            return
        cid = self._chain_id(access)
        chain = self._chains.get(cid)
        if chain is None:
            returning = self._ghost.pop(cid, None)
            if returning is not None:
                self._ghost_blocks -= returning
            chain = _Chain(main=returning is not None)
            self._chains[cid] = chain
            (self._main if chain.main else self._small)[cid] = None
        chain.blocks[key] = None
        chain.peak = max(chain.peak, len(chain.blocks))
        self._chain_of[key] = cid
        if not chain.main:
            self._small_blocks += 1

    def on_remove(self, key: str) -> None:
        cid = self._chain_of.pop(key, None)
        if cid is None:
            return
        chain = self._chains[cid]
        del chain.blocks[key]
        if not chain.main:
            self._small_blocks -= 1
        if chain.blocks:
            return
        del self._chains[cid]
        if chain.main:
            del self._main[cid]
            return
        del self._small[cid]
        # Left the small queue unused: remember it, bounded by the tier's size in blocks.
        size = chain.peak
        self._ghost[cid] = size
        self._ghost_blocks += size
        while self._ghost_blocks > self._ghost_factor * max(len(self._chain_of), 1) and self._ghost:
            _, n = self._ghost.popitem(last=False)
            self._ghost_blocks -= n

    def _promote(self, cid: str, chain: _Chain) -> None:
        del self._small[cid]
        self._small_blocks -= len(chain.blocks)
        chain.main = True
        chain.freq = 0
        self._main[cid] = None

    def victim(self, exclude: Callable[[str], bool] | None = None) -> str | None:
        # Each chain is looked at a bounded number of times (a promotion, then at most
        # _MAX_FREQ reinsertions), so this terminates; excluded blocks are skipped.
        budget = 2 * (_MAX_FREQ + 2) * (len(self._chains) + 1)
        skipped: set[str] = set()
        while budget > 0 and len(skipped) < len(self._chains):
            budget -= 1
            small_turn = self._small and (
                not self._main or self._small_blocks > self._small_fraction * len(self)
            )
            queue = self._small if small_turn else self._main
            if not queue:
                queue = self._main if small_turn else self._small
            cid = next((c for c in queue if c not in skipped), None)
            if cid is None:
                queue = self._main if queue is self._small else self._small
                cid = next((c for c in queue if c not in skipped), None)
                if cid is None:
                    return None
            chain = self._chains[cid]
            if chain.freq > 0:
                if not chain.main:
                    self._promote(cid, chain)
                else:
                    chain.freq -= 1
                    self._main.move_to_end(cid)
                continue
            for key in reversed(chain.blocks):
                if exclude is None or not exclude(key):
                    return key
            skipped.add(cid)
        return None
