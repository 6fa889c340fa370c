"""Coherence over real HTTP on loopback: leases, fencing, single-flight, pins, tenants, quotas.

The gateway runs on a FakeClock driven by a FakeScheduler (``gw.scheduler.advance``), so lease
expiry, waiter timeouts and pin deadlines happen when a test says so, never by sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.client import BlockExists, KVGateClient, Lease, LeaseHeld
from gateway.config import MiB, TenantConfig
from gateway.errors import KVGateConflict, KVGateNoRoom, KVGateNotFound
from gateway.state import STATE
from tests.conftest import SMALL_TIERS, RunningGateway, running_gateway

KiB = 1024


def live_leases(gw: RunningGateway) -> int:
    return gw.app[STATE].coherent.leases.stats().live


def waiters(gw: RunningGateway) -> int:
    return gw.app[STATE].coherent.leases.stats().waiters


async def until(condition: Callable[[], bool], *, rounds: int = 5000) -> None:
    """Yield to the loop until ``condition`` holds (a state change, not time, is awaited)."""
    for _ in range(rounds):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition never became true")


def tenant(name: str, token: str, quota_bytes: int | None = None) -> TenantConfig:
    return TenantConfig(name, hashlib.sha256(token.encode()).hexdigest(), quota_bytes)


# --------------------------------------------------------------------------- single-flight


@pytest.mark.parametrize("lockstep", [False, True], ids=["shuffled", "lockstep"])
async def test_16_writers_racing_over_40_keys_each_key_won_exactly_once(
    gateway: RunningGateway, lockstep: bool
) -> None:
    """Every key is granted (prefilled) once; the 15 others read the winner's bytes.

    ``shuffled``: each writer walks the keys in its own order. ``lockstep``: all walk the same
    order and a winner writes only once all 16 have asked for its key, so 15 requests per key
    are parked on ``wait_ms`` and served by the commit.
    """
    writers = 16
    keys = [f"prefix:{i}" for i in range(40)]
    grants: Counter[str] = Counter()
    winner: dict[str, int] = {}
    seen: dict[str, set[bytes]] = {k: set() for k in keys}
    statuses: Counter[str] = Counter()
    answered: Counter[str] = Counter()
    everyone_asked = asyncio.Condition()

    def all_asked(key: str) -> bool:
        return answered[key] == writers

    def body(writer: int, key: str) -> bytes:
        return f"{key} prefilled by writer {writer} ".encode() * 200

    async def writer(kv: KVGateClient, w: int) -> None:
        order = keys[:]
        if not lockstep:
            random.Random(w).shuffle(order)
        for key in order:
            answer = await kv.acquire_lease(key, ttl_ms=30_000)
            async with everyone_asked:
                answered[key] += 1
                everyone_asked.notify_all()
            if isinstance(answer, Lease):
                statuses["granted"] += 1
                grants[key] += 1
                winner[key] = w
                if lockstep:
                    async with everyone_asked:
                        await everyone_asked.wait_for(partial(all_asked, key))
                assert await kv.put(key, body(w, key), lease_token=answer.token) is True
                block = await kv.get_block(key)
            elif isinstance(answer, LeaseHeld):
                statuses["held"] += 1
                assert answer.retry_after_ms > 0
                # Park until the holder commits (no expiry can happen: the clock is fake).
                block = await kv.get_block(key, wait_ms=60_000)
            else:
                assert isinstance(answer, BlockExists)
                statuses["exists"] += 1
                block = await kv.get_block(key)
            assert block is not None, f"writer {w} found no block for {key}"
            seen[key].add(block.data)

    async with KVGateClient(gateway.url, max_connections=64) as kv:
        await asyncio.gather(*(writer(kv, w) for w in range(writers)))
    # Exactly one prefill per key, and everyone saw that writer's bytes.
    assert set(grants) == set(keys) and set(grants.values()) == {1}
    for key in keys:
        assert seen[key] == {body(winner[key], key)}
    assert statuses["granted"] == len(keys)
    assert sum(statuses.values()) == writers * len(keys)
    if lockstep:
        assert statuses["held"] == (writers - 1) * len(keys)
    assert live_leases(gateway) == 0 and waiters(gateway) == 0


async def test_a_parked_get_receives_the_block_the_holder_commits(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    async with KVGateClient(gateway.url) as kv:
        lease = await kv.acquire_lease("k", ttl_ms=5_000)
        assert isinstance(lease, Lease)
        parked = [asyncio.create_task(kv.get_block("k", wait_ms=10_000)) for _ in range(3)]
        await until(lambda: waiters(gateway) == 3)
        # HEAD waits too, and a plain GET does not.
        assert await kv.get("k") is None
        assert await kv.put("k", b"the prefill", lease_token=lease.token) is True
        results = await asyncio.gather(*parked)
    assert [r.data if r else None for r in results] == [b"the prefill"] * 3
    assert waiters(gateway) == 0 and live_leases(gateway) == 0
    async with http.post(f"{gateway.url}/v1/leases", json={"key": "k", "ttl_ms": 10}) as resp:
        assert resp.status == 200 and await resp.json() == {"exists": True}


async def test_waiters_get_404_when_the_lease_dies_or_their_wait_runs_out(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    async with KVGateClient(gateway.url) as kv:
        lease = await kv.acquire_lease("gone", ttl_ms=1_000)
        assert isinstance(lease, Lease)
        short = asyncio.create_task(kv.get_block("gone", wait_ms=500))
        long = asyncio.create_task(kv.get_block("gone", wait_ms=60_000))
        await until(lambda: waiters(gateway) == 2)
        gateway.scheduler.advance(0.6)  # the short wait times out; the lease is still live
        assert await short is None
        assert waiters(gateway) == 1 and live_leases(gateway) == 1
        gateway.scheduler.advance(0.5)  # the holder died: its lease expires, waking the rest
        assert await long is None
        assert live_leases(gateway) == 0
        # Released leases wake waiters too.
        again = await kv.acquire_lease("gone", ttl_ms=1_000)
        assert isinstance(again, Lease) and again.token > lease.token
        parked = asyncio.create_task(kv.get_block("gone", wait_ms=60_000))
        await until(lambda: waiters(gateway) == 1)
        await kv.release_lease(again.lease_id)
        assert await parked is None
        # Without any lease outstanding, wait_ms answers at once.
        assert await kv.get_block("gone", wait_ms=60_000) is None
    async with http.head(gateway.block_url("gone"), params={"wait_ms": "60000"}) as resp:
        assert resp.status == 404


async def test_shutdown_answers_parked_waiters(tmp_path: Path) -> None:
    async with running_gateway(tmp_path) as gw, KVGateClient(gw.url) as kv:
        lease = await kv.acquire_lease("k", ttl_ms=5_000)
        assert isinstance(lease, Lease)
        parked = asyncio.create_task(kv.get_block("k", wait_ms=60_000))
        await until(lambda: waiters(gw) == 1)
        await gw.app.shutdown()  # what graceful shutdown runs before draining requests
        assert await parked is None


# --------------------------------------------------------------------------- fencing


async def test_an_expired_holders_late_put_is_refused_after_a_newer_grant(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    async with KVGateClient(gateway.url) as kv:
        old = await kv.acquire_lease("k", ttl_ms=1_000)
        assert isinstance(old, Lease)
        busy = await kv.acquire_lease("k", ttl_ms=1_000)
        assert isinstance(busy, LeaseHeld) and 0 < busy.retry_after_ms <= 1_000
        gateway.scheduler.advance(1.5)  # the holder stalled past its lease
        new = await kv.acquire_lease("k", ttl_ms=1_000)
        assert isinstance(new, Lease) and new.token > old.token
        with pytest.raises(KVGateConflict) as stale:
            await kv.put("k", b"old holder's bytes", lease_token=old.token)
        assert stale.value.error == "stale_token"
        # Still refused once the newer lease has itself expired: tokens, not clocks, decide.
        gateway.scheduler.advance(5)
        with pytest.raises(KVGateConflict):
            await kv.put("k", b"old holder's bytes", lease_token=old.token)
        assert await kv.put("k", b"new holder's bytes", lease_token=new.token) is True
        assert await kv.get("k") == b"new holder's bytes"
        # The old holder's renew and release are no-ops for the new lease.
        with pytest.raises(KVGateNotFound):
            await kv.renew_lease(old.lease_id)
        await kv.release_lease(old.lease_id)


async def test_writes_to_a_leased_key_need_its_token(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    async with KVGateClient(gateway.url) as kv:
        lease = await kv.acquire_lease("k", ttl_ms=2_000)
        assert isinstance(lease, Lease)
        async with http.put(gateway.block_url("k"), data=b"no token") as resp:
            assert resp.status == 409
            assert (await resp.json())["error"] == "lease_conflict"
            assert int(resp.headers["Retry-After"]) >= 1
        async with http.put(
            gateway.block_url("k"), data=b"x", headers={"X-KV-Lease-Token": str(lease.token + 1)}
        ) as resp:
            assert resp.status == 409 and (await resp.json())["error"] == "stale_token"
        for bad in ("", "abc", "-1", "1" * 40, "²"):
            async with http.put(
                gateway.block_url("k"), data=b"x", headers={"X-KV-Lease-Token": bad}
            ) as resp:
                assert resp.status == 400, bad
        batch = await kv.batch_put({"k": b"batched", "free": b"batched"})
        assert batch == [("k", 409), ("free", 201)]
        assert await kv.get("k") is None
        # Renewing keeps the same token and pushes the deadline.
        expires = await kv.renew_lease(lease.lease_id, ttl_ms=10_000)
        assert expires > lease.expires_at_ms
        gateway.scheduler.advance(5)
        assert await kv.put("k", b"mine", lease_token=lease.token) is True
        assert await kv.get("k") == b"mine"
        with pytest.raises(KVGateConflict):
            await kv.renew_lease(lease.lease_id)  # committed: the lease is over


async def test_a_late_write_by_the_newest_holder_is_admitted(gateway: RunningGateway) -> None:
    async with KVGateClient(gateway.url) as kv:
        lease = await kv.acquire_lease("k", ttl_ms=1_000)
        assert isinstance(lease, Lease)
        gateway.scheduler.advance(2)  # expired, but nobody has been granted the key since
        assert await kv.put("k", b"late but newest", lease_token=lease.token) is True
        assert await kv.get("k") == b"late but newest"


async def test_a_holder_that_dies_mid_upload_leaves_nothing_and_frees_the_key(
    gateway: RunningGateway,
) -> None:
    async with KVGateClient(gateway.url) as kv:
        lease = await kv.acquire_lease("k", ttl_ms=1_000)
        assert isinstance(lease, Lease)
        parked = asyncio.create_task(kv.get_block("k", wait_ms=60_000))
        await until(lambda: waiters(gateway) == 1)
        host, port = gateway.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"PUT /v1/blocks/k HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
            + f"X-KV-Lease-Token: {lease.token}\r\n\r\n".encode()
            + b"half of a prefill"
        )
        writer.write_eof()  # the writer dies: the body ends early
        assert await reader.read() == b""  # the server drops the connection, answering nothing
        writer.close()
        assert await kv.get("k") is None and not gateway.hierarchy.contains("default/k")
        assert live_leases(gateway) == 1 and not parked.done()
        gateway.scheduler.advance(1.1)  # its lease runs out: the waiter is told, the key is free
        assert await parked is None
        again = await kv.acquire_lease("k", ttl_ms=1_000)
        assert isinstance(again, Lease) and again.token > lease.token


async def test_tokens_keep_growing_across_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with running_gateway(data) as gw, KVGateClient(gw.url) as kv:
        first = await kv.acquire_lease("k", ttl_ms=60_000)
        assert isinstance(first, Lease)
    async with running_gateway(data) as gw, KVGateClient(gw.url) as kv:
        second = await kv.acquire_lease("k", ttl_ms=60_000)
        assert isinstance(second, Lease) and second.token > first.token
        # The previous run's token is refused: this run cannot prove it is the newest.
        with pytest.raises(KVGateConflict):
            await kv.put("k", b"from before the restart", lease_token=first.token)
        assert await kv.put("k", b"after", lease_token=second.token) is True
    async with running_gateway(data) as gw, KVGateClient(gw.url) as kv:
        assert await kv.get("k") == b"after"
        assert isinstance(await kv.acquire_lease("k"), BlockExists)
        third = await kv.acquire_lease("other")
        assert isinstance(third, Lease) and third.token > second.token


async def test_lease_requests_are_validated(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    bad_bodies: list[object] = [
        {"ttl_ms": 10},
        {"key": 5},
        {"key": "bad key"},
        {"key": "k", "ttl_ms": 0},
        {"key": "k", "ttl_ms": "10"},
        {"key": "k", "ttl_ms": True},
        [],
    ]
    for body in bad_bodies:
        async with http.post(f"{gateway.url}/v1/leases", json=body) as resp:
            assert resp.status == 400, body
            assert set(await resp.json()) == {"error", "detail"}
    async with http.post(f"{gateway.url}/v1/leases", data=b"{not json") as resp:
        assert resp.status == 400
    async with http.post(f"{gateway.url}/v1/leases/{'x' * 200}/renew") as resp:
        assert resp.status == 400
    async with http.post(f"{gateway.url}/v1/leases/abc/renew", data=b"[1]") as resp:
        assert resp.status == 400


# --------------------------------------------------------------------------- pins


async def test_507_when_everything_is_pinned_then_pins_expire(tmp_path: Path) -> None:
    block = 16 * KiB
    async with (
        running_gateway(
            tmp_path, hbm_bytes=64 * KiB, dram_bytes=64 * KiB, disk_bytes=1 * MiB
        ) as gw,
        KVGateClient(gw.url) as kv,
    ):
        stored: list[str] = []
        full = False
        for i in range(400):
            key = f"p{i}"
            try:
                assert await kv.put(key, os.urandom(block)) is True
            except KVGateNoRoom as exc:
                assert exc.error == "no_room"
                full = True
                break
            stored.append(key)
            hits, _ = await kv.lookup([key], pin_ms=30_000)
            assert hits == 1
        assert full, "the tiers never filled up"
        # Nothing pinned was evicted to make room.
        assert (await kv.lookup(stored))[0] == len(stored)
        async with aiohttp.ClientSession() as http, http.get(f"{gw.url}/v1/stats") as resp:
            stats = await resp.json()
        assert stats["pinned_bytes"] == block * len(stored)
        assert stats["pinned_blocks"] == len(stored)
        gw.scheduler.advance(31)  # every pin runs out
        assert await kv.put("after-pins", os.urandom(block)) is True
        await gw.hierarchy.quiesce()  # demotions into the disk tier finish in the background
        assert (await kv.lookup(stored))[0] < len(stored)


async def test_a_get_can_pin_and_pins_are_bounded(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    async with KVGateClient(gateway.url) as kv:
        await kv.put("a", b"x" * 1000)
        await kv.put("b", b"y" * 500)
        assert (await kv.get_block("a", pin_ms=1_000)) is not None
        hits, _ = await kv.lookup(["b", "missing", "a"], pin_ms=2_000)
        assert hits == 1
    async with http.get(f"{gateway.url}/v1/stats") as resp:
        assert (await resp.json())["pinned_bytes"] == 1500
    gateway.scheduler.advance(1.5)
    async with http.get(f"{gateway.url}/v1/stats") as resp:
        assert (await resp.json())["pinned_bytes"] == 500
    for params in ({"pin_ms": "0"}, {"pin_ms": "x"}, {"pin_ms": "9999999"}):
        async with http.get(gateway.block_url("a"), params=params) as resp:
            assert resp.status == 400
    async with http.post(f"{gateway.url}/v1/lookup", json={"keys": ["a"], "pin_ms": -1}) as r:
        assert r.status == 400


# --------------------------------------------------------------------------- tenants


ALICE, BOB = "alice-token", "bob-token"


async def test_two_tenants_cannot_read_look_up_overwrite_or_lease_each_others_blocks(
    tmp_path: Path,
) -> None:
    tenants = (tenant("alice", ALICE), tenant("bob", BOB))
    async with (
        running_gateway(tmp_path, tenants=tenants) as gw,
        KVGateClient(gw.url, token=ALICE) as alice,
        KVGateClient(gw.url, token=BOB) as bob,
    ):
        a_lease = await alice.acquire_lease("k", ttl_ms=5_000)
        assert isinstance(a_lease, Lease)
        # Bob's "k" is another block: his own lease, no conflict, no waiting on alice's writer.
        b_lease = await bob.acquire_lease("k", ttl_ms=5_000)
        assert isinstance(b_lease, Lease)
        assert await asyncio.wait_for(bob.get_block("k2", wait_ms=60_000), 30) is None
        with pytest.raises(KVGateNotFound):
            await bob.renew_lease(a_lease.lease_id)
        await bob.release_lease(a_lease.lease_id)  # not his: nothing happens
        assert live_leases(gw) == 2
        with pytest.raises(KVGateConflict):  # alice's token means nothing for bob's key
            await bob.put("k", b"bob's bytes", lease_token=a_lease.token)
        same = b"the very same bytes" * 100
        assert await alice.put("k", same, lease_token=a_lease.token) is True
        assert await bob.get("k") is None
        assert await bob.lookup(["k"]) == (0, [])
        assert await bob.head("k") is None
        # No dedup across tenants: bob storing the same bytes is a fresh store (201, not 200).
        assert await bob.put("k", same, lease_token=b_lease.token) is True
        assert await bob.delete("k") is True
        assert await alice.get("k") == same
        hit = await alice.get_block("k")
        assert hit is not None and await alice.lookup(["k"]) == (1, [hit.tier])
        assert await bob.put("k", b"bob's own") is True
        assert await alice.get("k") == same and await bob.get("k") == b"bob's own"


async def test_a_tenant_writing_3x_its_quota_keeps_at_most_its_quota(tmp_path: Path) -> None:
    block = 16 * KiB
    quota = 16 * block
    tenants = (tenant("alice", ALICE, quota_bytes=quota), tenant("bob", BOB))
    async with (
        running_gateway(tmp_path, tenants=tenants) as gw,
        KVGateClient(gw.url, token=ALICE) as alice,
        KVGateClient(gw.url, token=BOB) as bob,
        aiohttp.ClientSession() as http,
    ):
        bob_blocks = {f"b{i}": os.urandom(block) for i in range(10)}
        for key, data in bob_blocks.items():
            assert await bob.put(key, data) is True
        written = [f"a{i}" for i in range(48)]

        async def write(key: str) -> None:
            assert await alice.put(key, os.urandom(block)) is True

        # Concurrent writes too: the quota holds whatever the interleaving.
        for start in range(0, len(written), 8):
            await asyncio.gather(*(write(k) for k in written[start : start + 8]))
            async with http.get(
                f"{gw.url}/v1/stats", headers={"Authorization": f"Bearer {ALICE}"}
            ) as resp:
                usage = (await resp.json())["tenant"]
            assert usage["name"] == "alice" and usage["quota_bytes"] == quota
            assert usage["used_bytes"] <= quota
        assert gw.hierarchy.tenant_bytes("alice") == quota
        present = [k for k in written if gw.hierarchy.contains(f"alice/{k}")]
        assert len(present) == 16
        assert set(present) >= set(written[-8:])  # the newest survive; the oldest went first
        for key, data in bob_blocks.items():
            assert await bob.get(key) == data
        # A block bigger than the whole quota can never fit: 507, nothing evicted.
        with pytest.raises(KVGateNoRoom) as never:
            await alice.put("huge", os.urandom(quota + 1))
        assert never.value.error == "quota_exceeded"
        assert gw.hierarchy.tenant_bytes("alice") == quota


async def test_empty_blocks_count_a_page_each_against_the_quota(tmp_path: Path) -> None:
    """Counted by their length, a flood of empty blocks took a whole arena page each and, inside
    any quota, pushed other tenants' blocks out of every tier."""
    page = SMALL_TIERS.page_bytes
    quota = 32 * page
    tenants = (tenant("alice", ALICE, quota_bytes=quota), tenant("bob", BOB))
    small = {"hbm_bytes": 1 * MiB, "dram_bytes": 2 * MiB, "disk_bytes": 4 * MiB}
    async with (
        running_gateway(tmp_path, tenants=tenants, shm=False, **small) as gw,
        KVGateClient(gw.url, token=ALICE) as alice,
        KVGateClient(gw.url, token=BOB) as bob,
    ):
        kept = os.urandom(256 * KiB)
        assert await bob.put("kept", kept) is True
        for start in range(0, 2048, 256):
            stored = await alice.put_many({f"zz{i}": b"" for i in range(start, start + 256)})
            assert {status for _, status in stored} == {201}
            assert gw.hierarchy.tenant_bytes("alice") <= quota
        assert gw.hierarchy.tenant_bytes("alice") == quota  # 32 blocks: her newest
        assert await bob.get("kept") == kept
        assert await alice.get("zz2047") == b""


async def _get_json(
    http: aiohttp.ClientSession, url: str, token: str | None, status: int = 200
) -> dict[str, Any]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    async with http.get(url, headers=headers) as resp:
        assert resp.status == status
        payload: dict[str, Any] = await resp.json()
        return payload


Read = Callable[..., Awaitable[dict[str, Any]]]
WATCH_BLOCK = 256 * KiB


@contextlib.asynccontextmanager
async def _bob_watches_alice(
    tmp_path: Path, path: str, **overrides: Any
) -> AsyncIterator[tuple[RunningGateway, Read, dict[str, Any], dict[str, Any]]]:
    """Bob stores and reads one block and reads ``path``; alice then works (blocks written,
    some evicted down, hits, a miss, a lease held); bob reads ``path`` again. Yields the
    gateway, ``read(token, status=200)`` of ``path``, and bob's two views."""
    tenants = (tenant("alice", ALICE), tenant("bob", BOB))
    async with (
        running_gateway(tmp_path, tenants=tenants, **overrides) as gw,
        KVGateClient(gw.url, token=ALICE) as alice,
        KVGateClient(gw.url, token=BOB) as bob,
        aiohttp.ClientSession() as http,
    ):
        read = partial(_get_json, http, f"{gw.url}{path}")
        assert await bob.put("mine", os.urandom(WATCH_BLOCK)) is True
        assert await bob.get("mine") is not None
        before = await read(BOB)
        for i in range(40):
            assert await alice.put(f"a{i}", os.urandom(WATCH_BLOCK)) is True
        for i in range(40):
            assert await alice.get(f"a{i}") is not None
        assert await alice.get("absent") is None
        assert isinstance(await alice.acquire_lease("pending", ttl_ms=5000), Lease)
        await gw.hierarchy.quiesce()
        yield gw, read, before, await read(BOB)


async def test_stats_show_a_tenant_only_its_own_share_of_the_tiers(tmp_path: Path) -> None:
    """With tenants, /v1/stats showed every tenant the tiers' totals: bob could watch alice's
    hits, misses, writes and evictions change. Now each sees its own share; totals stay on
    /metrics for the operator."""
    block = WATCH_BLOCK
    async with _bob_watches_alice(tmp_path, "/v1/stats") as (gw, stats, bob_before, bob_after):

        def activity(view: dict[str, Any]) -> tuple[object, ...]:
            # Where bob's own block lives may change (alice's writes pushed it down a tier: a
            # shared cache cannot hide that, and X-KV-Tier shows it anyway); nothing else may.
            tiers = view["tiers"]
            return (
                sum(t["blocks"] for t in tiers),
                sum(t["used_bytes"] for t in tiers),
                sum(t["hits"] for t in tiers),
                tiers[-1]["misses"],
                view["leases"],
                view["pinned_bytes"],
                view["pinned_blocks"],
                view["tenant"],
            )

        assert activity(bob_after) == activity(bob_before)
        assert activity(bob_after)[:4] == (1, block, 1, 0)
        assert bob_after["leases"]["live"] == 0
        # Capacities are the tiers' own; the device is shown as ever.
        totals = gw.hierarchy.stats()
        shown = [(t["name"], t["device"], t["capacity_bytes"]) for t in bob_after["tiers"]]
        assert shown == [(t.name, t.device, t.capacity_bytes) for t in totals]
        mine = await stats(ALICE)
        tiers = mine["tiers"]
        assert sum(t["blocks"] for t in tiers) == 40
        assert sum(t["used_bytes"] for t in tiers) == mine["tenant"]["used_bytes"]
        assert sum(t["hits"] for t in tiers) == 40
        assert tiers[-1]["misses"] == 1  # the one read no tier served
        assert sum(t["evictions"] for t in tiers) > 0  # 10 MiB does not fit the 8 MiB hot tier
        assert mine["leases"]["live"] == 1
        # Each tenant's blocks are counted once: the shares add up to the tiers' blocks.
        for i, total in enumerate(totals):
            assert tiers[i]["blocks"] + bob_after["tiers"][i]["blocks"] <= total.blocks


async def test_the_metrics_summary_shows_a_tenant_only_its_own_figures(tmp_path: Path) -> None:
    """/v1/metrics/summary (the dashboard's feed) answered every tenant with the totals: tier
    levels, hit and miss counts, per-tier latency counts and percentiles, leases. Now a tenant
    reads its own figures there as on /v1/stats; the metrics token reads the totals."""
    block = WATCH_BLOCK
    digest = hashlib.sha256(b"scraper").hexdigest()
    async with _bob_watches_alice(tmp_path, "/v1/metrics/summary", metrics_token_sha256=digest) as (
        gw,
        summary,
        bob_before,
        bob_after,
    ):

        def activity(view: dict[str, Any]) -> tuple[object, ...]:
            tiers = view["tiers"]
            return (
                sum(t["blocks"] for t in tiers),
                sum(t["used_bytes"] for t in tiers),
                [(t["hits"], t["misses"], t["tier_hits"], t["tier_misses"]) for t in tiers],
                [(t["get"]["count"], t["get"]["p50_ms"]) for t in tiers],
                [t["promotions"] for t in tiers],
                view["reads"],
                view["leases"],
            )

        # Only where bob's block lives may change (alice's writes push it down: a demotion,
        # which is a store into the tier below): his reads, latencies and leases stay put.
        before, after = activity(bob_before), activity(bob_after)
        assert after == before
        assert after[:2] == (1, block)

        def moved(view: dict[str, Any]) -> tuple[int, int]:
            tiers = view["tiers"]
            return sum(t["demotions"] for t in tiers), sum(t["put"]["count"] for t in tiers)

        demoted, stored = (a - b for a, b in zip(moved(bob_after), moved(bob_before), strict=True))
        assert stored == demoted
        assert bob_after["reads"] == {
            "total": 1, "hits": 1, "misses": 0, "hit_ratio": 1.0, "by_tier": {"hbm": 1}
        }  # fmt: skip
        assert bob_after["leases"] == {"live": 0, "waiters": 0}
        shown = [(t["name"], t["capacity_bytes"]) for t in bob_after["tiers"]]
        assert shown == [(t.name, t.capacity_bytes) for t in gw.hierarchy.stats()]
        # Alice sees her own work.
        mine = await summary(ALICE)
        assert sum(t["blocks"] for t in mine["tiers"]) == 40
        assert mine["reads"]["total"] == 41 and mine["reads"]["hits"] == 40
        assert mine["leases"]["live"] == 1
        assert sum(t["put"]["count"] for t in mine["tiers"]) >= 40
        assert sum(t["demotions"] for t in mine["tiers"]) > 0
        # The operator's token reads the totals: both tenants' reads and blocks.
        totals = await summary("scraper")
        assert totals["reads"]["total"] == 42
        assert sum(t["blocks"] for t in totals["tiers"]) == sum(
            t.blocks for t in gw.hierarchy.stats()
        )
        assert totals["leases"]["live"] == 1
        get_counts = [t["get"]["count"] for t in totals["tiers"]]
        assert get_counts == [
            a["get"]["count"] + b["get"]["count"]
            for a, b in zip(mine["tiers"], bob_after["tiers"], strict=True)
        ]
        # Strangers get nothing.
        assert (await summary(None, 401))["error"] == "unauthorized"
        assert (await summary("nope", 403))["error"] == "forbidden"
