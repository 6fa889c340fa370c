"""Capacity accounting, written once and used by every tier.

A tier charges the ledger what a block really costs it (whole pages for the arenas, compressed
frame plus page overhead on disk), so ``used_bytes`` is what the budget is held to.
"""

from __future__ import annotations

from dataclasses import dataclass

from tiers.errors import TierConfigError, TierError


@dataclass(frozen=True, slots=True)
class LedgerSnapshot:
    capacity_bytes: int
    used_bytes: int
    blocks: int


class CapacityLedger:
    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise TierConfigError(f"capacity must be >= 0, got {capacity_bytes}")
        self._capacity = capacity_bytes
        self._used = 0
        self._charges: dict[str, int] = {}

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def free_bytes(self) -> int:
        return self._capacity - self._used

    def __len__(self) -> int:
        return len(self._charges)

    def __contains__(self, key: object) -> bool:
        return key in self._charges

    def charge_of(self, key: str) -> int:
        return self._charges.get(key, 0)

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self._capacity - self._used

    def could_ever_fit(self, nbytes: int) -> bool:
        return nbytes <= self._capacity

    def charge(self, key: str, nbytes: int) -> bool:
        """Charge ``nbytes`` for ``key``; ``False`` (and nothing charged) when over budget."""
        if key in self._charges:
            raise TierError(f"{key!r} is already charged")
        if nbytes < 0:
            raise TierError("negative charge")
        if nbytes > self._capacity - self._used:
            return False
        self._charges[key] = nbytes
        self._used += nbytes
        return True

    def release(self, key: str) -> int:
        """Refund what ``key`` was charged; 0 when it was not charged."""
        nbytes = self._charges.pop(key, 0)
        self._used -= nbytes
        return nbytes

    def snapshot(self) -> LedgerSnapshot:
        return LedgerSnapshot(self._capacity, self._used, len(self._charges))
