"""The coherence layer in front of the hierarchy: leases, fencing, waiters, read pins, quotas.

Handlers call :class:`Coherence` for every write and for the reads that wait or pin; plain reads
go straight to the hierarchy (the hot path pays nothing for coherence). Every key here is already
scoped to its tenant (``RequestContext.scope``), so tenants never share a lease, a token check, a
waiter, a pin or a quota. The protocol itself lives in :mod:`coherence`; see
``docs/coherence.md``.

A write is staged and published atomically: the gateway holds the whole body before it calls
:meth:`Coherence.put`, the hierarchy stages it in a tier, and the fencing check is repeated at the
last synchronous point before the block becomes visible (``Hierarchy.put(publish_if=...)``), so a
writer that lost its lease while its bytes were being stored publishes nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from coherence.epoch_file import FileTokenStore
from coherence.errors import LeaseConflict, LeaseStoreUnavailable, StaleToken
from coherence.leases import (
    Granted,
    Held,
    LeaseStats,
    LeaseTable,
    MemoryTokenStore,
    MetaTokenStore,
    SupportsMetaIncr,
    TokenStore,
    WaitOutcome,
    WritePermit,
)
from coherence.pins import PinTable
from coherence.redis_leases import RedisLeaseTable
from coherence.tenants import Tenant, plan_quota
from gateway.context import RequestContext
from gateway.metrics import KvgateMetrics
from gateway.telemetry import traced_lease_wait
from tiers.base import Reservation
from tiers.block import Block, client_key, split_key
from tiers.hierarchy import Hierarchy, Hit, StoreOutcome

log = logging.getLogger("kvgate.coherence")

DEFAULT_LEASE_TTL_MS = 10_000
"""``POST /v1/leases`` without ``ttl_ms``."""


@dataclass(frozen=True, slots=True)
class Exists:
    """``POST /v1/leases`` on a block that is already stored: read it, nothing to write."""


EXISTS = Exists()


EPOCH_FILE = "lease_epoch"


def token_store_for(hierarchy: object, data_dir: Path | None = None) -> TokenStore:
    """Fencing epochs persisted in the coldest tier with a durable ``meta_incr`` (the disk tier).

    Without one (``disk_bytes = 0``) they are kept in ``data_dir``'s :data:`EPOCH_FILE`; with
    no ``data_dir`` either (a test's memory-only hierarchy) in memory, and tokens are then
    monotonic only for the life of the process.
    """
    for tier in reversed(list(getattr(hierarchy, "tiers", ()))):
        if callable(getattr(tier, "meta_incr", None)):
            return MetaTokenStore(cast(SupportsMetaIncr, tier))
    if data_dir is not None:
        return FileTokenStore(data_dir / EPOCH_FILE)
    log.warning("no tier has a durable meta_incr: fencing tokens restart with the process")
    return MemoryTokenStore()


class Coherence:
    def __init__(
        self,
        hierarchy: Hierarchy,
        leases: LeaseTable | RedisLeaseTable,
        pins: PinTable,
        *,
        metrics: KvgateMetrics | None = None,
        remote_inclusive: bool = False,
    ) -> None:
        self.hierarchy = hierarchy
        self.leases = leases
        """In-process, or shared through Redis by every gateway of a ``--remote`` cache."""
        self.pins = pins
        self.metrics = metrics
        # A tenant with a quota writes one block at a time: "check usage, shed, store" must not
        # interleave with another of its writes, or two writes could each fit and both land.
        self._quota_locks: dict[str, asyncio.Lock] = {}
        self._drops: set[asyncio.Task[bool]] = set()
        self._announcing: set[asyncio.Task[None]] = set()
        if isinstance(leases, RedisLeaseTable):
            leases.on_delete = self._drop_local
            if remote_inclusive and hierarchy.shared is not None:
                hierarchy.shared.on_evict = self._shared_evicted

    # -- writes -------------------------------------------------------------------------------

    async def put(
        self,
        ctx: RequestContext,
        key: str,
        block: Block,
        *,
        token: int | None,
        reservation: Reservation | None = None,
    ) -> StoreOutcome:
        """Store ``block`` under the scoped ``key`` if the write may happen.

        Raises :class:`LeaseConflict` / :class:`StaleToken` (409) when a lease forbids it,
        :class:`~coherence.errors.QuotaExceeded` (507) when the block can never fit the tenant's
        quota. ``NO_ROOM`` also covers a quota the tenant cannot make room in (all pinned).
        ``reservation`` holds ``block.data`` (tiers.hierarchy.Hierarchy.put).
        """
        permit = await self.check_write(key, token)
        if ctx.quota_bytes is None:
            return await self._store(key, block, permit, reservation)
        lock = self._quota_locks.setdefault(ctx.tenant, asyncio.Lock())
        async with lock:
            if not self.hierarchy.contains(key):
                tenant = Tenant(ctx.tenant, "", ctx.quota_bytes)
                used = self.hierarchy.tenant_bytes(ctx.tenant)
                incoming = self.hierarchy.charge_of(block.meta.size)
                plan = plan_quota(tenant, used_bytes=used, incoming_bytes=incoming)
                if plan.evict_bytes > 0:
                    # Only this tenant's own blocks go, coldest tier first.
                    freed = await self.hierarchy.shed(ctx.tenant, plan.evict_bytes)
                    if freed < plan.evict_bytes:
                        return StoreOutcome.NO_ROOM
            return await self._store(key, block, permit, reservation)

    async def check_write(self, key: str, token: int | None) -> WritePermit:
        """May a PUT of ``key`` with ``token`` happen now? 409 (raises) when a lease forbids it."""
        leases = self.leases
        if isinstance(leases, RedisLeaseTable):
            return await leases.check_write(key, token)
        return leases.check_write(key, token)

    async def _store(
        self, key: str, block: Block, permit: WritePermit, reservation: Reservation | None
    ) -> StoreOutcome:
        if isinstance(self.leases, RedisLeaseTable):
            return await self._store_shared(self.leases, key, block, permit, reservation)
        leases = self.leases
        current = permit

        def still_admitted() -> bool:
            # Re-run the fencing rule at the moment of publication: the lease may have expired
            # or been granted to someone else while the bytes were being stored.
            nonlocal current
            try:
                current = leases.check_write(key, permit.token)
            except (LeaseConflict, StaleToken):
                return False
            return True

        outcome = await self.hierarchy.put(
            key, block, publish_if=still_admitted, reservation=reservation
        )
        if outcome is StoreOutcome.FENCED:
            self._lease_event("stale", key)
            leases.check_write(key, permit.token)  # raises the reason, as a 409
            raise StaleToken(
                f"the write lease on {client_key(key)!r} was lost before the block was stored"
            )
        visible = outcome in (StoreOutcome.STORED, StoreOutcome.EXISTS)
        lease_id, token = current.lease_id, current.token
        # Wakes the waiters: the block is visible (stored now, or by an earlier writer).
        committed = (
            visible
            and lease_id is not None
            and token is not None
            and leases.commit(lease_id, token)
        )
        if committed:
            self._lease_event("committed", key)
        return outcome

    async def _store_shared(
        self,
        leases: RedisLeaseTable,
        key: str,
        block: Block,
        permit: WritePermit,
        reservation: Reservation | None,
    ) -> StoreOutcome:
        # The fence is checked by the remote tier in the same Redis script that publishes the
        # block: no gateway can grant the key to a newer writer in between.
        outcome = await self.hierarchy.put(
            key, block, fence=leases.fence_for(permit), reservation=reservation
        )
        if outcome is StoreOutcome.FENCED:
            self._lease_event("stale", key)
            await leases.check_write(key, permit.token)  # raises the reason, as a 409
            raise StaleToken(
                f"the write lease on {client_key(key)!r} was lost before the block was stored"
            )
        visible = outcome in (StoreOutcome.STORED, StoreOutcome.EXISTS)
        lease_id, token = permit.lease_id, permit.token
        # Wakes the waiters on every gateway: the block is visible.
        committed = (
            visible
            and lease_id is not None
            and token is not None
            and await leases.commit(lease_id, token, key=key)
        )
        if committed:
            self._lease_event("committed", key)
        return outcome

    def _lease_event(self, event: str, key: str) -> None:
        if self.metrics is not None:
            self.metrics.lease_event(event, tenant=split_key(key)[0])

    # -- leases -------------------------------------------------------------------------------

    async def acquire(self, key: str, ttl_ms: int) -> Granted | Held | Exists:
        if await self._present(key):
            return EXISTS
        answer = await self.leases.acquire(key, ttl_ms)
        if isinstance(answer, Granted) and await self._present(key):
            # Stored by an unleased writer while a token epoch was being reserved.
            await self.release(answer.lease_id)
            return EXISTS
        self._lease_event("granted" if isinstance(answer, Granted) else "conflict", key)
        return answer

    async def renew(
        self, lease_id: str, ttl_ms: int | None = None, *, tenant: str | None = None
    ) -> int:
        leases = self.leases
        if isinstance(leases, RedisLeaseTable):
            return await leases.renew(lease_id, ttl_ms, tenant=tenant)
        return leases.renew(lease_id, ttl_ms, tenant=tenant)

    async def release(self, lease_id: str, *, tenant: str | None = None) -> bool:
        leases = self.leases
        if isinstance(leases, RedisLeaseTable):
            return await leases.release(lease_id, tenant=tenant)
        return leases.release(lease_id, tenant=tenant)

    async def _present(self, key: str) -> bool:
        if self.hierarchy.contains(key):
            return True
        return self.hierarchy.shared is not None and bool(await self.hierarchy.lookup_shared([key]))

    # -- reads --------------------------------------------------------------------------------

    async def get(self, key: str, *, wait_ms: int = 0, pin_ms: int | None = None) -> Hit | None:
        """A read that may wait for an outstanding write lease's commit, and may pin the block."""
        hit = await self.hierarchy.get(key)
        if hit is None and wait_ms > 0:
            # No await between the miss and parking: a commit cannot slip in unseen.
            waiting = self.leases.wait(key, wait_ms)
            try:
                outcome = await (
                    waiting
                    if self.metrics is None
                    else traced_lease_wait(self.metrics, key, waiting)
                )
            except LeaseStoreUnavailable as exc:
                # Reads are served while the shared lease store is down: with no lease to wait
                # on that can be known, the read is the miss it already was.
                log.warning("cannot wait for a writer, the lease store is down: %s", exc)
                return None
            # Shared leases: awaits came between the miss and parking, so a block committed
            # meanwhile shows up as NO_LEASE; read again either way.
            again = outcome is WaitOutcome.COMMITTED or (
                outcome is WaitOutcome.NO_LEASE and isinstance(self.leases, RedisLeaseTable)
            )
            if again:
                hit = await self.hierarchy.get(key)
        if hit is not None and pin_ms is not None:
            self.pins.pin(key, hit.block.meta.size, ttl_ms=pin_ms)
        return hit

    async def lookup(
        self, keys: Sequence[str], *, pin_ms: int | None = None
    ) -> tuple[list[str], int]:
        """Tiers of the longest present prefix, and how many of those blocks were pinned (local
        blocks only: a block only the shared remote tier holds is not this gateway's to pin)."""
        tiers = await self.hierarchy.lookup_shared(keys)
        pinned = 0
        if pin_ms is not None:
            for key in keys[: len(tiers)]:
                size = self.hierarchy.size_of(key)
                if size is not None and self.pins.pin(key, size, ttl_ms=pin_ms) is not None:
                    pinned += 1
        return tiers, pinned

    async def delete(self, key: str) -> bool:
        self.pins.drop(key)
        removed = await self.hierarchy.delete(key)
        if removed and isinstance(self.leases, RedisLeaseTable):
            await self.leases.announce_delete(key)
        return removed

    def _shared_evicted(self, keys: list[str]) -> None:
        """A put here evicted ``keys`` from the shared tier (``remote_inclusive``): they leave
        every gateway's local tiers too, this one's now and the others' on the delete
        announcement. The local tiers thus hold a subset of the shared one; a block hot on any
        gateway stays in it, since local hits refresh the shared recency (docs/remote.md)."""
        for key in keys:
            self._drop_local(key)
        leases = self.leases
        if isinstance(leases, RedisLeaseTable):
            task = asyncio.get_running_loop().create_task(leases.announce_deletes(keys))
            self._announcing.add(task)
            task.add_done_callback(self._announcing.discard)

    def _drop_local(self, key: str) -> None:
        """Another gateway deleted ``key``: drop this gateway's copy too."""
        self.pins.drop(key)
        task = asyncio.get_running_loop().create_task(self.hierarchy.delete(key, local_only=True))
        self._drops.add(task)
        task.add_done_callback(self._drops.discard)

    # -- stats --------------------------------------------------------------------------------

    def lease_stats(self, tenant: str | None = None) -> LeaseStats:
        return self.leases.stats(tenant)

    def stop_waiting(self) -> int:
        return self.leases.stop_waiting()
