"""Write leases kept in Redis, so several gateways share one writer per key (``--remote``).

The same protocol as :class:`coherence.leases.LeaseTable` (see ``docs/coherence.md``), with the
table in Redis and every decision one Lua script, atomic across gateways:

* ``{prefix}:lease:{key}`` -- the key's newest lease, a hash: ``token``, ``id``, ``live``
  (``1`` until committed, released or past its deadline), ``deadline_ms``, ``ttl_ms``. The
  remote tier's :class:`~tiers.remote.Fence` reads this record when it publishes a block, so
  the fencing check and the publication are one step;
* ``{prefix}:lid:{lease_id}`` -- which key a lease id is for;
* ``{prefix}:fence:{tenant}`` -- each tenant's token counter (its own, so the tokens one
  tenant sees do not count the others' leases). Tokens are compared for equality with the
  record, never ordered by time; a counter is also floored at the wall clock in microseconds,
  so a Redis that lost its data still hands out tokens larger than any before it, and at the
  one counter of older gateways, ``{prefix}:fence``, so none repeats a token they handed out;
* ``{prefix}:lease-events`` -- pub/sub channel: ``C`` (committed) or ``R`` (released) plus the
  key, which wakes the waiters parked on any gateway; ``D`` (deleted) plus the sender's id and
  the key, which drops the other gateways' local copies of a deleted block.

Deadlines are wall-clock milliseconds from the gateway's injected clock: fencing tokens, not
clocks, keep writes safe; clocks across gateways only decide when a silent holder loses the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from coherence.errors import (
    CoherenceConfigError,
    CoherenceError,
    LeaseConflict,
    LeaseLost,
    LeaseNotFound,
    LeaseStoreUnavailable,
    StaleToken,
)
from coherence.leases import (
    DEFAULT_MAX_TTL_MS,
    DEFAULT_MAX_WAIT_MS,
    Granted,
    Held,
    LeaseStats,
    WaitOutcome,
    WritePermit,
    clamp_ttl,
    time_out,
)
from coherence.sched import LoopScheduler, Scheduler
from tiers.block import TENANT_SEP, client_key, tenant_of
from tiers.clock import SYSTEM_CLOCK, Clock
from tiers.remote import DEFAULT_PREFIX, Fence
from tiers.remote import reply_text as _text

log = logging.getLogger("kvgate.coherence.redis")

RECORD_TTL_MS = 24 * 3600 * 1000
"""How long a key's newest token is remembered after its lease was granted. Forgetting it only
makes a late write with that token be refused, never accepted."""

# KEYS: record, tenant's counter, id key, legacy counter; ARGV: now_ms, ttl_ms, lease id, record
# ttl, key, token floor
# The lease id is drawn before the call, so a retry after a lost reply (redis-py re-sends on a
# dropped connection) finds its own grant and answers it again instead of 'held'.
_ACQUIRE = """
local rec = redis.call('HMGET', KEYS[1], 'live', 'deadline_ms', 'id', 'token')
local now = tonumber(ARGV[1])
if rec[1] == '1' and tonumber(rec[2]) > now then
  if rec[3] == ARGV[3] then return {'granted', tonumber(rec[4]), tonumber(rec[2])} end
  return {'held', tonumber(rec[2]) - now}
end
local floor = math.max(tonumber(ARGV[6]), tonumber(redis.call('GET', KEYS[4]) or '0'))
if tonumber(redis.call('GET', KEYS[2]) or '0') < floor then redis.call('SET', KEYS[2], floor) end
local token = redis.call('INCR', KEYS[2])
local deadline = now + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'token', token, 'id', ARGV[3], 'live', 1,
           'deadline_ms', deadline, 'ttl_ms', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('SET', KEYS[3], ARGV[5], 'PX', ARGV[4])
return {'granted', token, deadline}
"""

# KEYS: record; ARGV: now_ms, token ("" for none)
_CHECK = """
local rec = redis.call('HMGET', KEYS[1], 'token', 'id', 'live', 'deadline_ms')
local now = tonumber(ARGV[1])
if rec[3] == '1' and tonumber(rec[4]) > now then
  if ARGV[2] == '' then return {'conflict', tonumber(rec[4]) - now} end
  if ARGV[2] ~= rec[1] then return {'stale', 0} end
  return {'ok', rec[2]}
end
if ARGV[2] == '' then return {'ok', ''} end
if ARGV[2] ~= rec[1] then return {'stale', 0} end
return {'ok', ''}
"""

# KEYS: record; ARGV: now_ms, lease id, new ttl_ms ("" keeps the last), action, channel, message
# action: renew | release | commit (commit also needs ARGV[7] = token)
_END_OR_RENEW = """
local rec = redis.call('HMGET', KEYS[1], 'id', 'live', 'deadline_ms', 'ttl_ms', 'token')
local now = tonumber(ARGV[1])
if rec[1] ~= ARGV[2] then return {'not_found', 0} end
if rec[2] ~= '1' or tonumber(rec[3]) <= now then return {'lost', 0} end
local action = ARGV[4]
if action == 'renew' then
  local ttl = ARGV[3]
  if ttl == '' then ttl = rec[4] end
  local deadline = now + tonumber(ttl)
  redis.call('HSET', KEYS[1], 'deadline_ms', deadline, 'ttl_ms', ttl)
  return {'ok', deadline}
end
if action == 'commit' and rec[5] ~= ARGV[7] then return {'lost', 0} end
redis.call('HSET', KEYS[1], 'live', 0)
redis.call('PUBLISH', ARGV[5], ARGV[6])
return {'ok', 0}
"""

# KEYS: record; ARGV: now_ms
_STATE = """
local rec = redis.call('HMGET', KEYS[1], 'live', 'deadline_ms')
if rec[1] == '1' and tonumber(rec[2]) > tonumber(ARGV[1]) then
  return tonumber(rec[2]) - tonumber(ARGV[1])
end
return 0
"""


@dataclass(slots=True)
class _Parked:
    futures: set[asyncio.Future[WaitOutcome]] = field(default_factory=set)


class RedisLeaseTable:
    """The lease table of every gateway sharing one Redis; the API of ``LeaseTable``, async.

    Differences from the in-process table: :meth:`check_write`, :meth:`renew`,
    :meth:`release` and :meth:`commit` are coroutines, and the final fencing check is not
    ``validate`` but the :class:`~tiers.remote.Fence` from :meth:`fence_for`, which the remote
    tier checks in the script that publishes the block. Redis errors surface as
    :class:`~coherence.errors.CoherenceError` (the gateway answers 503).
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        clock: Clock = SYSTEM_CLOCK,
        scheduler: Scheduler | None = None,
        max_ttl_ms: int = DEFAULT_MAX_TTL_MS,
        max_wait_ms: int = DEFAULT_MAX_WAIT_MS,
    ) -> None:
        if max_ttl_ms < 1 or max_wait_ms < 0:
            raise CoherenceConfigError("max_ttl_ms >= 1, max_wait_ms >= 0")
        self._client = client
        self._prefix = prefix
        self._clock = clock
        self._sched: Scheduler = scheduler if scheduler is not None else LoopScheduler()
        self.max_ttl_ms = max_ttl_ms
        self.max_wait_ms = max_wait_ms
        self._counter = f"{prefix}:fence"
        self.channel = f"{prefix}:lease-events"
        self._acquire = client.register_script(_ACQUIRE)
        self._check = client.register_script(_CHECK)
        self._end_or_renew = client.register_script(_END_OR_RENEW)
        self._state = client.register_script(_STATE)
        self._parked: dict[str, _Parked] = {}
        self._waiting = 0
        # lease id -> (key, monotonic deadline): the leases this gateway granted, for stats
        self._granted: dict[str, tuple[str, float]] = {}
        self._pubsub: aioredis.client.PubSub | None = None
        self._listener: asyncio.Task[None] | None = None
        self._stopped = False
        self._origin = secrets.token_hex(8)
        self.on_delete: Callable[[str], None] | None = None
        """Called with a key another gateway deleted (to drop this gateway's local copy)."""

    def record_key(self, key: str) -> str:
        return f"{self._prefix}:lease:{key}"

    def _id_key(self, lease_id: str) -> str:
        return f"{self._prefix}:lid:{lease_id}"

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self, tenants: Iterable[str] = ()) -> None:
        """Subscribe to commit and release events before any waiter can park. (``tenants``:
        as for :meth:`LeaseTable.open`; the counters live in Redis, nothing is reserved.)"""
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.channel)
        except (RedisError, OSError) as exc:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
            raise LeaseStoreUnavailable(f"cannot subscribe to lease events: {exc}") from exc
        self._pubsub = pubsub
        self._listener = asyncio.get_running_loop().create_task(self._listen(pubsub))

    async def close(self) -> None:
        self.stop_waiting()
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        if self._pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.aclose()  # type: ignore[no-untyped-call]
            self._pubsub = None

    async def _listen(self, pubsub: aioredis.client.PubSub) -> None:
        while True:
            try:
                message = await pubsub.get_message(timeout=None)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                # Parked readers fall back to their own deadlines; try again shortly.
                log.warning("lease event subscription failed: %s", exc)
                await asyncio.sleep(0.5)
                continue
            if message is None or message.get("type") != "message":
                continue
            data = message.get("data")
            text = data.decode() if isinstance(data, bytes) else str(data)
            if text[:1] == "D":
                origin, _, key = text[2:].partition(":")
                if origin != self._origin and self.on_delete is not None:
                    self.on_delete(key)
                continue
            outcome = WaitOutcome.COMMITTED if text[:1] == "C" else WaitOutcome.GONE
            self._ended(text[2:])
            self._wake(text[2:], outcome)

    def _ended(self, key: str) -> None:
        # The key's lease was committed or released, maybe through another gateway: a lease
        # this gateway granted on it is no longer live.
        for lease_id in [i for i, (k, _) in self._granted.items() if k == key]:
            del self._granted[lease_id]

    def _wake(self, key: str, outcome: WaitOutcome) -> None:
        parked = self._parked.get(key)
        if parked is None:
            return
        for fut in parked.futures:
            if not fut.done():
                fut.set_result(outcome)

    # -- acquire / renew / release -------------------------------------------------------------

    async def acquire(self, key: str, ttl_ms: int) -> Granted | Held:
        ttl = self._ttl(ttl_ms)
        lease_id = secrets.token_hex(16)
        now_ms = self._now_ms()
        answer = await self._run(
            self._acquire,
            [
                self.record_key(key),
                f"{self._counter}:{tenant_of(key)}",
                self._id_key(lease_id),
                self._counter,
            ],
            [now_ms, ttl, lease_id, max(RECORD_TTL_MS, 2 * ttl), key, now_ms * 1000],
        )
        if _text(answer[0]) == "held":
            return Held(max(1, int(answer[1])))
        self._granted[lease_id] = (key, self._clock.monotonic() + ttl / 1000)
        return Granted(lease_id, int(answer[1]), int(answer[2]))

    async def renew(
        self, lease_id: str, ttl_ms: int | None = None, *, tenant: str | None = None
    ) -> int:
        ttl = "" if ttl_ms is None else str(self._ttl(ttl_ms))
        key = await self._key_of(lease_id, tenant)
        answer = await self._run(
            self._end_or_renew,
            [self.record_key(key)],
            [self._now_ms(), lease_id, ttl, "renew", "", ""],
        )
        status = _text(answer[0])
        if status == "not_found":
            raise LeaseNotFound(f"no lease {lease_id!r}")
        if status == "lost":
            raise LeaseLost(f"lease {lease_id} has ended")
        deadline_ms = int(answer[1])
        if lease_id in self._granted:
            self._granted[lease_id] = (
                key,
                self._clock.monotonic() + (deadline_ms - self._now_ms()) / 1000,
            )
        return deadline_ms

    async def release(self, lease_id: str, *, tenant: str | None = None) -> bool:
        try:
            key = await self._key_of(lease_id, tenant)
        except LeaseNotFound:
            return False
        answer = await self._run(
            self._end_or_renew,
            [self.record_key(key)],
            [self._now_ms(), lease_id, "", "release", self.channel, f"R:{key}"],
        )
        self._granted.pop(lease_id, None)
        return _text(answer[0]) == "ok"

    # -- writes --------------------------------------------------------------------------------

    async def check_write(self, key: str, token: int | None) -> WritePermit:
        """The rule of ``LeaseTable.check_write``, read from the shared record."""
        answer = await self._run(
            self._check, [self.record_key(key)], [self._now_ms(), "" if token is None else token]
        )
        status = _text(answer[0])
        if status == "conflict":
            raise LeaseConflict(
                f"a write lease on {client_key(key)!r} is held by someone else",
                retry_after_ms=max(1, int(answer[1])),
            )
        if status == "stale":
            if token is None:  # pragma: no cover - the script never answers stale without one
                raise CoherenceError("stale answer for an unleased write")
            raise StaleToken(
                f"token {token} is not the newest token granted for {client_key(key)!r}"
            )
        lease_id = _text(answer[1]) or None
        return WritePermit(key, token, lease_id)

    def fence_for(self, permit: WritePermit) -> Fence:
        """What the remote tier checks in the step that publishes ``permit``'s block."""
        return Fence(self.record_key(permit.key), permit.token, self._now_ms())

    async def commit(self, lease_id: str, token: int, *, key: str) -> bool:
        """The lease's block is published: end the lease and wake waiters on every gateway."""
        answer = await self._run(
            self._end_or_renew,
            [self.record_key(key)],
            [self._now_ms(), lease_id, "", "commit", self.channel, f"C:{key}", token],
        )
        self._granted.pop(lease_id, None)
        return _text(answer[0]) == "ok"

    async def announce_delete(self, key: str) -> None:
        """Tell the other gateways that ``key`` was deleted (best effort: a lost message leaves
        a stale local copy of a content-addressed block, never a wrong one)."""
        await self.announce_deletes([key])

    async def announce_deletes(self, keys: list[str]) -> None:
        """:meth:`announce_delete` for each of ``keys``, in one round trip."""
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.publish(self.channel, f"D:{self._origin}:{key}")
                await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("could not announce %d deletes to the other gateways: %s", len(keys), exc)

    # -- single-flight -------------------------------------------------------------------------

    async def wait(self, key: str, timeout_ms: int) -> WaitOutcome:
        """Park until the key's live lease ends (on any gateway), or ``timeout_ms`` passes."""
        timeout = min(timeout_ms, self.max_wait_ms)
        if self._stopped or timeout <= 0:
            return WaitOutcome.TIMEOUT
        fut: asyncio.Future[WaitOutcome] = asyncio.get_running_loop().create_future()
        parked = self._parked.setdefault(key, _Parked())
        parked.futures.add(fut)  # before reading the state: a commit cannot slip by unseen
        self._waiting += 1
        give_up = self._clock.monotonic() + timeout / 1000
        first = True
        try:
            while True:
                remaining_lease = await self._lease_remaining_ms(key)
                if fut.done():
                    return fut.result()
                if remaining_lease <= 0:
                    # Nothing outstanding when we came, or the lease expired while we waited.
                    return WaitOutcome.NO_LEASE if first else WaitOutcome.GONE
                first = False
                left = give_up - self._clock.monotonic()
                if left <= 0:
                    return WaitOutcome.TIMEOUT
                # Sleep until the event, the lease's deadline (then look again: renewed or
                # expired) or our own timeout, whichever is first.
                delay = min(left, remaining_lease / 1000)
                tick: asyncio.Future[WaitOutcome] = asyncio.get_running_loop().create_future()
                timer = self._sched.call_later(delay, partial(_done, tick))
                try:
                    await asyncio.wait((fut, tick), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    timer.cancel()
                    tick.cancel()
                if fut.done():
                    return fut.result()
                if self._clock.monotonic() >= give_up:
                    return WaitOutcome.TIMEOUT
        finally:
            parked.futures.discard(fut)
            if not parked.futures:
                self._parked.pop(key, None)
            self._waiting -= 1

    def stop_waiting(self) -> int:
        self._stopped = True
        return sum(time_out(parked.futures) for parked in self._parked.values())

    def stats(self, tenant: str | None = None) -> LeaseStats:
        """This gateway's view: leases it granted that have not ended, readers parked here
        (all of them, or only ``tenant``'s)."""
        now = self._clock.monotonic()
        for lease_id in [i for i, (_, deadline) in self._granted.items() if deadline <= now]:
            del self._granted[lease_id]
        if tenant is None:
            return LeaseStats(live=len(self._granted), waiters=self._waiting, remembered=0)
        return LeaseStats(
            live=sum(1 for key, _ in self._granted.values() if tenant_of(key) == tenant),
            waiters=sum(
                len(parked.futures)
                for key, parked in self._parked.items()
                if tenant_of(key) == tenant
            ),
            remembered=0,
        )

    # -- internals -----------------------------------------------------------------------------

    async def _lease_remaining_ms(self, key: str) -> int:
        return int(await self._run(self._state, [self.record_key(key)], [self._now_ms()]))

    async def _key_of(self, lease_id: str, tenant: str | None) -> str:
        try:
            raw = await self._client.get(self._id_key(lease_id))
        except (RedisError, OSError) as exc:
            raise LeaseStoreUnavailable(f"the lease store failed: {exc}") from exc
        if raw is None:
            raise LeaseNotFound(f"no lease {lease_id!r}")
        key = _text(raw)
        if tenant is not None and not key.startswith(tenant + TENANT_SEP):
            raise LeaseNotFound(f"no lease {lease_id!r}")
        return key

    async def _run(self, script: Any, keys: list[str], args: list[object]) -> Any:
        try:
            return await script(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            raise LeaseStoreUnavailable(f"the lease store failed: {exc}") from exc

    def _ttl(self, ttl_ms: object) -> int:
        return clamp_ttl(ttl_ms, self.max_ttl_ms)

    def _now_ms(self) -> int:
        return math.floor(self._clock.time() * 1000)


def _done(fut: asyncio.Future[WaitOutcome]) -> None:
    if not fut.done():
        fut.set_result(WaitOutcome.TIMEOUT)
