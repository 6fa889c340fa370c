"""Write leases with fencing tokens, and single-flight waiters on them.

One writer per key: :meth:`LeaseTable.acquire` grants at most one live lease per key (the scoped
key string, ``tiers.block.scoped_key(tenant, key)``), each with a fencing token taken from its
tenant's counter, which only grows, across restarts too. Each tenant has its own so that the
tokens one tenant sees do not count the leases of the others. A PUT is admitted by
:meth:`LeaseTable.check_write` purely by comparing tokens, never by comparing times, so a
writer that stalled past its lease cannot overwrite the key once anyone else has been granted
it. Readers that want a block being written park in :meth:`LeaseTable.wait` and are woken by
the commit, release or expiry of that lease, never by polling. See ``docs/coherence.md`` for
the protocol as a whole.

Everything runs on one event loop; every operation is O(1) (a timer push is O(log n) in the
scheduler's heap).
"""

from __future__ import annotations

import asyncio
import enum
import math
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from coherence.errors import (
    BadRequest,
    CoherenceConfigError,
    CoherenceError,
    LeaseConflict,
    LeaseLost,
    LeaseNotFound,
    StaleToken,
)
from coherence.sched import LoopScheduler, Scheduler, Timer
from tiers.block import DEFAULT_TENANT, TENANT_SEP, client_key, scoped_key, tenant_of
from tiers.clock import SYSTEM_CLOCK, Clock

EPOCH_SPAN = 1_000_000
"""Tokens handed out per durable counter increment; epoch ``e`` owns ``[e*SPAN, (e+1)*SPAN)``."""

DEFAULT_MAX_TTL_MS = 60_000
DEFAULT_MAX_WAIT_MS = 60_000
DEFAULT_MAX_REMEMBERED = 65_536

_MAX_TOKEN_DIGITS = 19  # tokens stay far below 2**63; longer headers are malformed, not huge ints


# --- fencing tokens ---------------------------------------------------------------------------


class TokenStore(Protocol):
    """A durable counter: each call returns a value larger than any it returned before, ever.

    "Ever" includes before a crash: the increment must be durable before the value is returned.
    The disk tier's ``meta_incr`` and Redis ``INCR`` both fit (see :class:`MetaTokenStore`).
    """

    async def next_epoch(self) -> int: ...


class MemoryTokenStore:
    """An in-process :class:`TokenStore`; a "restart" is a new table over the same store."""

    def __init__(self, start: int = 0) -> None:
        self.epoch = start

    async def next_epoch(self) -> int:
        self.epoch += 1
        return self.epoch


class SupportsMetaIncr(Protocol):
    async def meta_incr(self, name: bytes) -> int: ...


class MetaTokenStore:
    """A :class:`TokenStore` over any durable ``meta_incr`` (the LMDB disk tier's, for one)."""

    def __init__(self, meta: SupportsMetaIncr, *, name: bytes = b"coherence.lease_epoch") -> None:
        self._meta = meta
        self._name = name

    async def next_epoch(self) -> int:
        return await self._meta.meta_incr(self._name)


class TokenAllocator:
    """Hands out fencing tokens from durably reserved epochs: one store write per ``span`` tokens.

    A restart reserves a fresh epoch, so it jumps past every token handed out before, whether or
    not the old epoch was used up. Tokens of an abandoned epoch are simply never issued.
    """

    def __init__(self, store: TokenStore, *, span: int = EPOCH_SPAN) -> None:
        if span < 1:
            raise CoherenceConfigError(f"token span must be >= 1, got {span}")
        self._store = store
        self._span = span
        self._next = 0
        self._limit = 0
        self._epoch = 0
        self._lock = asyncio.Lock()

    def available(self) -> bool:
        return self._next < self._limit

    def take(self) -> int:
        """The next token; only call when :meth:`available` (no await in between)."""
        if self._next >= self._limit:
            raise CoherenceError("no reserved token left: await refill() first")
        token = self._next
        self._next += 1
        return token

    async def refill(self) -> None:
        """Reserve a fresh epoch unless tokens are still available."""
        async with self._lock:
            if self.available():
                return
            epoch = await self._store.next_epoch()
            if epoch <= self._epoch or epoch < 1:
                raise CoherenceError(
                    f"token store went backwards: epoch {epoch} after {self._epoch}"
                )
            self._epoch = epoch
            self._next = epoch * self._span
            self._limit = (epoch + 1) * self._span


def parse_token(header: str | None) -> int | None:
    """The ``X-KV-Lease-Token`` header as a token; ``None`` when absent; 400 when malformed."""
    if header is None:
        return None
    text = header.strip()
    if not text or len(text) > _MAX_TOKEN_DIGITS or not text.isascii() or not text.isdigit():
        raise BadRequest("X-KV-Lease-Token must be a decimal integer")
    return int(text)


# --- results --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Granted:
    """You are the one writer of the key until ``expires_at_ms`` (wall clock, ms since epoch)."""

    lease_id: str
    token: int
    expires_at_ms: int

    def as_json(self) -> dict[str, object]:
        return {"lease_id": self.lease_id, "token": self.token, "expires_at_ms": self.expires_at_ms}


@dataclass(frozen=True, slots=True)
class Held:
    """Someone else is the writer; their lease runs out in ``retry_after_ms`` unless renewed."""

    retry_after_ms: int

    def as_json(self) -> dict[str, object]:
        return {"retry_after_ms": self.retry_after_ms}


@dataclass(frozen=True, slots=True)
class WritePermit:
    """What :meth:`LeaseTable.check_write` allowed.

    ``lease_id`` is set when the write is the live lease's own write: after the block is stored,
    the gateway calls ``commit(permit.lease_id, permit.token)``. It is ``None`` for a write with no
    lease at all (``token is None``) and for a late write by the newest, already expired, holder.
    """

    key: str
    token: int | None
    lease_id: str | None


class WaitOutcome(enum.Enum):
    COMMITTED = "committed"  # the writer committed: read the store again (200, or 404 if gone)
    GONE = "gone"  # the lease was released or expired without a commit: 404
    TIMEOUT = "timeout"  # wait_ms passed with the lease still outstanding: 404
    NO_LEASE = "no_lease"  # no lease was outstanding: read the store again, then 404


class LeaseState(enum.Enum):
    LIVE = "live"
    COMMITTED = "committed"
    RELEASED = "released"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class LeaseStats:
    live: int
    waiters: int
    remembered: int  # keys whose newest lease has ended but whose token is still remembered


@dataclass(slots=True, eq=False)
class _Lease:
    key: str
    lease_id: str
    token: int
    ttl_ms: int
    deadline: float  # clock.monotonic() seconds
    state: LeaseState = LeaseState.LIVE
    timer: Timer | None = None
    waiters: set[asyncio.Future[WaitOutcome]] = field(default_factory=set)


# --- the table ------------------------------------------------------------------------------


class LeaseTable:
    """All write leases of one gateway, keyed by scoped key.

    The table remembers, per key, the newest lease granted, live or ended; ended ones are
    forgotten oldest first beyond ``max_remembered`` keys. A PUT carrying a token the table does
    not remember for its key is refused (see :meth:`check_write`), so forgetting, like a restart,
    can only make the table refuse more, never accept a stale write.
    """

    def __init__(
        self,
        tokens: TokenStore,
        *,
        clock: Clock = SYSTEM_CLOCK,
        scheduler: Scheduler | None = None,
        max_ttl_ms: int = DEFAULT_MAX_TTL_MS,
        max_wait_ms: int = DEFAULT_MAX_WAIT_MS,
        max_remembered: int = DEFAULT_MAX_REMEMBERED,
        token_span: int = EPOCH_SPAN,
    ) -> None:
        if max_ttl_ms < 1 or max_wait_ms < 0 or max_remembered < 0:
            raise CoherenceConfigError("max_ttl_ms >= 1, max_wait_ms >= 0, max_remembered >= 0")
        if token_span < 1:
            raise CoherenceConfigError(f"token span must be >= 1, got {token_span}")
        self._tokens = tokens
        self._token_span = token_span
        # Per tenant, over the one durable epoch store: epochs are unique, so two tenants never
        # draw the same token, and a tenant's own sequence is all another could infer from.
        self._allocs: dict[str, TokenAllocator] = {}
        self._clock = clock
        self._sched: Scheduler = scheduler if scheduler is not None else LoopScheduler()
        self.max_ttl_ms = max_ttl_ms
        self.max_wait_ms = max_wait_ms
        self._max_remembered = max_remembered
        self._by_key: dict[str, _Lease] = {}
        self._by_id: dict[str, _Lease] = {}
        self._ended: dict[str, None] = {}  # insertion-ordered: the oldest ended key first
        self._live = 0
        self._waiting = 0
        self._stopped = False

    async def open(self, tenants: Iterable[str] = (DEFAULT_TENANT,)) -> None:
        """Reserve the first epoch of each of ``tenants`` now, so startup (not the first
        acquire) pays the disk write. Any other tenant reserves its own on its first acquire."""
        for tenant in tenants:
            await self._alloc_for(scoped_key(tenant, "")).refill()

    def _alloc_for(self, key: str) -> TokenAllocator:
        tenant = tenant_of(key)
        alloc = self._allocs.get(tenant)
        if alloc is None:
            alloc = self._allocs[tenant] = TokenAllocator(self._tokens, span=self._token_span)
        return alloc

    # -- acquire / renew / release ------------------------------------------------------------

    async def acquire(self, key: str, ttl_ms: int) -> Granted | Held:
        """Become the one writer of ``key`` for ``ttl_ms`` (clamped to ``max_ttl_ms``).

        ``Granted`` -> 201, ``Held`` -> 409 with ``retry_after_ms``. Whether the block already
        exists (200 ``{"exists": true}``) is the gateway's question to the store, asked first.
        Raises :class:`BadRequest` (400) for a ``ttl_ms`` that is not a positive integer.
        """
        ttl = self._ttl(ttl_ms)
        while True:
            held = self._held(key)
            if held is not None:
                return held
            alloc = self._alloc_for(key)
            if alloc.available():
                break
            # Awaiting the store lets other tasks run: loop and look at the key again.
            await alloc.refill()
        return self._grant(key, alloc.take(), ttl)

    def renew(self, lease_id: str, ttl_ms: int | None = None, *, tenant: str | None = None) -> int:
        """Extend a live lease to ``ttl_ms`` from now (default: its last TTL).

        200 with the new ``expires_at_ms``; :class:`LeaseNotFound` -> 404 (unknown id, another
        tenant's, or superseded); :class:`LeaseLost` -> 409 (expired, released or committed).
        Renewal never changes the token: the holder is the same writer.
        """
        lease = self._lookup(lease_id, tenant)
        if self._live_lease(lease.key) is not lease:
            raise LeaseLost(f"lease {lease_id} is {lease.state.value}")
        ttl = lease.ttl_ms if ttl_ms is None else self._ttl(ttl_ms)
        lease.ttl_ms = ttl
        lease.deadline = self._clock.monotonic() + ttl / 1000
        self._arm(lease)
        return self._wall_ms(ttl)

    def release(self, lease_id: str, *, tenant: str | None = None) -> bool:
        """Give the key up without writing; waiters get ``GONE``. 204 whatever the answer.

        ``True`` when a live lease was released, ``False`` when there was none to release.
        """
        lease = self._by_id.get(lease_id)
        if lease is None or not _owned_by(lease, tenant):
            return False
        if self._live_lease(lease.key) is not lease:
            return False
        self._end(lease, LeaseState.RELEASED)
        return True

    # -- writes -------------------------------------------------------------------------------

    def check_write(self, key: str, token: int | None) -> WritePermit:
        """Admit or refuse a PUT of ``key`` carrying ``token`` (``X-KV-Lease-Token``, or None).

        With a live lease on the key: the token must be that lease's token; no token raises
        :class:`LeaseConflict` (409, with ``retry_after_ms``), any other token raises
        :class:`StaleToken` (409).
        With no live lease: a PUT without a token is allowed (an unleased write); a token is
        allowed only if it is the newest ever granted for the key (the last holder writing
        late, after expiry, with nobody granted since) and otherwise raises :class:`StaleToken`
        (409) -- including tokens this table does not remember (granted before a restart, or
        forgotten): what cannot be proven newest is refused. No clock is consulted except to
        decide whether the lease is live, and that only widens what is refused.
        """
        lease = self._live_lease(key)
        if lease is not None:
            if token is None:
                raise LeaseConflict(
                    f"a write lease on {client_key(key)!r} is held by someone else",
                    retry_after_ms=self._remaining_ms(lease),
                )
            if token != lease.token:
                raise StaleToken(f"token {token} is not the current token for {client_key(key)!r}")
            return WritePermit(key, token, lease.lease_id)
        if token is None:
            return WritePermit(key, None, None)
        newest = self._by_key.get(key)
        if newest is None or newest.token != token:
            raise StaleToken(
                f"token {token} is not the newest token granted for {client_key(key)!r}"
            )
        return WritePermit(key, token, None)

    def validate(self, permit: WritePermit) -> bool:
        """Whether ``permit`` would still be granted now (no exception, O(1)).

        Call it at the last synchronous point before the staged block is made visible: between
        ``check_write`` and publishing there were awaits, and the lease may have been lost.
        """
        try:
            again = self.check_write(permit.key, permit.token)
        except (LeaseConflict, StaleToken):
            return False
        return again.lease_id == permit.lease_id

    def commit(self, lease_id: str, token: int) -> bool:
        """The lease's write is stored and visible: end the lease and wake its waiters.

        Called after the block is published, with ``permit.lease_id`` and ``permit.token``.
        Waiters get ``COMMITTED``. ``False`` (and nothing changes) when that lease is no longer
        live or the token is not its own: the block is stored regardless (content-addressed,
        first writer wins) and the live holder, if any, commits its own lease.
        """
        lease = self._by_id.get(lease_id)
        if lease is None or lease.token != token:
            return False
        if self._live_lease(lease.key) is not lease:
            return False
        self._end(lease, LeaseState.COMMITTED)
        return True

    # -- single-flight ------------------------------------------------------------------------

    async def wait(self, key: str, timeout_ms: int) -> WaitOutcome:
        """Park until the live lease on ``key`` ends, or ``timeout_ms`` (clamped to max_wait_ms).

        ``NO_LEASE`` at once when nothing is outstanding; ``TIMEOUT`` at once when
        ``timeout_ms <= 0``. Cancellation (a client hanging up) leaves nothing behind.
        """
        lease = self._live_lease(key)
        if lease is None:
            return WaitOutcome.NO_LEASE
        timeout = min(timeout_ms, self.max_wait_ms)
        if timeout <= 0 or self._stopped:
            return WaitOutcome.TIMEOUT
        fut: asyncio.Future[WaitOutcome] = asyncio.get_running_loop().create_future()
        lease.waiters.add(fut)
        self._waiting += 1
        timer = self._sched.call_later(timeout / 1000, lambda: _settle(fut, WaitOutcome.TIMEOUT))
        try:
            return await fut
        finally:
            timer.cancel()
            lease.waiters.discard(fut)
            self._waiting -= 1

    # -- inspection / reaping -----------------------------------------------------------------

    def holder(self, key: str) -> tuple[str, int] | None:
        """``(lease_id, token)`` of the live lease on ``key``, if any."""
        lease = self._live_lease(key)
        return None if lease is None else (lease.lease_id, lease.token)

    def expire_due(self) -> int:
        """Expire every lease past its deadline now; how many. O(live leases).

        The scheduler's per-lease timers already do this on time; this is for a reaper that
        runs without a scheduler (or a clock moved without one), and for tests.
        """
        now = self._clock.monotonic()
        due = [
            lease
            for lease in self._by_key.values()
            if lease.state is LeaseState.LIVE and now >= lease.deadline
        ]
        for lease in due:
            self._end(lease, LeaseState.EXPIRED)
        return len(due)

    def stop_waiting(self) -> int:
        """Shutdown: answer every parked waiter ``TIMEOUT`` now, and every later ``wait`` too.

        Nobody waits out its ``wait_ms`` on a server going away. Leases stay as they are; how
        many waiters were woken.
        """
        self._stopped = True
        return sum(time_out(lease.waiters) for lease in self._by_key.values())

    def stats(self, tenant: str | None = None) -> LeaseStats:
        """All leases, or only ``tenant``'s (a scan of the keys remembered)."""
        if tenant is None:
            return LeaseStats(live=self._live, waiters=self._waiting, remembered=len(self._ended))
        mine = [lease for key, lease in self._by_key.items() if tenant_of(key) == tenant]
        return LeaseStats(
            live=sum(
                1
                for lease in mine
                if lease.state is LeaseState.LIVE and lease.deadline > self._clock.monotonic()
            ),
            waiters=sum(len(lease.waiters) for lease in mine),
            remembered=sum(1 for key in self._ended if tenant_of(key) == tenant),
        )

    # -- internals ----------------------------------------------------------------------------

    def _ttl(self, ttl_ms: object) -> int:
        return clamp_ttl(ttl_ms, self.max_ttl_ms)

    def _lookup(self, lease_id: str, tenant: str | None) -> _Lease:
        lease = self._by_id.get(lease_id)
        if lease is None or not _owned_by(lease, tenant):
            raise LeaseNotFound(f"no lease {lease_id!r}")
        return lease

    def _live_lease(self, key: str) -> _Lease | None:
        """The live lease on ``key``, expiring it first if its deadline has passed (lazily)."""
        lease = self._by_key.get(key)
        if lease is None or lease.state is not LeaseState.LIVE:
            return None
        if self._clock.monotonic() >= lease.deadline:
            self._end(lease, LeaseState.EXPIRED)
            return None
        return lease

    def _held(self, key: str) -> Held | None:
        lease = self._live_lease(key)
        return None if lease is None else Held(self._remaining_ms(lease))

    def _grant(self, key: str, token: int, ttl: int) -> Granted:
        old = self._by_key.get(key)
        if old is not None:  # ended (acquire checked): its id and token are superseded
            self._by_id.pop(old.lease_id, None)
            self._ended.pop(key, None)
        lease = _Lease(
            key=key,
            lease_id=secrets.token_hex(16),
            token=token,
            ttl_ms=ttl,
            deadline=self._clock.monotonic() + ttl / 1000,
        )
        self._by_key[key] = lease
        self._by_id[lease.lease_id] = lease
        self._live += 1
        self._arm(lease)
        return Granted(lease.lease_id, token, self._wall_ms(ttl))

    def _arm(self, lease: _Lease) -> None:
        if lease.timer is not None:
            lease.timer.cancel()
        # The same expression as the deadline, so a fake scheduler fires at exactly the deadline.
        delay = lease.ttl_ms / 1000
        lease.timer = self._sched.call_later(delay, lambda: self._on_deadline(lease))

    def _on_deadline(self, lease: _Lease) -> None:
        # A renew cancels and re-arms, so a timer that fires belongs to the current deadline.
        if lease.state is LeaseState.LIVE and self._by_key.get(lease.key) is lease:
            self._end(lease, LeaseState.EXPIRED)

    def _end(self, lease: _Lease, state: LeaseState) -> None:
        lease.state = state
        if lease.timer is not None:
            lease.timer.cancel()
            lease.timer = None
        outcome = WaitOutcome.COMMITTED if state is LeaseState.COMMITTED else WaitOutcome.GONE
        for fut in lease.waiters:
            _settle(fut, outcome)
        lease.waiters.clear()
        self._live -= 1
        self._ended[lease.key] = None
        while len(self._ended) > self._max_remembered:
            oldest = next(iter(self._ended))
            del self._ended[oldest]
            forgotten = self._by_key.pop(oldest)
            self._by_id.pop(forgotten.lease_id, None)

    def _remaining_ms(self, lease: _Lease) -> int:
        return max(1, math.ceil((lease.deadline - self._clock.monotonic()) * 1000))

    def _wall_ms(self, remaining_ms: int) -> int:
        return math.floor(self._clock.time() * 1000) + remaining_ms


def clamp_ttl(ttl_ms: object, max_ttl_ms: int) -> int:
    """A requested lease TTL, clamped to ``max_ttl_ms``; 400 unless a positive integer."""
    if not isinstance(ttl_ms, int) or isinstance(ttl_ms, bool) or ttl_ms < 1:
        raise BadRequest(f"ttl_ms must be a positive integer, got {ttl_ms!r}")
    return min(ttl_ms, max_ttl_ms)


def time_out(waiters: Iterable[asyncio.Future[WaitOutcome]]) -> int:
    """Answer every still-parked waiter ``TIMEOUT`` (shutdown); how many were woken."""
    woken = 0
    for fut in waiters:
        if not fut.done():
            fut.set_result(WaitOutcome.TIMEOUT)
            woken += 1
    return woken


def _owned_by(lease: _Lease, tenant: str | None) -> bool:
    return tenant is None or lease.key.startswith(tenant + TENANT_SEP)


def _settle(fut: asyncio.Future[WaitOutcome], outcome: WaitOutcome) -> None:
    if not fut.done():
        fut.set_result(outcome)
