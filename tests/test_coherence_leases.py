"""Write leases, fencing tokens and single-flight waiters, driven by a FakeClock (no sleeps)."""

from __future__ import annotations

import asyncio

import pytest

from coherence.errors import BadRequest, LeaseConflict, LeaseLost, LeaseNotFound, StaleToken
from coherence.leases import (
    Granted,
    Held,
    LeaseTable,
    MemoryTokenStore,
    MetaTokenStore,
    WaitOutcome,
    WritePermit,
    parse_token,
)
from coherence.sched import FakeScheduler
from tiers.block import scoped_key
from tiers.clock import FakeClock

K = scoped_key("alice", "blk-1")


class Env:
    def __init__(self, store: MemoryTokenStore | None = None, **kwargs: int) -> None:
        self.clock = FakeClock()
        self.sched = FakeScheduler(self.clock)
        self.store = store if store is not None else MemoryTokenStore()
        self.table = LeaseTable(self.store, clock=self.clock, scheduler=self.sched, **kwargs)

    async def grant(self, key: str = K, ttl_ms: int = 1000) -> Granted:
        got = await self.table.acquire(key, ttl_ms)
        assert isinstance(got, Granted)
        return got


async def settle() -> None:
    """Let woken tasks run (a scheduling step, not a wait for time)."""
    for _ in range(3):
        await asyncio.sleep(0)


async def test_one_holder_per_key_and_held_reports_time_left() -> None:
    env = Env()
    g = await env.grant(ttl_ms=1000)
    assert g.expires_at_ms == int(env.clock.time() * 1000) + 1000
    env.clock.advance(0.25)
    held = await env.table.acquire(K, 500)
    assert held == Held(retry_after_ms=750)
    other = await env.table.acquire(scoped_key("bob", "blk-1"), 500)
    assert isinstance(other, Granted) and other.token > g.token


async def test_expired_lease_frees_key_lazily_and_new_token_is_larger() -> None:
    env = Env()
    g1 = await env.grant(ttl_ms=100)
    env.clock.advance(0.1)  # clock only: no timer fired, expiry is found lazily
    g2 = await env.grant(ttl_ms=100)
    assert g2.token > g1.token and g2.lease_id != g1.lease_id


async def test_ttl_is_validated_and_clamped() -> None:
    env = Env(max_ttl_ms=5000)
    for bad in (0, -1, True):
        with pytest.raises(BadRequest):
            await env.table.acquire(K, bad)
    g = await env.grant(ttl_ms=10**9)
    assert g.expires_at_ms == int(env.clock.time() * 1000) + 5000


async def test_renew_extends_and_lost_lease_maps_to_404_or_409() -> None:
    env = Env()
    g = await env.grant(ttl_ms=100)
    env.sched.advance(0.09)
    assert env.table.renew(g.lease_id) == int(env.clock.time() * 1000) + 100
    env.sched.advance(0.09)  # past the first deadline, inside the renewed one
    assert env.table.holder(K) == (g.lease_id, g.token)
    assert env.table.renew(g.lease_id, 300) == int(env.clock.time() * 1000) + 300
    env.sched.advance(0.3)
    with pytest.raises(LeaseLost) as lost:
        env.table.renew(g.lease_id)
    assert lost.value.http_status == 409
    with pytest.raises(LeaseNotFound) as missing:
        env.table.renew("no-such-lease")
    assert missing.value.http_status == 404
    g2 = await env.grant()
    with pytest.raises(LeaseNotFound):  # superseded by a newer lease on the key
        env.table.renew(g.lease_id)
    assert env.table.renew(g2.lease_id) > 0


async def test_lease_ops_are_scoped_to_their_tenant() -> None:
    env = Env()
    g = await env.grant()
    with pytest.raises(LeaseNotFound):
        env.table.renew(g.lease_id, tenant="bob")
    assert env.table.release(g.lease_id, tenant="bob") is False
    assert env.table.holder(K) is not None
    assert env.table.release(g.lease_id, tenant="alice") is True
    assert env.table.holder(K) is None


async def test_check_write_fences_by_token_not_time() -> None:
    env = Env()
    assert env.table.check_write(K, None) == WritePermit(K, None, None)  # no lease: allowed
    g1 = await env.grant(ttl_ms=100)
    with pytest.raises(LeaseConflict) as conflict:
        env.table.check_write(K, None)
    assert conflict.value.retry_after_ms == 100
    assert env.table.check_write(K, g1.token) == WritePermit(K, g1.token, g1.lease_id)
    with pytest.raises(StaleToken):
        env.table.check_write(K, g1.token + 1)
    # The holder stalls past its lease; someone else takes the key.
    env.sched.advance(1.0)
    g2 = await env.grant(ttl_ms=100)
    with pytest.raises(StaleToken):
        env.table.check_write(K, g1.token)
    # Even with no live lease, a token older than the newest is refused.
    env.table.release(g2.lease_id)
    with pytest.raises(StaleToken):
        env.table.check_write(K, g1.token)
    # ...while the newest holder writing late, with nobody granted since, is allowed (no commit).
    assert env.table.check_write(K, g2.token) == WritePermit(K, g2.token, None)
    # A token for another key, or one this table never granted, is refused too.
    with pytest.raises(StaleToken):
        env.table.check_write(scoped_key("alice", "other"), g2.token)


async def test_validate_catches_a_lease_lost_between_check_and_publish() -> None:
    env = Env()
    g1 = await env.grant(ttl_ms=100)
    permit = env.table.check_write(K, g1.token)
    assert env.table.validate(permit)
    env.sched.advance(0.1)  # lost: a late write is still admitted, but not as the lease's write
    assert not env.table.validate(permit)
    assert env.table.check_write(K, g1.token).lease_id is None
    await env.grant()
    assert not env.table.validate(permit)
    assert env.table.commit(g1.lease_id, g1.token) is False


async def test_commit_ends_lease_and_only_with_own_token() -> None:
    env = Env()
    g = await env.grant()
    assert env.table.commit(g.lease_id, g.token + 1) is False
    assert env.table.holder(K) is not None
    assert env.table.commit(g.lease_id, g.token) is True
    assert env.table.holder(K) is None
    assert env.table.commit(g.lease_id, g.token) is False
    with pytest.raises(LeaseLost):
        env.table.renew(g.lease_id)
    assert env.table.check_write(K, None).lease_id is None


async def test_commit_wakes_every_waiter_with_committed() -> None:
    env = Env()
    g = await env.grant()
    waiters = [asyncio.create_task(env.table.wait(K, 5000)) for _ in range(5)]
    await settle()
    assert env.table.stats().waiters == 5
    assert not any(w.done() for w in waiters)
    permit = env.table.check_write(K, g.token)
    assert permit.lease_id is not None and permit.token is not None
    assert env.table.commit(permit.lease_id, permit.token)
    assert await asyncio.gather(*waiters) == [WaitOutcome.COMMITTED] * 5
    assert env.table.stats().waiters == 0


async def test_release_wakes_waiters_with_gone() -> None:
    env = Env()
    g = await env.grant()
    waiter = asyncio.create_task(env.table.wait(K, 5000))
    await settle()
    env.table.release(g.lease_id)
    assert await waiter is WaitOutcome.GONE


async def test_expiry_wakes_waiters_by_timer_without_any_request() -> None:
    env = Env()
    await env.grant(ttl_ms=200)
    waiter = asyncio.create_task(env.table.wait(K, 5000))
    await settle()
    env.sched.advance(0.199)
    await settle()
    assert not waiter.done()
    env.sched.advance(0.001)
    assert await waiter is WaitOutcome.GONE
    assert env.table.stats().live == 0


async def test_renew_moves_the_expiry_timer() -> None:
    env = Env()
    g = await env.grant(ttl_ms=200)
    waiter = asyncio.create_task(env.table.wait(K, 5000))
    await settle()
    env.sched.advance(0.15)
    env.table.renew(g.lease_id, 200)
    env.sched.advance(0.15)  # past the old deadline
    await settle()
    assert not waiter.done()
    env.sched.advance(0.05)
    assert await waiter is WaitOutcome.GONE


async def test_wait_times_out_and_other_waiters_stay() -> None:
    env = Env()
    g = await env.grant(ttl_ms=1000)
    short = asyncio.create_task(env.table.wait(K, 100))
    long = asyncio.create_task(env.table.wait(K, 900))
    await settle()
    env.sched.advance(0.1)
    assert await short is WaitOutcome.TIMEOUT
    assert not long.done()
    env.table.commit(g.lease_id, g.token)
    assert await long is WaitOutcome.COMMITTED


async def test_wait_without_lease_or_budget_returns_at_once() -> None:
    env = Env(max_wait_ms=50)
    assert await env.table.wait(K, 1000) is WaitOutcome.NO_LEASE
    await env.grant()
    assert await env.table.wait(K, 0) is WaitOutcome.TIMEOUT
    clamped = asyncio.create_task(env.table.wait(K, 10_000))
    await settle()
    env.sched.advance(0.05)
    assert await clamped is WaitOutcome.TIMEOUT


async def test_cancelled_waiter_leaves_nothing_behind() -> None:
    env = Env()
    g = await env.grant()
    waiter = asyncio.create_task(env.table.wait(K, 5000))
    await settle()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert env.table.stats().waiters == 0
    assert env.sched.pending() == 1  # only the lease's own expiry timer is left
    assert env.table.commit(g.lease_id, g.token)


async def test_tokens_grow_across_restart_over_the_same_store() -> None:
    store = MemoryTokenStore()
    before = Env(store, token_span=1000)
    tokens = [(await before.grant(scoped_key("t", f"k{i}"))).token for i in range(5)]
    old = await before.grant(K)
    # Restart: a new table over the same durable store, leases forgotten.
    after = Env(store, token_span=1000)
    new = await after.grant(K)
    assert new.token > max([*tokens, old.token])
    # Tokens from before the restart cannot be proven newest: refused, as a stale write must be.
    after.table.release(new.lease_id)
    with pytest.raises(StaleToken):
        after.table.check_write(K, old.token)


async def test_allocator_refills_epochs_and_never_repeats() -> None:
    env = Env(token_span=3)
    seen = [(await env.grant(scoped_key("t", f"k{i}"))).token for i in range(10)]
    assert seen == sorted(seen) and len(set(seen)) == 10
    assert env.store.epoch == 4  # ceil(10 / 3) reservations


async def test_concurrent_acquires_during_refill_grant_only_one() -> None:
    gate = asyncio.Event()

    class SlowStore(MemoryTokenStore):
        async def next_epoch(self) -> int:
            await gate.wait()
            return await super().next_epoch()

    env = Env(SlowStore())
    racers = [asyncio.create_task(env.table.acquire(K, 1000)) for _ in range(4)]
    await settle()
    gate.set()
    results = await asyncio.gather(*racers)
    assert sum(isinstance(r, Granted) for r in results) == 1
    assert sum(isinstance(r, Held) for r in results) == 3


async def test_meta_token_store_adapts_a_meta_incr() -> None:
    class FakeMeta:
        def __init__(self) -> None:
            self.values: dict[bytes, int] = {}

        async def meta_incr(self, name: bytes) -> int:
            self.values[name] = self.values.get(name, 0) + 1
            return self.values[name]

    meta = FakeMeta()
    store = MetaTokenStore(meta)
    assert [await store.next_epoch() for _ in range(3)] == [1, 2, 3]
    assert meta.values == {b"coherence.lease_epoch": 3}


async def test_remembered_tokens_are_bounded_and_forgetting_only_refuses() -> None:
    env = Env(max_remembered=2)
    grants = []
    for i in range(4):
        key = scoped_key("t", f"k{i}")
        g = await env.grant(key)
        env.table.release(g.lease_id)
        grants.append((key, g))
    assert env.table.stats().remembered == 2
    forgotten_key, forgotten = grants[0]
    with pytest.raises(StaleToken):
        env.table.check_write(forgotten_key, forgotten.token)
    kept_key, kept = grants[-1]
    assert env.table.check_write(kept_key, kept.token).token == kept.token


async def test_expire_due_reaps_without_the_scheduler() -> None:
    env = Env()
    await env.grant(ttl_ms=100)
    await env.grant(scoped_key("t", "x"), ttl_ms=500)
    env.clock.advance(0.2)  # timers not run
    assert env.table.expire_due() == 1
    assert env.table.stats().live == 1


def test_parse_token() -> None:
    assert parse_token(None) is None
    assert parse_token(" 42 ") == 42
    for bad in ("", "-1", "1.5", "abc", "٣", "9" * 40):
        with pytest.raises(BadRequest):
            parse_token(bad)


async def test_a_tenants_tokens_do_not_count_other_tenants_leases() -> None:
    """One counter for all tenants let a tenant count the others' leases from the gaps
    between its own tokens; each tenant now draws from its own epochs."""
    env = Env()
    await env.table.open(["alice", "bob"])
    first = await env.grant(scoped_key("alice", "a0"))
    bobs = [await env.grant(scoped_key("bob", f"b{i}")) for i in range(5)]
    again = await env.grant(scoped_key("alice", "a1"))
    assert again.token == first.token + 1
    mine = {first.token, again.token}
    assert mine.isdisjoint(b.token for b in bobs)  # epochs are unique: no token is shared
    # A restart still jumps every tenant past each token it handed out before.
    env.table = LeaseTable(env.store, clock=env.clock, scheduler=env.sched)
    assert (await env.grant(scoped_key("alice", "a2"))).token > again.token
    assert (await env.grant(scoped_key("bob", "b9"))).token > max(b.token for b in bobs)
