"""The tier hierarchy: the one place that decides where a block lives.

Tiers are ordered hottest first. A put lands in the hottest tier that admits it, making room there
by demoting that tier's policy victims one tier down (the last tier drops them). A hit in a colder
tier promotes the block toward the hottest tier in the background. Write-back is the default:
volatile tiers are spilled to the persistent tier on :meth:`Hierarchy.close`, so a graceful
restart comes back warm; write-through keeps a durable copy of every block from the start.

Concurrency (one event loop): a per-tier lock makes "make room, then store" atomic against other
stores into the same tier. Locks are always taken hottest to coldest, so demotion chains cannot
deadlock. A block in flight between tiers is kept in ``_moving``: it stays readable, it cannot be
picked as a victim, and a delete that races with the move is honoured when the move ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

from opentelemetry import trace
from opentelemetry.trace import Span

from tiers.base import (
    DroppingTier,
    HeldBlock,
    LendingTier,
    Loan,
    PinnableTier,
    PinnedBlock,
    PutOutcome,
    Reservation,
    ReservingTier,
    Tier,
    TierStats,
)
from tiers.block import TENANT_SEP, Block, split_key
from tiers.clock import SYSTEM_CLOCK, Clock
from tiers.errors import TierConfigError, TierError, TierIOError
from tiers.observe import (
    ATTR_BYTES,
    ATTR_HIT,
    ATTR_OUTCOME,
    ATTR_SOURCE,
    ATTR_TARGET,
    NULL_OBSERVER,
    TierObserver,
    child_span,
    key_attrs,
    note_failure,
    recording,
    tracer,
)
from tiers.policy import Access, EvictionPolicy, link_tiers, make_policy
from tiers.remote import REMOTE_TIER, Fence, RemoteTier
from tiers.usage import TenantUsage

log = logging.getLogger(__name__)


class StoreOutcome(enum.Enum):
    STORED = "stored"
    EXISTS = "exists"
    NO_ROOM = "no_room"  # nothing evictable in any tier that could hold it
    TOO_LARGE = "too_large"  # larger than every tier
    FENCED = "fenced"  # the caller's publish check refused it at the last moment: nothing visible


@dataclass(frozen=True, slots=True)
class Hit:
    block: Block
    tier: str


@dataclass(frozen=True, slots=True)
class PinnedHit:
    """A hit whose bytes are lent, not copied: call ``block.release()`` when done with them."""

    block: PinnedBlock
    tier: str


@dataclass(frozen=True, slots=True)
class HierarchyConfig:
    write_through: bool = False
    promote_on_hit: bool = True
    spill_on_close: bool = True
    spill_behind: int = 0
    """Demotions into the persistent tier that may run in the background at once (0: none,
    every demotion completes before the store that caused it)."""
    shed_when_disk_behind: bool = False
    """With ``spill_behind`` slots all busy: drop the victim (True) or wait for a slot."""
    min_charge_bytes: int = 0
    """The least a block counts against its tenant's bytes (:meth:`Hierarchy.charge_of`). The
    gateway sets one arena page, what a memory tier gives even an empty block: counted by
    their length, a flood of tiny blocks would fill every tier inside any quota."""


# Chain positions remembered (key -> depth, parent), and looked-up hits whose next read is not
# counted again (see Hierarchy.note_request). A block's position never changes (its key names
# its whole prefix), so forgetting the oldest costs only a hint.
CHAIN_MEMORY = 1 << 16
NOTED_MEMORY = 1 << 12


@dataclass(slots=True)
class _Loc:
    tier: int
    size: int
    expires_at: float | None
    durable: bool = False  # write-through: a copy also lives on the persistent tier


class Hierarchy:
    def __init__(
        self,
        tiers: Sequence[Tier],
        *,
        policies: Sequence[EvictionPolicy] | None = None,
        config: HierarchyConfig | None = None,
        clock: Clock = SYSTEM_CLOCK,
        is_pinned: Callable[[str], bool] | None = None,
        observer: TierObserver = NULL_OBSERVER,
        shared: RemoteTier | None = None,
    ) -> None:
        if not tiers:
            raise TierConfigError("a hierarchy needs at least one tier")
        if policies is not None and len(policies) != len(tiers):
            raise TierConfigError("one policy per tier")
        self._tiers = list(tiers)
        self._policies = list(policies) if policies is not None else [make_policy() for _ in tiers]
        link_tiers(self._policies)
        self._config = config or HierarchyConfig()
        self._clock = clock
        self._is_pinned = is_pinned
        self._locks = [asyncio.Lock() for _ in tiers]
        self._index: dict[str, _Loc] = {}
        self._moving: dict[str, Hit] = {}
        # Blocks in _moving whose bytes are a loan (tiers.base.Loan) of the tier they left.
        self._loaned: dict[str, Loan] = {}
        self._deleted_while_moving: set[str] = set()
        self._storing: dict[str, asyncio.Future[StoreOutcome]] = {}
        self._background: set[asyncio.Task[None]] = set()
        # Remote hits being copied into the local tiers: key -> the read's ticket (delete()
        # takes it back, which fences the copy off).
        self._admitting: dict[str, object] = {}
        # Reads the index answered for a tier without asking it: misses all the same.
        self._index_miss_counts = [0] * len(self._tiers)
        self._shared = shared
        """Below every local tier: written through on put, read on a local miss (``--remote``)."""
        names = [t.name for t in self._tiers]
        # What each tenant holds and reads, per tier (the shared tier last): quotas and the
        # tenant's own /v1/stats.
        self._usage = TenantUsage(names if shared is None else [*names, shared.name])
        self._persistent = next(
            (i for i in range(len(self._tiers) - 1, -1, -1) if not self._tiers[i].volatile), None
        )
        self._chain: OrderedDict[str, tuple[int, str | None]] = OrderedDict()
        self._noted: OrderedDict[str, None] = OrderedDict()
        self._promotions = [0] * len(tiers)
        self._demotions = [0] * len(tiers)
        self.observer = observer
        """Per-operation metrics (:mod:`tiers.observe`); the application may replace it."""
        # isinstance against a runtime Protocol is slow: decided once, not per read.
        self._pinnable = [isinstance(t, PinnableTier) for t in self._tiers]
        self._lending = [isinstance(t, LendingTier) for t in self._tiers]
        self._dropping = [isinstance(t, DroppingTier) for t in self._tiers]
        self._reserving = [isinstance(t, ReservingTier) for t in self._tiers]
        spill_behind = self._config.spill_behind
        self._shed = [0] * len(tiers)
        self._spill_slots = asyncio.Semaphore(spill_behind) if spill_behind > 0 else None

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def tiers(self) -> list[Tier]:
        return list(self._tiers)

    @property
    def policies(self) -> list[EvictionPolicy]:
        return list(self._policies)

    @property
    def shared(self) -> RemoteTier | None:
        return self._shared

    async def open(self) -> None:
        """Index what the persistent tiers already hold (a restart comes back warm)."""
        now = self._clock.time()
        for i, tier in enumerate(self._tiers):
            present = tier.keys()
            for key in present:
                if key in self._index:
                    continue
                expires_at = _expiry_hint(tier, key)
                if expires_at is not None and now >= expires_at:
                    await self._drop_expired(tier, key)
                    continue
                size = _size_hint(tier, key)
                self._index_new(key, _Loc(i, size, expires_at))
                self._policies[i].on_insert(self._access(key, size))

    async def _drop_expired(self, tier: Tier, key: str) -> None:
        # Expired while the gateway was down: reclaim the bytes now rather than on eviction.
        try:
            await tier.delete(key)
        except TierError as exc:
            log.warning("could not drop expired block %r from %s: %s", key, tier.name, exc)

    async def close(self) -> None:
        await self.quiesce()
        if self._config.spill_on_close:
            spilled = await self.spill()
            if spilled:
                log.info("spilled %d volatile blocks to the persistent tier", spilled)
        for tier in self._tiers:
            await tier.close()
        if self._shared is not None:
            await self._shared.close()

    async def quiesce(self) -> None:
        """Wait until background promotions and prefetches are done, and the shared tier has
        been told of the local hits."""
        # Only tasks not yet done: a finished one stays in the set until its done callback
        # runs, and since Python 3.12 gathering only finished tasks completes without yielding
        # to the loop, so that callback would never run and this would spin.
        while pending := [task for task in self._background if not task.done()]:
            await asyncio.gather(*pending, return_exceptions=True)
        if self._shared is not None:
            await self._shared.flush_accesses()

    # -- reads -----------------------------------------------------------------------------

    def locate(self, key: str) -> str | None:
        moving = self._moving.get(key)
        if moving is not None:
            return None if key in self._deleted_while_moving else moving.tier
        loc = self._index.get(key)
        if loc is None or self._expired(loc):
            return None
        return self._tiers[loc.tier].name

    def contains(self, key: str) -> bool:
        return self.locate(key) is not None

    def lookup(self, keys: Sequence[str]) -> list[str]:
        """Tiers of the longest run ``keys[0..n)`` that is entirely present."""
        found: list[str] = []
        for key in keys:
            tier = self.locate(key)
            if tier is None:
                break
            found.append(tier)
        return found

    def note_request(self, keys: Sequence[str]) -> None:
        """``keys`` are one prompt's chain of blocks, looked up by a serving frontend that will
        read the present prefix and store the rest.

        The policies learn the request here, in chain order with each block's depth and parent,
        the way the trace simulator replays it (loadtest.simulate): a present block is a hit in
        its tier and a miss above, an absent one a miss everywhere. The next read of each hit
        is then not counted a second time (a block touched twice at once would look reused to
        LRU-2), and later accesses to these keys carry their chain position (the clamp that
        keeps chains from being cut at the head).
        """
        chain = self._chain
        noted = self._noted
        prev: str | None = None
        now = self._clock.time()
        for depth, key in enumerate(keys):
            chain[key] = (depth, prev)
            chain.move_to_end(key)
            if key not in self._moving:
                loc = self._index.get(key)
                access = Access(key, now=now, depth=depth, prev=prev)
                if loc is None or self._expired(loc):
                    self._touch(access, None)
                else:
                    self._touch(access, loc.tier)
                    noted[key] = None
                    noted.move_to_end(key)
            prev = key
        while len(chain) > CHAIN_MEMORY:
            chain.popitem(last=False)
        while len(noted) > NOTED_MEMORY:
            noted.popitem(last=False)

    def _access(self, key: str, size: int = 1) -> Access:
        position = self._chain.get(key)
        now = self._clock.time()
        if position is None:
            return Access(key, size, now)
        return Access(key, size, now, position[0], position[1])

    def _touch(self, access: Access, idx: int | None) -> None:
        """Tell the policies of a read: a hit in tier ``idx`` (a miss above), or a miss."""
        if self._noted and self._noted.pop(access.key, 0) is None:
            return  # counted when its request was looked up (note_request)
        policies = self._policies
        if idx is None:
            for policy in policies:
                policy.on_miss(access)
            return
        for policy in policies[:idx]:
            policy.on_miss(access)
        policies[idx].on_hit(access)

    async def lookup_shared(self, keys: Sequence[str]) -> list[str]:
        """As :meth:`lookup`, counting blocks only the shared remote tier holds (``remote``)."""
        found = self.lookup(keys)
        if self._shared is None or len(found) == len(keys):
            return found
        rest = keys[len(found) :]
        try:
            present = await self._shared.present(rest)
        except TierError as exc:
            log.warning("remote tier failed a lookup; answering from the local tiers: %s", exc)
            note_failure(trace.get_current_span(), exc, what="lookup")
            return found
        for key, remote in zip(rest, present, strict=True):
            local = self.locate(key)
            if local is not None:
                found.append(local)
            elif remote:
                found.append(REMOTE_TIER)
            else:
                break
        return found

    async def get(self, key: str, *, hint: Access | None = None) -> Hit | None:
        access = hint or self._access(key)
        tenant = split_key(key)[0]
        moving = self._moving.get(key)
        if moving is not None:
            if key in self._deleted_while_moving:
                self._note_read(tenant, None)
                return None
            self._note_read(tenant, moving.tier)
            if key in self._loaned:
                # Lent pages are reused once the move ends, and a reader may hold the bytes
                # longer than that (a response waiting on a slow socket): it gets a copy.
                lent = moving.block
                return Hit(Block(bytes(lent.data), lent.meta), moving.tier)
            return moving
        loc = self._index.get(key)
        if loc is None:
            self._touch(access, None)
            self._index_misses(key, len(self._tiers))
            hit = None if self._shared is None else await self._get_shared(key)
            self._note_read(tenant, None if hit is None else hit.tier)
            return hit
        if self._expired(loc):
            await self._delete_quietly(key)
            self._index_misses(key, len(self._tiers))
            self._note_read(tenant, None)
            return None
        idx = loc.tier
        tier = self._tiers[idx]
        self._index_misses(key, idx)
        block = await self._read(tier, key)
        if block is None:
            if self._index.get(key) is loc and (loc.tier != idx or key in self._moving):
                # It moved (a promotion or demotion) while this read awaited: read it there.
                return await self.get(key, hint=hint)
            # Lost or corrupt: the tier dropped it; forget it everywhere above.
            if self._index.get(key) is loc:
                self._forget(key)
            self._note_read(tenant, None)
            return None
        self._note_read(tenant, tier.name)
        self._touch(access, idx)
        if self._shared is not None:
            self._shared.note_access(key)
        if idx > 0 and self._config.promote_on_hit:
            self._spawn(self._promote(key, block))
        return Hit(block, tier.name)

    async def get_pinned(self, key: str) -> PinnedHit | None:
        """As :meth:`get`, but a block in a pinnable tier (the arenas) is lent, not copied: its
        storage is not reused until the caller releases it. Other hits come back as copies."""
        loc = self._index.get(key)
        pinnable = loc is not None and self._pinnable[loc.tier] and key not in self._moving
        if loc is None or not pinnable or self._expired(loc):
            hit = await self.get(key)
            return None if hit is None else PinnedHit(HeldBlock(hit.block), hit.tier)
        # Known pinnable from the check in __init__ (self._pinnable).
        name = self._tiers[loc.tier].name
        pinned = cast(PinnableTier, self._tiers[loc.tier]).pin(key)
        if pinned is None:
            hit = await self.get(key)  # lost under us: get() does the bookkeeping of a miss
            return None if hit is None else PinnedHit(HeldBlock(hit.block), hit.tier)
        idx = loc.tier
        self._index_misses(key, idx)
        tenant = split_key(key)[0]
        self.observer.tier_get(name, 0.0, True, tenant=tenant)
        self._note_read(tenant, name)
        self._touch(self._access(key), idx)
        if self._shared is not None:
            self._shared.note_access(key)
        if idx > 0 and self._config.promote_on_hit:
            views = pinned.views()
            if views is not None:
                # The promotion gets its own copy: the reader may release the pages any time.
                data = views[0].tobytes() if len(views) == 1 else b"".join(views)
                self._spawn(self._promote(key, Block(data, pinned.meta)))
        return PinnedHit(pinned, name)

    # -- writes ----------------------------------------------------------------------------

    def reserve(self, nbytes: int) -> Reservation | None:
        """Room to receive a block of ``nbytes`` in place, for :meth:`put`'s ``reservation``:
        from the hottest tier that reserves (a CPU arena with landing pages), ``None`` when none
        can right now. Nothing is evicted for it; the put makes room as usual."""
        for tier, reserving in zip(self._tiers, self._reserving, strict=True):
            if reserving:
                reservation = cast(ReservingTier, tier).reserve(nbytes)
                if reservation is not None:
                    return reservation
        return None

    async def put(
        self,
        key: str,
        block: Block,
        *,
        publish_if: Callable[[], bool] | None = None,
        fence: Fence | None = None,
        local_only: bool = False,
        reservation: Reservation | None = None,
    ) -> StoreOutcome:
        """Store ``block`` under ``key`` unless present (first writer wins).

        ``reservation`` (from :meth:`reserve`) holds ``block.data``: the tier that made it
        takes its storage over instead of copying the bytes in. The caller releases it after
        this returns, whatever the outcome (a no-op once adopted).

        ``publish_if`` is asked at the last synchronous point before the block becomes visible
        (after it is staged in a tier, before it is indexed): ``False`` unstages it and answers
        ``FENCED``, so a writer that lost its lease while its bytes were being stored never
        publishes them.

        With a shared remote tier the block is written through to it first, under ``fence``
        (checked atomically with the remote publication: the cross-gateway form of
        ``publish_if``). A block another gateway already stored answers ``EXISTS``; a remote
        tier that fails leaves the block local only. ``local_only`` skips the remote write
        (a block that came from there).
        """
        while True:
            # A key deleted while it moves between tiers is gone for readers, but cannot be
            # stored again until the move has ended (its clean-up would remove the new copy).
            if key in self._moving or self.contains(key):
                return StoreOutcome.EXISTS
            stale = self._index.get(key)
            if stale is not None and self._expired(stale):
                # Past its TTL: drop it first, or the new block would inherit its index entry
                # (the old expiry, size and tenant bytes) and never be served.
                await self.delete(key, local_only=True)
                continue
            pending = self._storing.get(key)
            if pending is None:
                break
            # Same key stored concurrently: first writer wins, the others see it present.
            outcome = await asyncio.shield(pending)
            if outcome is not StoreOutcome.FENCED:
                return StoreOutcome.EXISTS if outcome is StoreOutcome.STORED else outcome
            # The first writer was fenced off and published nothing: this one may still.
        future: asyncio.Future[StoreOutcome] = asyncio.get_running_loop().create_future()
        self._storing[key] = future
        try:
            if self._shared is None or local_only:
                outcome = await self._put_new(key, block, publish_if, reservation)
            else:
                outcome = await self._put_shared(
                    self._shared, key, block, publish_if, fence, reservation
                )
            future.set_result(outcome)
            return outcome
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody logs it as lost
            raise
        finally:
            del self._storing[key]

    async def _put_shared(
        self,
        shared: RemoteTier,
        key: str,
        block: Block,
        publish_if: Callable[[], bool] | None,
        fence: Fence | None,
        reservation: Reservation | None,
    ) -> StoreOutcome:
        with child_span("kvgate.tier.put") as span:
            if span.is_recording():
                span.set_attributes(key_attrs(key, shared.name))
                span.set_attribute(ATTR_BYTES, block.meta.size)
            started = self._clock.monotonic()
            try:
                remote: PutOutcome | None = await shared.put(key, block, fence=fence)
            except TierError as exc:
                log.warning("remote tier failed storing a block; keeping it local: %s", exc)
                note_failure(span, exc, what="put")
                remote = None
            label = "failed" if remote is None else remote.value
            self.observer.tier_put(
                shared.name,
                self._clock.monotonic() - started,
                label,
                tenant=split_key(key)[0],
            )
            if span.is_recording():
                span.set_attribute(ATTR_OUTCOME, label)
        if remote is PutOutcome.FENCED:
            return StoreOutcome.FENCED
        if remote is PutOutcome.EXISTS:
            return StoreOutcome.EXISTS  # another gateway's copy; it comes here on a read
        local = await self._put_new(key, block, publish_if, reservation)
        if remote is PutOutcome.STORED and local in (StoreOutcome.NO_ROOM, StoreOutcome.TOO_LARGE):
            return StoreOutcome.STORED  # stored where every gateway finds it
        return local

    async def _read(self, tier: Tier | RemoteTier, key: str) -> Block | None:
        """One traced, timed tier read; a tier that fails is a miss plus a span event."""
        with child_span("kvgate.tier.get") as span:
            if span.is_recording():
                span.set_attributes(key_attrs(key, tier.name))
            started = self._clock.monotonic()
            try:
                block = await tier.get(key)
            except TierError as exc:
                log.warning("tier %s failed reading a block; answering a miss: %s", tier.name, exc)
                note_failure(span, exc, what="get")
                block = None
            self.observer.tier_get(
                tier.name,
                self._clock.monotonic() - started,
                block is not None,
                tenant=split_key(key)[0],
            )
            if span.is_recording():
                span.set_attribute(ATTR_HIT, block is not None)
                if block is not None:
                    span.set_attribute(ATTR_BYTES, block.meta.size)
        return block

    async def _get_shared(self, key: str) -> Hit | None:
        shared = self._shared
        assert shared is not None
        # Taken before the read: a delete (here, or announced by another gateway) that lands
        # while the read or the copy below is under way takes it back, and the copy is fenced.
        ticket = object()
        self._admitting[key] = ticket
        try:
            block = await self._read(shared, key)
        except BaseException:
            self._end_admission(key, ticket)
            raise
        if block is None or not self._config.promote_on_hit:
            self._end_admission(key, ticket)
            return None if block is None else Hit(block, shared.name)
        self._spawn(self._admit_shared(key, block, ticket))
        return Hit(block, shared.name)

    async def _admit_shared(self, key: str, block: Block, ticket: object) -> None:
        """Keep a copy of a remote hit in the local tiers: the next read is local."""
        try:
            await self.put(
                key, block, local_only=True, publish_if=lambda: self._admitting.get(key) is ticket
            )
        finally:
            self._end_admission(key, ticket)

    def _end_admission(self, key: str, ticket: object) -> None:
        if self._admitting.get(key) is ticket:
            del self._admitting[key]

    async def _put_new(
        self,
        key: str,
        block: Block,
        publish_if: Callable[[], bool] | None,
        reservation: Reservation | None = None,
    ) -> StoreOutcome:
        size = block.meta.size
        if not any(t.could_ever_fit(size) for t in self._tiers):
            return StoreOutcome.TOO_LARGE
        access = self._access(key, size)
        last = len(self._tiers) - 1
        durable = False
        if self._config.write_through and self._persistent is not None:
            # The durable copy first: a block acknowledged under write-through survives a crash.
            if await self._store_at(self._persistent, key, block) is not PutOutcome.STORED:
                return StoreOutcome.NO_ROOM
            if publish_if is not None and not publish_if():
                await self._unstage(self._persistent, key)
                return StoreOutcome.FENCED
            durable = True
            self._index_new(key, _Loc(self._persistent, size, block.meta.expires_at, durable=True))
        for i, tier in enumerate(self._tiers):
            if durable and i >= self._persistent:  # type: ignore[operator]
                break
            if not tier.could_ever_fit(size):
                continue
            if i < last and not self._policies[i].admit(access):
                continue
            outcome = await self._store_at(i, key, block, reservation)
            if outcome is PutOutcome.STORED:
                if key in self._index:
                    self._relocate(key, self._index[key], i, counted=False)
                else:
                    # No await since the tier stored it: the check and the index entry that
                    # makes the block visible happen in one step of the event loop.
                    if publish_if is not None and not publish_if():
                        await self._unstage(i, key)
                        return StoreOutcome.FENCED
                    self._index_new(key, _Loc(i, size, block.meta.expires_at))
                return StoreOutcome.STORED
        return StoreOutcome.STORED if durable else StoreOutcome.NO_ROOM

    async def delete(self, key: str, *, local_only: bool = False) -> bool:
        """Remove ``key`` from every tier (the shared remote one too, unless ``local_only``).

        Raises :class:`TierIOError` when the shared tier could not delete it: the local copies
        are gone, but other gateways may still serve the block, so the caller must not report
        the delete as done.
        """
        if key in self._moving:
            self._deleted_while_moving.add(key)
        # A remote hit being copied into the local tiers must not publish after this.
        self._admitting.pop(key, None)
        remote = False
        remote_failure: TierError | None = None
        if self._shared is not None and not local_only:
            try:
                remote = await self._shared.delete(key)
            except TierError as exc:
                log.warning("remote tier failed deleting a block: %s", exc)
                note_failure(trace.get_current_span(), exc, what="delete")
                remote_failure = exc
        removed = await self._delete_local(key) or remote
        if remote_failure is not None:
            raise TierIOError(
                f"the shared tier could not delete the block: {remote_failure}"
            ) from remote_failure
        return removed

    async def _delete_quietly(self, key: str) -> None:
        """A delete the hierarchy decides itself (expiry, quota): a remote failure is logged."""
        # Logged by delete(); an expired remote copy is absent to readers anyway.
        with contextlib.suppress(TierIOError):
            await self.delete(key)

    async def _delete_local(self, key: str) -> bool:
        loc = self._index.get(key)
        if loc is None:
            return key in self._moving
        self._forget(key)
        removed = False
        for i, tier in enumerate(self._tiers):
            if i == loc.tier or (loc.durable and i == self._persistent) or tier.contains(key):
                self._policies[i].on_remove(key)
                try:
                    removed = await tier.delete(key) or removed
                except TierError as exc:
                    log.warning("tier %s failed deleting a block: %s", tier.name, exc)
                    note_failure(trace.get_current_span(), exc, what="delete")
        return True

    async def shed(self, tenant: str, nbytes: int) -> int:
        """Drop at least ``nbytes`` of ``tenant``'s own blocks, coldest tier first; bytes freed.

        For quotas: victims come from each tier's policy, restricted to the tenant's keys and
        skipping pinned or moving blocks, so another tenant's data is never touched. Dropped
        blocks leave every tier (a quota counts a block once, wherever it lives). Frees less
        than asked when the tenant has nothing more that may go.
        """
        prefix = tenant + TENANT_SEP
        freed = 0

        def not_ours(key: str) -> bool:
            return not key.startswith(prefix) or self._excluded(key)

        for i in range(len(self._tiers) - 1, -1, -1):
            policy = self._policies[i]
            while freed < nbytes:
                victim = policy.victim(not_ours)
                if victim is None:
                    break
                loc = self._index.get(victim)
                if loc is None:
                    policy.on_remove(victim)  # a stale policy entry: forget it and go on
                    continue
                await self._delete_quietly(victim)
                freed += self.charge_of(loc.size)
        return freed

    def charge_of(self, size: int) -> int:
        """What a block of ``size`` bytes counts against its tenant (:meth:`tenant_bytes`)."""
        return max(size, self._config.min_charge_bytes)

    def size_of(self, key: str) -> int | None:
        """The block's size in bytes if it is present (an index look-up, no I/O)."""
        moving = self._moving.get(key)
        if moving is not None:
            return moving.block.meta.size
        loc = self._index.get(key)
        return None if loc is None or self._expired(loc) else loc.size

    async def prefetch(self, keys: Sequence[str]) -> int:
        """Schedule promotion of the colder ones among ``keys``; returns how many."""
        scheduled = 0
        for key in keys:
            loc = self._index.get(key)
            if loc is None and self._shared is not None and key not in self._moving:
                self._spawn(self._prefetch_shared(key))
                scheduled += 1
                continue
            if loc is None or loc.tier == 0 or key in self._moving:
                continue
            self._spawn(self._prefetch_one(key))
            scheduled += 1
        return scheduled

    async def spill(self) -> int:
        """Copy every volatile-only block to the persistent tier, coldest tier first."""
        if self._persistent is None:
            return 0
        spilled = 0
        for i in range(self._persistent - 1, -1, -1):
            tier = self._tiers[i]
            # Insertion order, oldest first: the disk policy then sees the hottest blocks last.
            present = tier.keys()
            for key in present:
                loc = self._index.get(key)
                if loc is None or loc.durable or loc.tier != i or self._expired(loc):
                    continue
                try:
                    block = await tier.get(key)
                except TierError:
                    block = None
                if block is None:
                    continue
                if await self._store_at(self._persistent, key, block) is PutOutcome.STORED:
                    loc.durable = True
                    spilled += 1
        return spilled

    # -- stats -----------------------------------------------------------------------------

    def stats(self) -> list[TierStats]:
        """Hottest first; the shared remote tier last, with its totals as last refreshed."""
        local = [
            replace(stats, misses=stats.misses + self._index_miss_counts[i])
            for i, stats in enumerate(tier.stats() for tier in self._tiers)
        ]
        return local if self._shared is None else [*local, self._shared.stats()]

    async def refresh_shared(self) -> None:
        """Re-read the shared remote tier's totals (bytes, blocks) for :meth:`stats`."""
        if self._shared is None:
            return
        try:
            await self._shared.refresh()
        except TierError as exc:
            log.warning("remote tier failed its stats; showing the last ones: %s", exc)

    def promotions(self, tenant: str | None = None) -> dict[str, int]:
        """Blocks promoted out of each tier: all of them, or only ``tenant``'s."""
        counts = self._promotions if tenant is None else self._usage.promotions(tenant)
        return {t.name: n for t, n in zip(self._tiers, counts, strict=False)}

    def demotions(self, tenant: str | None = None) -> dict[str, int]:
        """Blocks demoted out of each tier: all of them, or only ``tenant``'s."""
        counts = self._demotions if tenant is None else self._usage.demotions(tenant)
        return {t.name: n for t, n in zip(self._tiers, counts, strict=False)}

    def shed_counts(self) -> dict[str, int]:
        """Victims dropped instead of demoted because the disk was behind, per source tier."""
        return {t.name: n for t, n in zip(self._tiers, self._shed, strict=True)}

    def tenant_bytes(self, tenant: str) -> int:
        """Bytes ``tenant`` holds over all tiers, each block counted as :meth:`charge_of`."""
        return self._usage.total(tenant)

    def tenant_usage(self) -> dict[str, int]:
        """Bytes held per tenant over all tiers (a copy)."""
        return self._usage.totals()

    def tenant_stats(self, tenant: str) -> list[TierStats]:
        """As :meth:`stats`, but only ``tenant``'s share of each tier: its bytes and blocks, the
        reads it made and its blocks evicted; capacities are the tiers' own. The shared remote
        tier's holdings are not known per tenant (its totals would tell of every other tenant
        on every gateway): they show as 0, with this tenant's reads."""
        return [
            replace(
                stats,
                used_bytes=row.used_bytes,
                blocks=row.blocks,
                hits=row.hits,
                misses=row.misses,
                evictions=row.evictions,
            )
            for stats, row in zip(self.stats(), self._usage.tiers(tenant), strict=True)
        ]

    def __len__(self) -> int:
        return len(self._index)

    # -- internals -------------------------------------------------------------------------

    def _shedding(self, i: int, key: str) -> bool:
        """Whether demoting ``key`` out of tier ``i`` now would wait for a busy disk."""
        loc = self._index.get(key)
        return (
            self._config.shed_when_disk_behind
            and self._spill_slots is not None
            and self._spill_slots.locked()
            and i + 1 == self._persistent
            and loc is not None
            and loc.tier == i
            and not loc.durable
        )

    def _expired(self, loc: _Loc) -> bool:
        return loc.expires_at is not None and self._clock.time() >= loc.expires_at

    def _excluded(self, key: str) -> bool:
        return key in self._moving or (self._is_pinned is not None and self._is_pinned(key))

    def _index_new(self, key: str, loc: _Loc) -> None:
        """Make ``key`` visible at ``loc`` (all index entries are made here)."""
        self._index[key] = loc
        self._usage.hold(split_key(key)[0], loc.tier, self.charge_of(loc.size))

    def _relocate(self, key: str, loc: _Loc, tier: int, *, counted: bool = True) -> None:
        """``key`` now lives in ``tier`` (every move of an index entry is made here). A counted
        move is a promotion or a demotion out of the tier it left; an uncounted one is a write
        settling where it landed."""
        src = loc.tier
        self._usage.move(split_key(key)[0], src, tier, self.charge_of(loc.size), counted=counted)
        if counted and tier != src:
            (self._promotions if tier < src else self._demotions)[src] += 1
        loc.tier = tier

    def _note_read(self, tenant: str, tier: str | None) -> None:
        self._usage.read(tenant, tier)
        self.observer.block_read(tenant, tier)

    def _forget(self, key: str) -> None:
        loc = self._index.pop(key, None)
        if loc is not None:
            self._usage.drop(split_key(key)[0], loc.tier, self.charge_of(loc.size))

    async def _unstage(self, i: int, key: str) -> None:
        """Take back a block stored in tier ``i`` but never indexed (so never visible)."""
        self._policies[i].on_remove(key)
        try:
            await self._tiers[i].delete(key)
        except TierError as exc:
            log.warning("tier %s failed dropping a fenced block: %s", self._tiers[i].name, exc)

    def _index_misses(self, key: str, upto: int) -> None:
        """Tiers ``[0, upto)`` miss: the index says so, none of them is touched."""
        observer = self.observer
        counts = self._index_miss_counts
        tenant = split_key(key)[0]
        for i, tier in enumerate(self._tiers[:upto]):
            counts[i] += 1
            observer.tier_get(tier.name, None, False, tenant=tenant)
        if upto and recording():
            # One span per tier all the same, so a trace shows where the read went looking.
            for tier in self._tiers[:upto]:
                attrs = key_attrs(key, tier.name)
                attrs[ATTR_HIT] = False
                attrs[ATTR_SOURCE] = "index"
                tracer().start_span("kvgate.tier.get", attributes=attrs).end()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _store_at(
        self, i: int, key: str, block: Block, reservation: Reservation | None = None
    ) -> PutOutcome:
        """Store into tier ``i``, demoting its victims until the block fits."""
        tier = self._tiers[i]
        size = block.meta.size
        if not tier.could_ever_fit(size):
            return PutOutcome.TOO_LARGE
        with child_span("kvgate.tier.put") as span:
            if span.is_recording():
                span.set_attributes(key_attrs(key, tier.name))
                span.set_attribute(ATTR_BYTES, size)
            outcome = await self._store_locked(i, key, block, span, reservation)
            if span.is_recording():
                span.set_attribute(ATTR_OUTCOME, outcome.value)
            return outcome

    async def _store_locked(
        self, i: int, key: str, block: Block, span: Span, reservation: Reservation | None
    ) -> PutOutcome:
        tier = self._tiers[i]
        size = block.meta.size
        async with self._locks[i]:
            while not tier.fits(size):
                victim = self._policies[i].victim(self._excluded)
                if victim is None:
                    return PutOutcome.NO_ROOM
                await self._demote(i, victim)
            started = self._clock.monotonic()
            try:
                adopted = (
                    cast(ReservingTier, tier).adopt(key, reservation, block.meta)
                    if reservation is not None and self._reserving[i]
                    else None
                )
                if adopted is not None and span.is_recording():
                    # Received in place: no copy into the tier (tiers.base.Reservation).
                    span.set_attribute("kvgate.put.in_place", True)
                outcome = adopted if adopted is not None else await tier.put(key, block)
            except TierError as exc:
                log.warning("tier %s failed storing a block: %s", tier.name, exc)
                note_failure(span, exc, what="put")
                return PutOutcome.NO_ROOM
            self.observer.tier_put(
                tier.name,
                self._clock.monotonic() - started,
                outcome.value,
                tenant=split_key(key)[0],
            )
            if outcome is PutOutcome.STORED:
                self._policies[i].on_insert(self._access(key, size))
            return outcome

    async def _demote(self, i: int, key: str) -> None:
        with child_span("kvgate.tier.evict") as span:
            if span.is_recording():
                span.set_attributes(key_attrs(key, self._tiers[i].name))
            await self._demote_traced(i, key, span)

    async def _demote_traced(self, i: int, key: str, span: Span) -> None:
        tier = self._tiers[i]
        self._usage.evicted(split_key(key)[0], i)
        if self._shedding(i, key):
            # The disk is behind: drop the coldest block rather than stall the writer (and do
            # not copy it out of the arena first).
            self._policies[i].on_remove(key)
            self._forget(key)
            self._shed[i] += 1
            try:
                await tier.delete(key)
            except TierError as exc:
                log.warning("tier %s failed dropping a block: %s", tier.name, exc)
            if span.is_recording():
                span.set_attribute(ATTR_OUTCOME, "shed")
            return
        self._policies[i].on_remove(key)
        if i == len(self._tiers) - 1 and self._dropping[i]:
            # Nothing below takes it: evicted without being read back (and decoded) first.
            await self._drop_last(i, key, span)
            return
        # A loan skips the copy out of an arena: the next tier stores straight from its pages.
        # Not for a write-behind spill: that must give the pages back before the disk is done.
        write_behind = i + 1 == self._persistent and self._spill_slots is not None
        lend = self._lending[i] and not write_behind
        loan = cast(LendingTier, tier).lend(key) if lend else None
        try:
            await self._demote_block(i, key, loan, span)
        finally:
            if loan is not None and key not in self._loaned:
                loan.end()  # not handed to a move (which ends it once stored below)

    async def _drop_last(self, i: int, key: str, span: Span) -> None:
        tier = self._tiers[i]
        try:
            await cast(DroppingTier, tier).drop(key)
        except TierError as exc:
            log.warning("tier %s failed evicting a block: %s", tier.name, exc)
            note_failure(span, exc, what="evict")
        loc = self._index.get(key)
        if loc is None:
            return
        if span.is_recording():
            span.set_attribute(ATTR_BYTES, loc.size)
        if loc.tier == i:
            self._forget(key)
        elif i == self._persistent:
            loc.durable = False  # only the durable copy went; the block lives on above

    async def _demote_block(self, i: int, key: str, loan: Loan | None, span: Span) -> None:
        tier = self._tiers[i]
        block: Block | None
        if loan is not None:
            block = loan.block
        else:
            try:
                block = await tier.evict(key)
            except TierError as exc:
                log.warning("tier %s failed evicting a block: %s", tier.name, exc)
                note_failure(span, exc, what="evict")
                block = None
        if block is not None and span.is_recording():
            span.set_attribute(ATTR_BYTES, block.meta.size)
        loc = self._index.get(key)
        if block is None or loc is None:
            if loc is not None and loc.tier == i:
                self._forget(key)
            return
        if loc.tier != i:
            # Only a stale copy (the write-through original lives on); nothing to move.
            if i == self._persistent:
                loc.durable = False
            return
        if loc.durable and i + 1 == self._persistent:
            self._relocate(key, loc, i + 1)
            return
        if i == self._persistent and loc.durable:
            loc.durable = False
        below = i + 1
        if below >= len(self._tiers) or self._expired(loc):
            self._forget(key)
            return
        if span.is_recording():
            span.update_name("kvgate.tier.demote")
            span.set_attribute(ATTR_TARGET, self._tiers[below].name)
        self._moving[key] = Hit(block, tier.name)
        if loan is not None:
            self._loaned[key] = loan  # _move_down ends it
        if below == self._persistent and self._spill_slots is not None:
            # Write-behind: the block leaves this tier now (readable from memory while it moves)
            # and the slow durable write runs in the background, so a put making room here does
            # not wait for the disk. Only spill_behind writes at a time: past that, it waits.
            try:
                await self._spill_slots.acquire()
            except asyncio.CancelledError:
                # The writer that wanted the room gave up, but the victim has left this tier
                # already: its move goes on in the background instead of stranding it in
                # _moving (readable, yet unstorable and never freed).
                self._spawn(self._spill_when_free(i, below, key, loc, block))
                raise
            if span.is_recording():
                span.set_attribute(ATTR_OUTCOME, "spilling")  # the span ends before the write
            self._spawn(self._move_down(i, below, key, loc, block, span=None))
            return
        await self._move_down(i, below, key, loc, block, span=span)

    async def _spill_when_free(self, i: int, below: int, key: str, loc: _Loc, block: Block) -> None:
        assert self._spill_slots is not None
        await self._spill_slots.acquire()
        await self._move_down(i, below, key, loc, block, span=None)

    async def _move_down(
        self, i: int, below: int, key: str, loc: _Loc, block: Block, *, span: Span | None
    ) -> None:
        """Store the evicted ``block`` one tier down; ``span`` is None for a write-behind."""
        try:
            # A lent block is offered as a reservation: a tier sharing the lender's arena takes
            # its pages over instead of copying them (tiers.arena).
            outcome = await self._store_at(below, key, block, self._loaned.get(key))
        finally:
            del self._moving[key]
            loan = self._loaned.pop(key, None)
            if loan is not None:
                loan.end()
            if span is None and self._spill_slots is not None:
                self._spill_slots.release()
        if span is not None and span.is_recording():
            span.set_attribute(ATTR_OUTCOME, outcome.value)
        if key in self._deleted_while_moving:
            self._deleted_while_moving.discard(key)
            if outcome in (PutOutcome.STORED, PutOutcome.EXISTS):
                self._policies[below].on_remove(key)
                await self._tiers[below].delete(key)
            return
        if outcome in (PutOutcome.STORED, PutOutcome.EXISTS):
            self._relocate(key, loc, below)
        else:
            self._forget(key)

    async def _promote(self, key: str, block: Block) -> None:
        loc = self._index.get(key)
        if loc is None or loc.tier == 0 or key in self._moving:
            return
        with child_span("kvgate.tier.promote") as span:
            if span.is_recording():
                span.set_attributes(key_attrs(key, self._tiers[loc.tier].name))
                span.set_attribute(ATTR_BYTES, block.meta.size)
            target = await self._promote_traced(key, block, loc)
            if span.is_recording():
                span.set_attribute(ATTR_OUTCOME, "promoted" if target is not None else "stayed")
                if target is not None:
                    span.set_attribute(ATTR_TARGET, self._tiers[target].name)

    async def _promote_traced(self, key: str, block: Block, loc: _Loc) -> int | None:
        src = loc.tier
        access = self._access(key, block.meta.size)
        self._moving[key] = Hit(block, self._tiers[src].name)
        target: int | None = None
        try:
            for i in range(src):
                if not self._policies[i].admit(access):
                    continue
                if await self._store_at(i, key, block) is PutOutcome.STORED:
                    target = i
                    break
        finally:
            del self._moving[key]
        if key in self._deleted_while_moving:
            self._deleted_while_moving.discard(key)
            if target is not None:
                self._policies[target].on_remove(key)
                await self._tiers[target].delete(key)
            return None
        if target is None or self._index.get(key) is not loc:
            return None
        self._relocate(key, loc, target)
        if loc.durable and src == self._persistent:
            return target  # keep the durable copy where it is
        self._policies[src].on_remove(key)
        try:
            await self._tiers[src].delete(key)
        except TierError as exc:
            log.warning("tier %s failed dropping a promoted block: %s", self._tiers[src].name, exc)
            note_failure(trace.get_current_span(), exc, what="delete")
        return target

    async def _prefetch_shared(self, key: str) -> None:
        if self._shared is None or self.contains(key):
            return
        try:
            block = await self._shared.get(key)
        except TierError:
            block = None
        if block is not None:
            await self.put(key, block, local_only=True)

    async def _prefetch_one(self, key: str) -> None:
        loc = self._index.get(key)
        if loc is None or loc.tier == 0:
            return
        try:
            block = await self._tiers[loc.tier].get(key)
        except TierError:
            block = None
        if block is not None:
            await self._promote(key, block)


def _expiry_hint(tier: Tier, key: str) -> float | None:
    # A persistent tier remembers each block's TTL; without this a restart would serve it forever.
    expires_at_of = getattr(tier, "expires_at_of", None)
    if callable(expires_at_of):
        value = expires_at_of(key)
        return None if value is None else float(value)
    return None


def _size_hint(tier: Tier, key: str) -> int:
    size_of = getattr(tier, "size_of", None)
    if callable(size_of):
        return int(size_of(key))
    return 0
