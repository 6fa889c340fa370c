"""Read pins: short, bounded leases that keep blocks out of the eviction victim set.

A read (or a lookup that asks for it) pins the blocks it is about to serve; the hierarchy asks
:meth:`PinTable.is_pinned` before evicting a victim and skips pinned ones. Pins are leases too:
each has a deadline no further than ``max_ttl_ms`` away, so a reader that dies or forgets to
unpin holds nothing for long. Several readers may pin one key; it stays pinned until all of them
unpin or the latest deadline passes, whichever is first.

``is_pinned`` is O(1) and expires lazily; byte accounting is kept exact by a deadline heap that
is drained (amortized O(log n)) whenever a total is read or a pin is taken.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from coherence.errors import BadRequest, CoherenceConfigError
from tiers.block import tenant_of
from tiers.clock import SYSTEM_CLOCK, Clock

DEFAULT_PIN_TTL_MS = 2_000
DEFAULT_MAX_PIN_TTL_MS = 30_000


@dataclass(frozen=True, slots=True)
class PinHandle:
    """One reader's pin; hand it back to :meth:`PinTable.unpin`."""

    key: str
    generation: int


@dataclass(slots=True, eq=False)
class _Pin:
    nbytes: int
    tier: str | None
    holders: int
    deadline: float  # clock.monotonic() seconds
    generation: int


class PinTable:
    def __init__(
        self,
        *,
        clock: Clock = SYSTEM_CLOCK,
        default_ttl_ms: int = DEFAULT_PIN_TTL_MS,
        max_ttl_ms: int = DEFAULT_MAX_PIN_TTL_MS,
        max_pinned_bytes: int | None = None,
    ) -> None:
        if not 1 <= default_ttl_ms <= max_ttl_ms:
            raise CoherenceConfigError("pins need 1 <= default_ttl_ms <= max_ttl_ms")
        if max_pinned_bytes is not None and max_pinned_bytes < 0:
            raise CoherenceConfigError("max_pinned_bytes must be >= 0")
        self._clock = clock
        self.default_ttl_ms = default_ttl_ms
        self.max_ttl_ms = max_ttl_ms
        # Without a cap, pins could hold the whole cache and leave eviction nothing to take.
        self.max_pinned_bytes = max_pinned_bytes
        self._pins: dict[str, _Pin] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._generations = itertools.count(1)
        self._bytes = 0
        self._bytes_by_tier: dict[str, int] = {}

    # -- the hot path -------------------------------------------------------------------------

    def is_pinned(self, key: str) -> bool:
        """The hierarchy's victim-exclusion predicate: O(1), expiring the pin if it is due."""
        pin = self._pins.get(key)
        if pin is None:
            return False
        if self._clock.monotonic() >= pin.deadline:
            self._remove(key, pin)
            return False
        return True

    # -- pinning ------------------------------------------------------------------------------

    def pin(
        self, key: str, nbytes: int, *, ttl_ms: int | None = None, tier: str | None = None
    ) -> PinHandle | None:
        """Pin ``key`` (``nbytes`` in ``tier``) for ``ttl_ms`` (default, clamped to the max).

        ``None`` when a new pin would take the pinned total over ``max_pinned_bytes``: the read
        goes ahead unpinned. Pinning an already pinned key adds a holder and can only push its
        deadline later.
        """
        ttl = self._ttl(ttl_ms)
        if nbytes < 0:
            raise BadRequest("a pin cannot cover a negative number of bytes")
        self._drain()
        deadline = self._clock.monotonic() + ttl / 1000
        pin = self._pins.get(key) if self.is_pinned(key) else None
        if pin is None:
            if self.max_pinned_bytes is not None and self._bytes + nbytes > self.max_pinned_bytes:
                return None
            pin = _Pin(nbytes, tier, 1, deadline, next(self._generations))
            self._pins[key] = pin
            self._account(tier, nbytes)
            heapq.heappush(self._heap, (deadline, pin.generation, key))
            return PinHandle(key, pin.generation)
        pin.holders += 1
        if deadline > pin.deadline:
            pin.deadline = deadline
            heapq.heappush(self._heap, (deadline, pin.generation, key))
        if tier is not None and tier != pin.tier:
            self.moved(key, tier)
        return PinHandle(key, pin.generation)

    def unpin(self, handle: PinHandle) -> None:
        """Drop one holder; the key is unpinned when the last one goes. Idempotent per expiry."""
        pin = self._pins.get(handle.key)
        if pin is None or pin.generation != handle.generation:
            return  # expired (and maybe re-pinned by others since): nothing of ours is left
        pin.holders -= 1
        if pin.holders <= 0:
            self._remove(handle.key, pin)

    @contextmanager
    def hold(
        self, key: str, nbytes: int, *, ttl_ms: int | None = None, tier: str | None = None
    ) -> Iterator[PinHandle | None]:
        """Pin for the duration of a ``with`` block (and never past the pin's deadline)."""
        handle = self.pin(key, nbytes, ttl_ms=ttl_ms, tier=tier)
        try:
            yield handle
        finally:
            if handle is not None:
                self.unpin(handle)

    def moved(self, key: str, tier: str | None) -> None:
        """A pinned block now lives in ``tier`` (promotion): keep per-tier bytes right."""
        pin = self._pins.get(key)
        if pin is None or pin.tier == tier:
            return
        self._account(pin.tier, -pin.nbytes)
        pin.tier = tier
        self._account(tier, pin.nbytes)

    def drop(self, key: str) -> bool:
        """Forget every pin on ``key`` (the block was deleted); whether there was one."""
        pin = self._pins.get(key)
        if pin is None:
            return False
        self._remove(key, pin)
        return True

    # -- accounting ---------------------------------------------------------------------------

    def pinned_bytes(self, tier: str | None = None) -> int:
        """Bytes pinned now, in total or in one tier."""
        self._drain()
        return self._bytes if tier is None else self._bytes_by_tier.get(tier, 0)

    def __len__(self) -> int:
        self._drain()
        return len(self._pins)

    def tenant_pins(self, tenant: str) -> tuple[int, int]:
        """``(bytes, blocks)`` pinned now of ``tenant``'s keys (a scan of the pins held)."""
        self._drain()
        mine = [pin.nbytes for key, pin in self._pins.items() if tenant_of(key) == tenant]
        return sum(mine), len(mine)

    def expire_due(self) -> int:
        """Remove every pin past its deadline; how many."""
        return self._drain()

    # -- internals ----------------------------------------------------------------------------

    def _ttl(self, ttl_ms: int | None) -> int:
        if ttl_ms is None:
            return self.default_ttl_ms
        if isinstance(ttl_ms, bool) or not isinstance(ttl_ms, int) or ttl_ms < 1:
            raise BadRequest(f"pin ttl_ms must be a positive integer, got {ttl_ms!r}")
        return min(ttl_ms, self.max_ttl_ms)

    def _drain(self) -> int:
        now = self._clock.monotonic()
        removed = 0
        while self._heap and self._heap[0][0] <= now:
            _, generation, key = heapq.heappop(self._heap)
            pin = self._pins.get(key)
            # Stale entries: the pin was extended (a later entry exists), unpinned, or replaced.
            if pin is not None and pin.generation == generation and now >= pin.deadline:
                self._remove(key, pin)
                removed += 1
        return removed

    def _remove(self, key: str, pin: _Pin) -> None:
        del self._pins[key]
        self._account(pin.tier, -pin.nbytes)

    def _account(self, tier: str | None, delta: int) -> None:
        self._bytes += delta
        if tier is not None:
            left = self._bytes_by_tier.get(tier, 0) + delta
            if left:
                self._bytes_by_tier[tier] = left
            else:
                self._bytes_by_tier.pop(tier, None)
