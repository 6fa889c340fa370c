"""The shared remote tier and the Redis lease table, against a real redis-server.

Two gateways on loopback share one redis-server and act as one cache (``--remote``): a block
stored through one is served by the other, leases and fencing hold across both, waiters on one
are woken by a commit on the other, and a delete on one drops the other's copy.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from coherence.errors import LeaseConflict, LeaseLost, LeaseNotFound, StaleToken
from coherence.leases import Granted, Held, WaitOutcome
from coherence.redis_leases import RedisLeaseTable
from coherence.sched import FakeScheduler
from loadtest.procs import redis_server, redis_server_binary
from tests.conftest import SMALL_TIERS, RunningGateway, running_gateway
from tiers.base import PutOutcome
from tiers.block import Block
from tiers.clock import FakeClock
from tiers.remote import DEFAULT_PREFIX, POOL_CONNECTIONS, Fence, RemoteSettings, RemoteTier

pytestmark = pytest.mark.skipif(
    redis_server_binary() is None,
    reason="redis-server not installed (scripts/system-deps.sh installs it; CI always has it)",
)


@pytest.fixture
async def redis_url() -> AsyncIterator[str]:
    async with redis_server(max_bytes=256 * 1024 * 1024) as url:
        yield url


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    conn = aioredis.Redis.from_url(redis_url)
    try:
        yield conn
    finally:
        await conn.aclose()


def _block(size: int = 4096) -> Block:
    return Block.of(os.urandom(size), dtype="uint8", shape=(size,))


# --- the tier ---------------------------------------------------------------------------------


async def test_round_trip_first_writer_wins_and_delete(redis_url: str) -> None:
    tier = await RemoteTier.connect(RemoteSettings(url=redis_url, capacity_bytes=1 << 24))
    try:
        block = _block(200_000)  # over the inline codec size: the executor path
        assert await tier.put("t/a", block) is PutOutcome.STORED
        assert await tier.put("t/a", _block()) is PutOutcome.EXISTS
        got = await tier.get("t/a")
        assert got is not None and bytes(got.data) == bytes(block.data)
        assert got.meta.shape == (200_000,) and got.meta.digest == block.meta.digest
        assert await tier.present(["t/a", "t/b"]) == [True, False]
        await tier.refresh()
        stats = tier.stats()
        assert stats.name == "remote" and stats.blocks == 1
        assert 0 < stats.used_bytes <= stats.capacity_bytes
        assert await tier.delete("t/a") is True
        assert await tier.delete("t/a") is False
        assert await tier.get("t/a") is None
        await tier.refresh()
        assert tier.stats().used_bytes == 0 and tier.stats().blocks == 0
    finally:
        await tier.close()


async def test_a_block_past_its_ttl_is_absent_and_replaced(redis_url: str) -> None:
    clock = FakeClock(start=1_000_000.0)
    settings = RemoteSettings(url=redis_url, capacity_bytes=1 << 24)
    tier = await RemoteTier.connect(settings, clock=clock)
    other = await RemoteTier.connect(settings, clock=clock)  # a second gateway: nothing cached
    try:
        short = Block.of(b"old", expires_at=clock.time() + 5)
        assert await tier.put("t/ttl", short) is PutOutcome.STORED
        assert await other.present(["t/ttl"]) == [True]
        assert await other.put("t/ttl", Block.of(b"racing")) is PutOutcome.EXISTS
        clock.advance(5)
        # No read has dropped it: every gateway must still see it gone, and a put replace it.
        assert await other.present(["t/ttl"]) == [False]
        fresh = Block.of(b"new")
        assert await other.put("t/ttl", fresh) is PutOutcome.STORED
        got = await tier.get("t/ttl")
        assert got is not None and bytes(got.data) == b"new"
        assert await tier.present(["t/ttl"]) == [True]  # no TTL now: the old expiry went too
        await tier.refresh()
        assert tier.stats().blocks == 1  # the replaced frame left the shared totals
        assert tier.stats().used_bytes < 200
    finally:
        await tier.close()
        await other.close()


async def test_a_burst_past_the_pool_size_waits_instead_of_failing(redis_url: str) -> None:
    tier = await RemoteTier.connect(RemoteSettings(url=redis_url, capacity_bytes=1 << 24))
    try:
        assert await tier.put("t/burst", _block(1000)) is PutOutcome.STORED
        # More calls at once than the pool has connections: they queue, none fails.
        calls = [tier.get("t/burst") for _ in range(POOL_CONNECTIONS + 100)]
        got = await asyncio.gather(*calls)
        assert all(block is not None for block in got)
    finally:
        await tier.close()


async def test_the_first_call_after_redis_drops_connections_succeeds(
    redis_url: str, client: aioredis.Redis
) -> None:
    tier = await RemoteTier.connect(RemoteSettings(url=redis_url, capacity_bytes=1 << 24))
    try:
        assert await tier.put("t/blip", _block(1000)) is PutOutcome.STORED
        killed = await client.client_kill_filter(_type="normal", skipme=True)
        assert killed >= 1  # the tier's pooled connection is among them
        assert await tier.get("t/blip") is not None
        assert await tier.present(["t/blip"]) == [True]
    finally:
        await tier.close()


async def test_budget_evicts_the_shared_least_recently_used(redis_url: str) -> None:
    size = 8192
    # Random bytes do not compress: frames are size + a small header; room for three.
    tier = await RemoteTier.connect(RemoteSettings(url=redis_url, capacity_bytes=3 * size + 600))
    other = await RemoteTier.connect(RemoteSettings(url=redis_url, capacity_bytes=3 * size + 600))
    try:
        for key in ("k/1", "k/2", "k/3"):
            assert await tier.put(key, _block(size)) is PutOutcome.STORED
        assert await other.get("k/1") is not None  # another gateway's read counts as recent
        assert await tier.put("k/4", _block(size)) is PutOutcome.STORED
        assert await tier.present(["k/1", "k/2", "k/3", "k/4"]) == [True, False, True, True]
        await tier.refresh()
        stats = tier.stats()
        assert stats.blocks == 3 and stats.evictions == 1
        assert stats.used_bytes <= stats.capacity_bytes
        assert await tier.put("k/big", _block(4 * size)) is PutOutcome.TOO_LARGE
    finally:
        await tier.close()
        await other.close()


async def test_local_hits_refresh_the_shared_order_in_batches(redis_url: str) -> None:
    size = 8192
    tier = await RemoteTier.connect(RemoteSettings(url=redis_url, capacity_bytes=3 * size + 600))
    try:
        for key in ("k/1", "k/2", "k/3"):
            assert await tier.put(key, _block(size)) is PutOutcome.STORED
        for key in ("k/2", "k/1", "gone/1", "k/2"):  # served from a gateway's own tiers
            tier.note_access(key)
        await tier.flush_accesses()
        assert tier.touch_failures == 0
        assert await tier.client.zrange(f"{tier.prefix}:lru", 0, -1) == [b"k/3", b"k/1", b"k/2"]
        assert await tier.put("k/4", _block(size)) is PutOutcome.STORED
        assert await tier.present(["k/1", "k/2", "k/3", "k/4"]) == [True, True, False, True]
    finally:
        await tier.close()


async def test_a_block_hot_on_one_gateway_stays_in_the_shared_tier(
    tmp_path: Path, redis_url: str, http: aiohttp.ClientSession
) -> None:
    size = 8192
    async with AsyncExitStack() as stack:
        a, b = await _pair(stack, tmp_path, redis_url, remote_bytes=3 * size + 600)
        for i in (1, 2, 3):
            async with http.put(a.block_url(f"doc.{i}"), data=os.urandom(size)) as resp:
                assert resp.status == 201
        async with http.get(a.block_url("doc.1")) as resp:
            assert resp.status == 200 and resp.headers["X-KV-Tier"] != "remote"
        await a.hierarchy.quiesce()
        async with http.put(b.block_url("doc.4"), data=os.urandom(size)) as resp:
            assert resp.status == 201  # the shared tier evicts its least recently used
        shared = b.hierarchy.shared
        assert shared is not None
        assert await shared.present(["default/doc.1", "default/doc.2"]) == [True, False]
        # By default what Redis evicts stays local: the local tiers are not capped at
        # remote_bytes (remote_inclusive is off).
        assert a.hierarchy.contains("default/doc.2")


async def test_corrupt_value_is_a_miss_and_dropped(redis_url: str, client: aioredis.Redis) -> None:
    tier = await RemoteTier.connect(RemoteSettings(url=redis_url, capacity_bytes=1 << 24))
    try:
        assert await tier.put("t/x", _block()) is PutOutcome.STORED
        frame = await client.get(tier.block_key("t/x"))
        assert frame is not None
        await client.set(tier.block_key("t/x"), frame[:-1] + bytes([frame[-1] ^ 0xFF]))
        with pytest.raises(Exception, match="checksum"):
            await tier.get("t/x")
        assert await tier.present(["t/x"]) == [False]
    finally:
        await tier.close()


async def test_fence_is_checked_in_the_publishing_step(
    redis_url: str, client: aioredis.Redis
) -> None:
    tier = await RemoteTier.connect(RemoteSettings(url=redis_url, capacity_bytes=1 << 24))
    try:
        await client.hset("rec", mapping={"token": 7, "live": 1, "deadline_ms": 2000})
        # An unleased write while a live hold stands, and a write with another token: refused.
        assert await tier.put("t/f", _block(), fence=Fence("rec", None, 1000)) is (
            PutOutcome.FENCED
        )
        assert await tier.put("t/f", _block(), fence=Fence("rec", 6, 1000)) is PutOutcome.FENCED
        assert await tier.present(["t/f"]) == [False]
        # Past the deadline nobody holds it; the newest token may still write late.
        assert await tier.put("t/f", _block(), fence=Fence("rec", 7, 1000)) is PutOutcome.STORED
        assert await tier.put("t/g", _block(), fence=Fence("rec", None, 3000)) is (
            PutOutcome.STORED
        )
    finally:
        await tier.close()


async def test_staged_frames_never_outlive_their_put(
    redis_url: str, client: aioredis.Redis
) -> None:
    """A put SETs its frame under a staging key and the script renames or deletes it: whatever
    the outcome, no staging key is left and a stored block does not inherit the staging TTL."""
    size = 8192
    tier = await RemoteTier.connect(RemoteSettings(url=redis_url, capacity_bytes=2 * size + 400))
    try:
        await client.hset("rec", mapping={"token": 7, "live": 1, "deadline_ms": 2000})
        outcomes = [
            await tier.put("s/1", _block(size)),
            await tier.put("s/1", _block(size)),
            await tier.put("s/2", _block(size), fence=Fence("rec", 6, 1000)),
            await tier.put("s/3", _block(4 * size)),
            await tier.put("s/4", _block(size)),
        ]
        assert outcomes == [
            PutOutcome.STORED,
            PutOutcome.EXISTS,
            PutOutcome.FENCED,
            PutOutcome.TOO_LARGE,
            PutOutcome.STORED,
        ]
        assert [k async for k in client.scan_iter(match=f"{tier.prefix}:stage:*")] == []
        assert await client.pttl(tier.block_key("s/1")) == -1  # no expiry
        got = await tier.get("s/4")
        assert got is not None and got.meta.size == size
    finally:
        await tier.close()


# --- the lease table --------------------------------------------------------------------------


async def _tables(
    client: aioredis.Redis, clock: FakeClock, scheduler: FakeScheduler, n: int = 2
) -> list[RedisLeaseTable]:
    tables = [RedisLeaseTable(client, clock=clock, scheduler=scheduler) for _ in range(n)]
    for table in tables:
        await table.open()
    return tables


async def test_one_writer_across_tables_with_fencing(client: aioredis.Redis) -> None:
    clock = FakeClock()
    scheduler = FakeScheduler(clock)
    a, b = await _tables(client, clock, scheduler)
    try:
        first = await a.acquire("t/k", 1000)
        assert isinstance(first, Granted)
        held = await b.acquire("t/k", 1000)
        assert isinstance(held, Held) and 0 < held.retry_after_ms <= 1000
        with pytest.raises(LeaseConflict):
            await b.check_write("t/k", None)
        with pytest.raises(StaleToken):
            await b.check_write("t/k", first.token + 1)
        permit = await b.check_write("t/k", first.token)  # the holder may write via any gateway
        assert permit.lease_id == first.lease_id
        clock.advance(1.5)  # the holder went silent past its TTL
        second = await b.acquire("t/k", 1000)
        assert isinstance(second, Granted) and second.token > first.token
        with pytest.raises(StaleToken):
            await a.check_write("t/k", first.token)  # fenced, whatever the clock says
        with pytest.raises(LeaseNotFound):
            await a.renew(first.lease_id, 1000)  # superseded, as in the in-process table
        with pytest.raises(LeaseNotFound):
            await b.renew(second.lease_id, 1000, tenant="other")
        assert await b.renew(second.lease_id, 5000) == int(clock.time() * 1000) + 5000
        clock.advance(6)
        with pytest.raises(LeaseLost):
            await b.renew(second.lease_id, 1000)  # expired, not superseded: 409
        third = await a.acquire("t/k", 1000)
        assert isinstance(third, Granted)
        assert await b.release(third.lease_id) is True  # any gateway may release it
        assert isinstance(await a.acquire("t/k", 1000), Granted)
    finally:
        for table in (a, b):
            await table.close()


async def test_commit_on_one_table_wakes_a_waiter_on_another(client: aioredis.Redis) -> None:
    clock = FakeClock()
    scheduler = FakeScheduler(clock)
    a, b = await _tables(client, clock, scheduler)
    try:
        assert await b.wait("t/w", 1000) is WaitOutcome.NO_LEASE
        lease = await a.acquire("t/w", 5000)
        assert isinstance(lease, Granted)
        waiting = asyncio.create_task(b.wait("t/w", 3000))
        await _until(lambda: scheduler.pending() == 1)  # parked, its timer armed
        assert await a.commit(lease.lease_id, lease.token, key="t/w") is True
        assert await asyncio.wait_for(waiting, 5) is WaitOutcome.COMMITTED
        # A lease that expires unreleased: the waiter hears GONE at its deadline.
        again = await a.acquire("t/w", 200)
        assert isinstance(again, Granted)
        waiting = asyncio.create_task(b.wait("t/w", 3000))
        await _until(lambda: scheduler.pending() == 1)
        scheduler.advance(0.25)
        assert await asyncio.wait_for(waiting, 5) is WaitOutcome.GONE
        # And one that outlives the wait: TIMEOUT.
        third = await a.acquire("t/w", 5000)
        assert isinstance(third, Granted)
        waiting = asyncio.create_task(b.wait("t/w", 100))
        await _until(lambda: scheduler.pending() == 1)
        scheduler.advance(0.15)
        assert await asyncio.wait_for(waiting, 5) is WaitOutcome.TIMEOUT
    finally:
        for table in (a, b):
            await table.close()


async def test_a_lease_released_elsewhere_is_not_counted_live(client: aioredis.Redis) -> None:
    clock = FakeClock()
    a, b = await _tables(client, clock, FakeScheduler(clock))
    try:
        lease = await a.acquire("t/s", 60_000)
        assert isinstance(lease, Granted) and a.stats().live == 1
        assert await b.release(lease.lease_id) is True
        await _until(lambda: a.stats().live == 0)  # heard through the release event
        again = await a.acquire("t/s", 60_000)
        assert isinstance(again, Granted)
        assert await b.commit(again.lease_id, again.token, key="t/s") is True
        await _until(lambda: a.stats().live == 0)
    finally:
        for table in (a, b):
            await table.close()


class _ReplyDropper:
    """A TCP proxy in front of redis-server that can lose one reply: the command reaches Redis
    and runs, then the connection is cut before its answer gets back (a network blip)."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self._armed: bytes | None = None
        self.dropped = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    def drop_reply_to(self, command: bytes) -> None:
        self._armed = command

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._upstream_port)
        doomed = asyncio.Event()

        async def upstream() -> None:
            while data := await reader.read(65536):
                if self._armed is not None and self._armed in data:
                    self._armed = None
                    doomed.set()
                up_writer.write(data)
                await up_writer.drain()

        async def downstream() -> None:
            while data := await up_reader.read(65536):
                if doomed.is_set():
                    self.dropped += 1
                    return
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        for w in (writer, up_writer):
            w.close()


async def test_an_acquire_whose_reply_was_lost_is_granted_on_the_retry(
    redis_url: str, client: aioredis.Redis
) -> None:
    # The tier's client retries a call whose connection dropped. The acquire had already run
    # in Redis, so the retry must find its own grant, not answer 409 to the lease's holder.
    proxy = _ReplyDropper(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
    url = await proxy.start()
    tier = await RemoteTier.connect(RemoteSettings(url=url, capacity_bytes=1 << 24))
    clock = FakeClock()
    table = RedisLeaseTable(tier.client, clock=clock, scheduler=FakeScheduler(clock))
    await table.open()
    (other,) = await _tables(client, clock, FakeScheduler(clock), n=1)
    try:
        assert isinstance(await table.acquire("t/warm", 1000), Granted)  # loads the script
        proxy.drop_reply_to(b"EVALSHA")
        lease = await table.acquire("t/k", 1000)
        assert proxy.dropped == 1
        assert isinstance(lease, Granted)
        assert isinstance(await other.acquire("t/k", 1000), Held)  # still one writer
        permit = await table.check_write("t/k", lease.token)
        assert permit.lease_id == lease.lease_id
        assert await table.commit(lease.lease_id, lease.token, key="t/k") is True
    finally:
        for t in (table, other):
            await t.close()
        await tier.close()
        await proxy.close()


async def _until(ready: Callable[[], bool]) -> None:
    """Let other tasks run (Redis round trips on loopback) until ``ready``; no time is faked."""
    for _ in range(2000):
        if ready():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition never became true")


# --- two gateways, one cache ------------------------------------------------------------------


async def _pair(
    stack: AsyncExitStack, tmp_path: Path, url: str, **overrides: Any
) -> tuple[RunningGateway, RunningGateway]:
    settings: dict[str, Any] = {"remote_bytes": 64 << 20, "shm": False, **overrides}
    a = await stack.enter_async_context(running_gateway(tmp_path / "a", remote=url, **settings))
    b = await stack.enter_async_context(running_gateway(tmp_path / "b", remote=url, **settings))
    return a, b


@pytest.mark.parametrize("disk_bytes", [SMALL_TIERS.disk_bytes, 0], ids=["disk", "ram-only"])
async def test_two_gateways_act_as_one_cache(
    tmp_path: Path, redis_url: str, http: aiohttp.ClientSession, disk_bytes: int
) -> None:
    async with AsyncExitStack() as stack:
        a, b = await _pair(stack, tmp_path, redis_url, disk_bytes=disk_bytes)
        assert len(b.hierarchy.tiers) == (3 if disk_bytes else 2)
        body = os.urandom(300_000)
        async with http.put(a.block_url("doc.0"), data=body) as resp:
            assert resp.status == 201
        async with http.get(b.block_url("doc.0")) as resp:
            assert resp.status == 200 and resp.headers["X-KV-Tier"] == "remote"
            assert await resp.read() == body
        await b.hierarchy.quiesce()  # the remote hit was admitted into b's own tiers
        async with http.get(b.block_url("doc.0")) as resp:
            assert resp.headers["X-KV-Tier"] == "hbm" and await resp.read() == body
        async with http.get(f"{b.url}/metrics") as resp:
            metrics = await resp.text()
        assert 'tier="remote"' in metrics  # per-tier latency covers the shared tier too
        async with http.put(b.block_url("doc.0"), data=body) as resp:
            assert resp.status == 200  # first writer wins across gateways
        async with http.put(b.block_url("doc.1"), data=b"x" * 1000) as resp:
            assert resp.status == 201
        payload = {"keys": ["doc.0", "doc.1", "doc.2"]}
        async with http.post(f"{a.url}/v1/lookup", json=payload) as resp:
            assert await resp.json() == {"prefix_hits": 2, "tiers": ["hbm", "remote"]}
        async with http.get(f"{a.url}/v1/stats") as resp:
            tiers = (await resp.json())["tiers"]
        local = ["hbm", "dram", "disk"] if disk_bytes else ["hbm", "dram"]
        assert [t["name"] for t in tiers] == [*local, "remote"]
        assert tiers[-1]["blocks"] == 2 and tiers[-1]["device"].startswith("redis://")
        assert tiers[-1]["used_bytes"] <= tiers[-1]["capacity_bytes"]
        # Delete through one: gone from the other, local copy included.
        async with http.delete(a.block_url("doc.0")) as resp:
            assert resp.status == 204
        # The invalidation travels through Redis pub/sub.
        await _until(lambda: not b.hierarchy.contains("default/doc.0"))
        async with http.get(b.block_url("doc.0")) as resp:
            assert resp.status == 404


async def test_leases_and_waiters_span_gateways(
    tmp_path: Path, redis_url: str, http: aiohttp.ClientSession
) -> None:
    async with AsyncExitStack() as stack:
        a, b = await _pair(stack, tmp_path, redis_url)
        async with http.post(f"{a.url}/v1/leases", json={"key": "k", "ttl_ms": 5000}) as resp:
            assert resp.status == 201
            lease = await resp.json()
        async with http.post(f"{b.url}/v1/leases", json={"key": "k", "ttl_ms": 5000}) as resp:
            assert resp.status == 409 and (await resp.json())["retry_after_ms"] > 0
        async with http.put(b.block_url("k"), data=b"intruder") as resp:
            assert resp.status == 409
        parked = asyncio.create_task(_get(http, b.block_url("k") + "?wait_ms=5000"))
        await _until(lambda: _waiters(b) == 1)  # the GET travels to b and parks
        headers = {"X-KV-Lease-Token": str(lease["token"])}
        async with http.put(a.block_url("k"), data=b"the block", headers=headers) as resp:
            assert resp.status == 201
        status, body = await asyncio.wait_for(parked, 10)
        assert (status, body) == (200, b"the block")
        async with http.post(f"{b.url}/v1/leases", json={"key": "k"}) as resp:
            assert resp.status == 200 and await resp.json() == {"exists": True}
        async with http.post(f"{b.url}/v1/leases/{lease['lease_id']}/renew") as resp:
            assert resp.status == 409  # committed: lost, on every gateway


def _waiters(gw: RunningGateway) -> int:
    from gateway.state import STATE

    return gw.app[STATE].coherent.lease_stats().waiters


async def _get(http: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with http.get(url) as resp:
        return resp.status, await resp.read()


async def test_real_cli_gateways_share_one_redis(
    tmp_path: Path, redis_url: str, http: aiohttp.ClientSession
) -> None:
    """The compose topology as local processes: two `kvgate serve --remote` and one Redis."""
    from tests.test_http_process import start_server

    a = await start_server(tmp_path / "a", "--remote", redis_url, "--no-shm")
    b = await start_server(tmp_path / "b", "--remote", redis_url, "--no-shm")
    try:
        body = os.urandom(1 << 20)
        async with http.put(f"{a.url}/v1/blocks/layer0.blk7", data=body) as resp:
            assert resp.status == 201
        async with http.get(f"{b.url}/v1/blocks/layer0.blk7") as resp:
            assert resp.status == 200 and resp.headers["X-KV-Tier"] == "remote"
            assert await resp.read() == body
    finally:
        for server in (a, b):
            server.proc.terminate()
            assert await server.wait() == 0


async def test_redis_going_away_degrades_never_500(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Redis gone: reads are served locally or missed, writes and leases answer 503."""
    server = redis_server(max_bytes=64 << 20)
    url = await server.__aenter__()
    running = True
    async with AsyncExitStack() as stack:
        stack.push_async_callback(
            lambda: server.__aexit__(None, None, None) if running else _none()
        )
        gw = await stack.enter_async_context(
            running_gateway(tmp_path / "a", remote=url, remote_bytes=64 << 20, shm=False)
        )
        async with http.put(gw.block_url("before"), data=b"kept locally") as resp:
            assert resp.status == 201
        running = False
        await server.__aexit__(None, None, None)  # redis-server stops here, mid-run
        async with http.get(gw.block_url("before")) as resp:
            assert resp.status == 200 and await resp.read() == b"kept locally"
        async with http.get(gw.block_url("elsewhere")) as resp:
            assert resp.status == 404  # the remote read failed: a miss
        async with http.put(gw.block_url("after"), data=b"unfenceable") as resp:
            # Whether another gateway holds a lease cannot be known: refused, not guessed.
            assert resp.status == 503 and (await resp.json())["error"] == "unavailable"
        async with http.post(f"{gw.url}/v1/lookup", json={"keys": ["before", "x"]}) as resp:
            assert resp.status == 200 and (await resp.json())["prefix_hits"] == 1
        async with http.post(f"{gw.url}/v1/leases", json={"key": "k"}) as resp:
            assert resp.status == 503 and (await resp.json())["error"] == "unavailable"
        async with http.get(f"{gw.url}/v1/stats") as resp:
            assert resp.status == 200
        for method in ("GET", "HEAD"):
            # Nothing to wait for that can be known: the miss it is, as without wait_ms.
            url = gw.block_url("elsewhere")
            async with http.request(method, url, params={"wait_ms": "50"}) as resp:
                assert resp.status == 404
        async with http.delete(gw.block_url("before")) as resp:
            # Other gateways may still serve the shared copy: not reported as deleted.
            assert resp.status == 503 and (await resp.json())["error"] == "unavailable"


async def test_a_delete_during_a_remote_hits_copy_in_stays_deleted(
    tmp_path: Path, redis_url: str, http: aiohttp.ClientSession
) -> None:
    async with AsyncExitStack() as stack:
        a, b = await _pair(stack, tmp_path, redis_url)
        async with http.put(b.block_url("doc"), data=os.urandom(100_000)) as resp:
            assert resp.status == 201
        key = "default/doc"
        hit = await a.hierarchy.get(key)
        assert hit is not None and hit.tier == "remote"  # its copy into a's tiers is under way
        # What b's delete announcement does on a: drop the local copy, which is not there yet.
        await a.hierarchy.delete(key, local_only=True)
        await a.hierarchy.quiesce()
        assert not a.hierarchy.contains(key)  # the copy in was fenced off, not published
        # The same race with a's own delete, shared copy included.
        async with http.put(b.block_url("doc2"), data=os.urandom(100_000)) as resp:
            assert resp.status == 201
        assert (await a.hierarchy.get("default/doc2")) is not None
        assert await a.hierarchy.delete("default/doc2") is True
        await a.hierarchy.quiesce()
        async with http.get(a.block_url("doc2")) as resp:
            assert resp.status == 404


async def _none() -> None:
    return None


async def test_remote_bench_smoke() -> None:
    """loadtest.remote_bench runs end to end (numbers are for docs/remote.md, not asserted)."""
    from loadtest.remote_bench import run

    result = await run(blocks=4, block_size=64 * 1024, concurrency=2, rounds=1)
    assert result["scenario"] == "remote-get"
    assert result["kvgate_remote_gbps_median"] > 0 and result["redis_get_gbps_median"] > 0
    assert result["kvgate_put_gbps"][0] > 0 and result["put_ratio"] is not None


async def test_remote_bench_counts_every_job_across_workers() -> None:
    """The byte count is summed across concurrent workers without losing updates (a
    `total += await job()` race once undercounted both readers about 15x)."""
    from loadtest.remote_bench import _gather_limited

    async def job() -> int:
        await asyncio.sleep(0)  # every worker is suspended mid-update at least once
        return 3

    assert await _gather_limited([job] * 50, 8) == 150


async def test_a_tenants_tokens_in_redis_do_not_count_other_tenants_leases(
    client: aioredis.Redis,
) -> None:
    clock = FakeClock()
    (table,) = await _tables(client, clock, FakeScheduler(clock), n=1)
    # Older gateways drew every token from one counter, which may run ahead of the clock floor:
    # the per-tenant counters start above it, so no token repeats one handed out before.
    legacy = int(clock.time() * 1_000_000) + 10_000
    await client.set(f"{DEFAULT_PREFIX}:fence", legacy)
    try:
        first = await table.acquire("alice/a0", 1000)
        assert isinstance(first, Granted) and first.token > legacy
        for i in range(5):
            assert isinstance(await table.acquire(f"bob/b{i}", 1000), Granted)
        again = await table.acquire("alice/a1", 1000)
        assert isinstance(again, Granted) and again.token == first.token + 1
        # Each tenant's view of this gateway's leases holds its own only.
        assert (table.stats("alice").live, table.stats("bob").live, table.stats().live) == (2, 5, 7)
    finally:
        await table.close()


async def test_remote_inclusive_a_block_evicted_from_the_shared_tier_leaves_every_gateway(
    tmp_path: Path, redis_url: str, http: aiohttp.ClientSession
) -> None:
    """Without it a block Redis evicted stays in the local tiers of the gateways that had it:
    another gateway can then store different bytes under the key, and the fleet serves two
    versions of one block."""
    size = 8192
    async with AsyncExitStack() as stack:
        a, b = await _pair(
            stack, tmp_path, redis_url, remote_bytes=3 * size + 600, remote_inclusive=True
        )
        old = os.urandom(size)
        async with http.put(a.block_url("doc.1"), data=old) as resp:
            assert resp.status == 201
        async with http.get(b.block_url("doc.1")) as resp:  # b copies it in from Redis
            assert resp.status == 200 and await resp.read() == old
        await b.hierarchy.quiesce()
        assert b.hierarchy.contains("default/doc.1")
        for i in (2, 3, 4):  # a's own puts push doc.1 out of the shared tier
            async with http.put(a.block_url(f"doc.{i}"), data=os.urandom(size)) as resp:
                assert resp.status == 201
        shared = a.hierarchy.shared
        assert shared is not None
        assert await shared.present(["default/doc.1"]) == [False]
        await _until(lambda: not a.hierarchy.contains("default/doc.1"))  # its own, at once
        await _until(lambda: not b.hierarchy.contains("default/doc.1"))  # b's, by pub/sub
        new = os.urandom(size)
        async with http.put(b.block_url("doc.1"), data=new) as resp:
            assert resp.status == 201  # the key is free again: one version fleet-wide
        for gw in (a, b):
            async with http.get(gw.block_url("doc.1")) as resp:
                assert resp.status == 200 and await resp.read() == new
