"""Hierarchy behaviour over real arena tiers: placement, demotion, promotion, budgets."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from tests.tierkit import PAGE, payload
from tiers.block import Block
from tiers.clock import FakeClock
from tiers.hierarchy import Hierarchy, HierarchyConfig, StoreOutcome
from tiers.memory import ArenaTier

BLOCK = 2 * PAGE


def three_tiers(hot: int = 2, warm: int = 3, cold: int = 4) -> list[ArenaTier]:
    """Capacities in blocks of BLOCK bytes."""
    return [
        ArenaTier("hbm", hot * BLOCK, page_bytes=PAGE),
        ArenaTier("dram", warm * BLOCK, page_bytes=PAGE),
        ArenaTier("cold", cold * BLOCK, page_bytes=PAGE),
    ]


async def put(h: Hierarchy, key: str, size: int = BLOCK, **kw: object) -> StoreOutcome:
    return await h.put(key, Block.of(payload(key, size), **kw))  # type: ignore[arg-type]


def where(h: Hierarchy, *keys: str) -> list[str | None]:
    return [h.locate(k) for k in keys]


async def test_put_lands_hot_and_lru_victims_move_one_tier_down() -> None:
    h = Hierarchy(three_tiers())
    for k in ["a", "b"]:
        assert await put(h, k) is StoreOutcome.STORED
    assert where(h, "a", "b") == ["hbm", "hbm"]
    await put(h, "c")  # evicts a (LRU) to dram
    assert where(h, "a", "b", "c") == ["dram", "hbm", "hbm"]
    for k in ["d", "e", "f", "g"]:
        await put(h, k)
    # hbm: f g; dram: c d e; cold: a b
    assert where(h, "a", "b", "c", "d", "e", "f", "g") == [
        "cold", "cold", "dram", "dram", "dram", "hbm", "hbm",
    ]  # fmt: skip
    assert h.demotions() == {"hbm": 5, "dram": 2, "cold": 0}


async def test_last_tier_eviction_drops_the_block() -> None:
    h = Hierarchy(three_tiers(1, 1, 1))
    for k in ["a", "b", "c", "d"]:
        await put(h, k)
    assert where(h, "a", "b", "c", "d") == [None, "cold", "dram", "hbm"]
    assert await h.get("a") is None
    assert len(h) == 3


async def test_hit_in_colder_tier_promotes_to_hottest() -> None:
    h = Hierarchy(three_tiers())
    for k in "abcdefg":
        await put(h, k)
    hit = await h.get("a")
    assert hit is not None and hit.tier == "cold" and bytes(hit.block.data) == payload("a", BLOCK)
    await h.quiesce()
    assert h.locate("a") == "hbm"
    assert h.promotions()["cold"] == 1
    # Promotion made room by demoting hbm's LRU victim one tier down.
    assert h.locate("f") == "dram"
    hit = await h.get("a")
    assert hit is not None and hit.tier == "hbm"


async def test_promotion_can_be_switched_off() -> None:
    h = Hierarchy(three_tiers(), config=HierarchyConfig(promote_on_hit=False))
    for k in "abcdefg":
        await put(h, k)
    await h.get("a")
    await h.quiesce()
    assert h.locate("a") == "cold"


async def test_prefetch_promotes_in_background() -> None:
    h = Hierarchy(three_tiers())
    for k in "abcdefg":
        await put(h, k)
    assert await h.prefetch(["a", "b", "g", "zz"]) == 2
    await h.quiesce()
    assert where(h, "a", "b") == ["hbm", "hbm"]


async def test_second_put_is_exists_and_keeps_first_bytes() -> None:
    h = Hierarchy(three_tiers())
    assert await h.put("k", Block.of(b"one")) is StoreOutcome.STORED
    assert await h.put("k", Block.of(b"two")) is StoreOutcome.EXISTS
    hit = await h.get("k")
    assert hit is not None and bytes(hit.block.data) == b"one"


async def test_concurrent_puts_of_one_key_store_once() -> None:
    h = Hierarchy(three_tiers())
    for k in "abcde":  # full hbm: each store has to demote, so the puts interleave
        await put(h, k)
    outcomes = await asyncio.gather(*(put(h, "same") for _ in range(8)))
    assert outcomes.count(StoreOutcome.STORED) == 1
    assert outcomes.count(StoreOutcome.EXISTS) == 7
    assert sum(t.stats().blocks for t in h.tiers) == 6


async def test_too_large_and_fallthrough_to_a_bigger_tier() -> None:
    h = Hierarchy(three_tiers(1, 1, 4))
    assert await put(h, "big", 3 * BLOCK) is StoreOutcome.STORED
    assert h.locate("big") == "cold"
    assert await put(h, "huge", 5 * BLOCK) is StoreOutcome.TOO_LARGE


async def test_pinned_blocks_are_never_victims_and_no_room_is_reported() -> None:
    pinned: set[str] = set()
    h = Hierarchy(three_tiers(1, 1, 1), is_pinned=pinned.__contains__)
    for k in "abc":
        await put(h, k)
    pinned.update("abc")
    assert await put(h, "d") is StoreOutcome.NO_ROOM
    assert where(h, "a", "b", "c", "d") == ["cold", "dram", "hbm", None]
    pinned.discard("a")
    assert await put(h, "d") is StoreOutcome.STORED
    # hbm and dram hold only pinned blocks, so d lands where a victim could be found.
    assert where(h, "a", "b", "c", "d") == [None, "dram", "hbm", "cold"]


async def test_delete_removes_from_every_tier() -> None:
    h = Hierarchy(three_tiers())
    for k in "abcdefg":
        await put(h, k)
    for k in "abcdefg":
        assert await h.delete(k) is True
    assert await h.delete("a") is False
    assert all(t.stats().blocks == 0 and t.stats().used_bytes == 0 for t in h.tiers)


async def test_delete_racing_a_promotion_wins() -> None:
    h = Hierarchy(three_tiers())
    for k in "abcdefg":
        await put(h, k)
    await h.get("a")  # schedules the promotion
    await h.delete("a")
    await h.quiesce()
    assert h.locate("a") is None
    assert await h.get("a") is None
    assert not any(t.contains("a") for t in h.tiers)


async def test_lookup_returns_tiers_of_the_longest_present_prefix() -> None:
    h = Hierarchy(three_tiers())
    for k in "abcdefg":
        await put(h, k)
    assert h.lookup(["g", "f", "a", "zz", "b"]) == ["hbm", "hbm", "cold"]
    assert h.lookup(["zz", "a"]) == []
    assert h.lookup([]) == []


async def test_ttl_bounds_serving() -> None:
    clock = FakeClock()
    h = Hierarchy(three_tiers(), clock=clock)
    await put(h, "short", expires_at=clock.time() + 5)
    await put(h, "forever")
    assert h.locate("short") == "hbm"
    clock.advance(5)
    assert h.locate("short") is None
    assert h.lookup(["short"]) == []
    assert await h.get("short") is None
    assert not h.tiers[0].contains("short")
    assert (await h.get("forever")) is not None


async def test_a_put_over_an_expired_block_is_served() -> None:
    clock = FakeClock()
    h = Hierarchy(three_tiers(), clock=clock)
    await put(h, "alice/k", BLOCK, expires_at=clock.time() + 1)
    clock.advance(1)
    # No read saw it expire: the put must still replace it, not inherit its index entry.
    assert await h.put("alice/k", Block.of(b"v2" * 100)) is StoreOutcome.STORED
    hit = await h.get("alice/k")
    assert hit is not None and bytes(hit.block.data) == b"v2" * 100
    clock.advance(3600)
    assert (await h.get("alice/k")) is not None  # the new block has no TTL
    assert h.tenant_bytes("alice") == 200


async def test_ttl_outlives_a_graceful_restart(tmp_path: Path) -> None:
    from tiers.disk import DiskTier

    clock = FakeClock()

    async def start() -> Hierarchy:
        disk = await DiskTier.open(tmp_path / "disk", capacity_bytes=1 << 20)
        h = Hierarchy([ArenaTier("hbm", 4 * BLOCK, page_bytes=PAGE), disk], clock=clock)
        await h.open()
        return h

    h = await start()
    await put(h, "short", expires_at=clock.time() + 5)
    await put(h, "gone", expires_at=clock.time() + 1)
    await put(h, "forever")
    await h.close()  # spills the hot tier to disk
    clock.advance(1)
    h = await start()
    try:
        assert h.locate("short") == "disk"
        assert h.locate("gone") is None
        assert not h.tiers[1].contains("gone")  # the restart reclaims its disk bytes
        assert (await h.get("short")) is not None
        clock.advance(4)
        assert h.locate("short") is None
        assert await h.get("short") is None
        hit = await h.get("forever")
        assert hit is not None and bytes(hit.block.data) == payload("forever", BLOCK)
    finally:
        await h.close()


async def test_tier_stats_count_the_misses_the_index_answered() -> None:
    h = Hierarchy(three_tiers(hot=1, warm=1, cold=4))
    for k in ("a", "b", "c"):
        await put(h, k)
    await h.quiesce()
    assert where(h, "a", "b", "c") == ["cold", "dram", "hbm"]
    assert await h.get("nope") is None  # misses everywhere
    assert (await h.get("b")) is not None  # misses hbm, hits dram
    await h.quiesce()
    misses = {s.name: s.misses for s in h.stats()}
    hits = {s.name: s.hits for s in h.stats()}
    assert misses == {"hbm": 2, "dram": 1, "cold": 1}
    assert hits["dram"] == 1


async def test_tenant_bytes_follow_blocks() -> None:
    h = Hierarchy(three_tiers())
    await put(h, "alice/a", 100)
    await put(h, "alice/b", 50)
    await put(h, "bob/a", 70)
    assert h.tenant_bytes("alice") == 150 and h.tenant_bytes("bob") == 70
    await h.delete("alice/a")
    assert h.tenant_bytes("alice") == 50


async def test_random_workload_keeps_budgets_and_bytes() -> None:
    rng = random.Random(7)
    h = Hierarchy(three_tiers(3, 4, 6))
    written: dict[str, int] = {}
    for step in range(600):
        key = f"k{rng.randrange(40)}"
        op = rng.random()
        if op < 0.45:
            size = rng.choice([1, PAGE, BLOCK, 3 * PAGE])
            outcome = await put(h, key, size)
            if outcome is StoreOutcome.STORED:
                written[key] = size
        elif op < 0.85:
            hit = await h.get(key)
            if hit is not None:
                assert bytes(hit.block.data) == payload(key, written[key])
        elif op < 0.95:
            await h.delete(key)
        else:
            await h.prefetch([key])
        if step % 7 == 0:
            await h.quiesce()
        for tier in h.tiers:
            s = tier.stats()
            assert s.used_bytes <= s.capacity_bytes, (step, s)
    await h.quiesce()
    # Every key is in at most one tier, and the index agrees with the tiers.
    for key in written:
        holders = [t.name for t in h.tiers if t.contains(key)]
        assert len(holders) <= 1
        assert h.locate(key) == (holders[0] if holders else None)


@pytest.mark.parametrize("n", [1, 3])
async def test_write_through_keeps_a_durable_copy(n: int) -> None:
    # The last tier stands in for the persistent tier: mark it non-volatile.
    tiers = three_tiers(1, 1, 8)
    tiers[2].volatile = False  # type: ignore[misc]
    h = Hierarchy(tiers, config=HierarchyConfig(write_through=True))
    keys = [f"w{i}" for i in range(n)]
    for k in keys:
        assert await put(h, k) is StoreOutcome.STORED
    assert all(tiers[2].contains(k) for k in keys)
    assert h.locate(keys[-1]) == "hbm"
    assert await h.spill() == 0  # nothing volatile-only to spill
    await h.delete(keys[-1])
    assert not any(t.contains(keys[-1]) for t in tiers)


async def test_the_bottom_tier_evicts_without_reading_the_block_back(tmp_path: Path) -> None:
    from tiers.disk import DiskTier

    class CountingDisk(DiskTier):
        read_back = 0

        async def evict(self, key: str) -> Block | None:
            CountingDisk.read_back += 1
            return await super().evict(key)

    disk = await CountingDisk.open(tmp_path / "disk", capacity_bytes=1 << 20)
    h = Hierarchy([ArenaTier("hbm", BLOCK, page_bytes=PAGE), disk])
    try:
        keys = [f"k{i}" for i in range(40)]  # 40 x 8 KiB frames overflow the 1 MiB disk
        for k in keys:
            assert await put(h, k, 3 * BLOCK) is StoreOutcome.STORED
        gone = [k for k in keys if h.locate(k) is None]
        assert gone and CountingDisk.read_back == 0
        assert disk.stats().evictions == len(gone)
        assert not any(disk.contains(k) for k in gone)
        for k in keys:
            hit = await h.get(k)
            assert (hit is None) == (k in gone)
            assert hit is None or bytes(hit.block.data) == payload(k, 3 * BLOCK)
    finally:
        await h.close()


async def test_evicting_the_durable_copy_keeps_the_block_above() -> None:
    tiers = three_tiers(2, 1, 1)
    tiers[2].volatile = False  # type: ignore[misc]
    h = Hierarchy(tiers, config=HierarchyConfig(write_through=True))
    await put(h, "a")
    await put(h, "b")  # the durable tier holds one block: a's copy goes, a stays in hbm
    assert h.locate("a") == "hbm" and not tiers[2].contains("a")
    assert tiers[2].stats().evictions == 1
    hit = await h.get("a")
    assert hit is not None and bytes(hit.block.data) == payload("a", BLOCK)


async def test_blocks_bigger_than_the_memory_tiers_cycle_through_a_small_disk(
    tmp_path: Path,
) -> None:
    """Each 2 MiB put into a 4 MiB disk evicts the last one and is stored, never refused."""
    from tiers.disk import DiskTier

    disk = await DiskTier.open(tmp_path / "disk", capacity_bytes=4 << 20)
    h = Hierarchy(
        [
            ArenaTier("hbm", 1 << 20, page_bytes=PAGE),
            ArenaTier("dram", 1 << 20, page_bytes=PAGE),
            disk,
        ]
    )
    await h.open()
    try:
        rng = random.Random(7)
        for i in range(6):
            data = rng.randbytes(2 << 20)
            assert await h.put(f"t/k{i}", Block.of(data)) is StoreOutcome.STORED, i
            hit = await h.get(f"t/k{i}")
            assert hit is not None and bytes(hit.block.data) == data
        assert h.locate("t/k5") == "disk"
    finally:
        await h.close()
