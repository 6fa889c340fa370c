"""Per-tenant usage of each tier: what a tenant may be shown of the store without learning
anything of the other tenants (``GET /v1/stats`` with tenants configured).

The hierarchy reports every change of where a block lives (:meth:`TenantUsage.hold`,
:meth:`~TenantUsage.move`, :meth:`~TenantUsage.drop`), every read with the tier that served it
and every eviction; the totals per tenant are also what quotas are charged against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Tenant:
    bytes: list[int]
    blocks: list[int]
    hits: list[int]  # reads served by tier i; the last slot is the shared remote tier
    evictions: list[int]
    promotions: list[int]  # blocks moved out of tier i to a hotter one
    demotions: list[int]  # blocks moved out of tier i to a colder one
    reads: int = 0
    total: int = field(default=0)  # sum of bytes: the quota charge


@dataclass(frozen=True, slots=True)
class TierUsage:
    """One tenant's share of one tier. ``misses`` counts the tenant's reads that this tier and
    every tier above it did not serve, as a tier's own ``misses`` does for all reads."""

    used_bytes: int
    blocks: int
    hits: int
    misses: int
    evictions: int


class TenantUsage:
    def __init__(self, tier_names: Sequence[str]) -> None:
        self._names = list(tier_names)
        self._slot = {name: i for i, name in enumerate(self._names)}
        self._tenants: dict[str, _Tenant] = {}

    def _of(self, tenant: str) -> _Tenant:
        row = self._tenants.get(tenant)
        if row is None:
            n = len(self._names)
            z = [0] * n
            row = self._tenants[tenant] = _Tenant(z, z[:], z[:], z[:], z[:], z[:])
        return row

    # -- where blocks live ---------------------------------------------------------------------

    def hold(self, tenant: str, tier: int, charge: int) -> None:
        row = self._of(tenant)
        row.bytes[tier] += charge
        row.blocks[tier] += 1
        row.total += charge

    def move(self, tenant: str, src: int, dst: int, charge: int, *, counted: bool) -> None:
        """A block moved; a ``counted`` move is a promotion or demotion out of ``src``."""
        if src == dst:
            return
        row = self._of(tenant)
        row.bytes[src] -= charge
        row.blocks[src] -= 1
        row.bytes[dst] += charge
        row.blocks[dst] += 1
        if counted:
            (row.promotions if dst < src else row.demotions)[src] += 1

    def drop(self, tenant: str, tier: int, charge: int) -> None:
        row = self._of(tenant)
        row.bytes[tier] -= charge
        row.blocks[tier] -= 1
        row.total -= charge

    # -- activity ------------------------------------------------------------------------------

    def read(self, tenant: str, tier: str | None) -> None:
        row = self._of(tenant)
        row.reads += 1
        slot = None if tier is None else self._slot.get(tier)
        if slot is not None:
            row.hits[slot] += 1

    def evicted(self, tenant: str, tier: int) -> None:
        self._of(tenant).evictions[tier] += 1

    # -- views ---------------------------------------------------------------------------------

    def total(self, tenant: str) -> int:
        row = self._tenants.get(tenant)
        return 0 if row is None else row.total

    def totals(self) -> dict[str, int]:
        return {tenant: row.total for tenant, row in self._tenants.items()}

    def promotions(self, tenant: str) -> list[int]:
        row = self._tenants.get(tenant)
        return [0] * len(self._names) if row is None else list(row.promotions)

    def demotions(self, tenant: str) -> list[int]:
        row = self._tenants.get(tenant)
        return [0] * len(self._names) if row is None else list(row.demotions)

    def tiers(self, tenant: str) -> list[TierUsage]:
        """Per tier, in the order given at construction."""
        row = self._tenants.get(tenant)
        if row is None:
            return [TierUsage(0, 0, 0, 0, 0) for _ in self._names]
        out: list[TierUsage] = []
        served = 0
        for i in range(len(self._names)):
            served += row.hits[i]
            out.append(
                TierUsage(
                    used_bytes=row.bytes[i],
                    blocks=row.blocks[i],
                    hits=row.hits[i],
                    misses=row.reads - served,
                    evictions=row.evictions[i],
                )
            )
        return out
