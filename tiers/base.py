"""The Tier protocol: a small byte store with a budget and a policy.

A tier never moves blocks anywhere else and never evicts on its own: :meth:`Tier.put` answers
``NO_ROOM`` and the hierarchy decides what to demote (it keeps one eviction policy per tier, asks
it for a victim, then moves the block down with :meth:`Tier.evict`). A backend fault inside
``get`` surfaces as a miss plus a span event, never as an exception to the request.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from tiers.block import Block, BlockMeta
from tiers.shmseg import SegmentInfo


class PutOutcome(enum.Enum):
    STORED = "stored"
    EXISTS = "exists"
    NO_ROOM = "no_room"  # the budget is full right now: evict and retry, or go elsewhere
    TOO_LARGE = "too_large"  # could never fit this tier, whatever is evicted
    REJECTED = "rejected"  # the admission policy declined it
    FENCED = "fenced"  # a shared tier's fence (a newer writer's lease) refused it: nothing stored


@dataclass(frozen=True, slots=True)
class TierStats:
    name: str
    device: str
    capacity_bytes: int
    used_bytes: int
    blocks: int
    hits: int
    misses: int
    evictions: int

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "device": self.device,
            "capacity_bytes": self.capacity_bytes,
            "used_bytes": self.used_bytes,
            "blocks": self.blocks,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
        }


@runtime_checkable
class Tier(Protocol):
    name: str
    """``hbm``, ``dram``, ``disk`` or another tier's name (``X-KV-Tier``)."""
    device: str
    """What really holds the bytes: ``cuda:0``, ``cpu``, ``cpu-pinned``, ``lmdb``, ..."""
    volatile: bool
    """Whether the contents are lost when the process exits (spilled on graceful shutdown)."""

    async def get(self, key: str) -> Block | None:
        """The block, or ``None`` on a miss. Corrupt blocks are dropped and missed."""
        ...

    async def put(self, key: str, block: Block) -> PutOutcome:
        """Store a copy of ``block``; never evicts."""
        ...

    async def delete(self, key: str) -> bool: ...

    def contains(self, key: str) -> bool: ...

    async def evict(self, key: str) -> Block | None:
        """Remove ``key`` and hand back its block, for the hierarchy to demote."""
        ...

    def fits(self, nbytes: int) -> bool:
        """Whether a block of ``nbytes`` fits the budget now, without eviction."""
        ...

    def could_ever_fit(self, nbytes: int) -> bool: ...

    def keys(self) -> list[str]: ...

    def stats(self) -> TierStats: ...

    async def close(self) -> None: ...


# -- pinned reads (zero-copy HTTP GET, shared-memory descriptors) ----------------------------


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a pinned block's bytes lie in a shared segment: ``(offset, length)`` runs, in order."""

    segment: str
    runs: tuple[tuple[int, int], ...]


@runtime_checkable
class PinnedBlock(Protocol):
    """A block whose bytes stay put (not freed, not reused) until :meth:`release`.

    A reader writes :meth:`views` to a socket or hands :meth:`placement` to a same-host client,
    then releases. ``release`` is idempotent.
    """

    meta: BlockMeta

    def views(self) -> list[memoryview] | None:
        """Host memoryviews over the bytes, in order; ``None`` when not host-addressable (HBM)."""
        ...

    def placement(self) -> Placement | None:
        """The bytes' place in a shared segment, or ``None`` when they are not in one."""
        ...

    async def read(self) -> bytes | memoryview:
        """The bytes in one host buffer: a copy out of storage that is not host-addressable
        (HBM on a GPU), read under the pin, so no second lookup is made for them."""
        ...

    def release(self) -> None: ...


@runtime_checkable
class PinnableTier(Protocol):
    """A tier that can lend its own storage out for a while instead of copying a block."""

    def pin(self, key: str) -> PinnedBlock | None:
        """Pin ``key``'s storage (a hit), or ``None`` on a miss. Deleting or evicting a pinned
        block removes it at once, but its storage is reused only after the last release."""
        ...


@runtime_checkable
class SharedTier(Protocol):
    """A tier whose storage same-host clients can map (a shared file, or CUDA IPC for HBM)."""

    def shared_segment(self) -> SegmentInfo | None: ...


@dataclass(slots=True)
class HeldBlock:
    """A :class:`PinnedBlock` over bytes the caller already owns (a copy): nothing to release."""

    block: Block
    meta: BlockMeta = field(init=False)

    def __post_init__(self) -> None:
        self.meta = self.block.meta

    def views(self) -> list[memoryview] | None:
        return [memoryview(self.block.data)]

    def placement(self) -> Placement | None:
        return None

    async def read(self) -> bytes | memoryview:
        return self.block.data

    def release(self) -> None:
        return None


# -- evictions without a copy ----------------------------------------------------------------


@dataclass(slots=True)
class Loan:
    """An evicted block whose bytes still lie in the tier's storage: ``block.data`` views them.

    The block has left the tier (it no longer contains the key), but the storage stays reserved
    and charged until :meth:`end`, so the hierarchy can store it one tier down straight from
    there. ``end`` is idempotent; nobody may touch ``block.data`` after it.
    """

    block: Block
    _end: Callable[[], None]
    _ended: bool = False

    def end(self) -> None:
        if not self._ended:
            self._ended = True
            self._end()

    # A loan is also a Reservation (its bytes are in place already): offered to the tier
    # below, one that shares the lender's storage adopts it instead of copying.

    @property
    def view(self) -> memoryview:
        return memoryview(self.block.data)

    def release(self) -> None:
        self.end()

    @property
    def ended(self) -> bool:
        return self._ended

    def settle(self) -> None:
        """End the loan without giving the storage back: the lender handed it to another
        tier, which owns it now."""
        self._ended = True


@runtime_checkable
class DroppingTier(Protocol):
    """A tier that can evict a block without handing it back: the bottom tier's evictions
    (nothing below takes the block), which would otherwise read and decode it only to discard
    it."""

    async def drop(self, key: str) -> bool:
        """Evict ``key``, counted as an eviction like :meth:`Tier.evict`; whether it was
        there."""
        ...


@runtime_checkable
class LendingTier(Protocol):
    """A tier that can evict a block without copying it out (see :class:`Loan`)."""

    def lend(self, key: str) -> Loan | None:
        """Evict ``key`` as a loan; ``None`` when it is absent or cannot be lent (then the
        caller uses :meth:`Tier.evict`)."""
        ...


# -- writes without a copy in --------------------------------------------------------------------


class Reservation(Protocol):
    """Storage set aside in a tier for a block whose bytes are still arriving.

    A receiver writes the bytes into :attr:`view` (a socket's ``recv_into``), then hands the
    block to the hierarchy with the reservation: the tier that made it stores the block by
    taking the storage over (:meth:`ReservingTier.adopt`), with no copy; any other tier copies
    from :attr:`view`. :meth:`release` gives back storage that was not adopted (idempotent, and
    a no-op after adoption); the receiver calls it once the put has returned, whatever happened.
    """

    @property
    def view(self) -> memoryview:
        """Exactly the reserved bytes, writable, valid until :meth:`release` or adoption."""
        ...

    def release(self) -> None: ...


@runtime_checkable
class ReservingTier(Protocol):
    """A tier that can receive a block's bytes in place (see :class:`Reservation`)."""

    def reserve(self, nbytes: int) -> Reservation | None:
        """Set ``nbytes`` aside without evicting anything; ``None`` when there is no room
        for that right now (the caller receives into its own buffer instead)."""
        ...

    def adopt(self, key: str, reservation: Reservation, meta: BlockMeta) -> PutOutcome | None:
        """Store ``key`` from ``reservation``'s storage, as :meth:`Tier.put` would store a copy
        (and with its outcomes); ``None`` when the reservation is not this tier's to adopt
        (the caller then puts a copy)."""
        ...
