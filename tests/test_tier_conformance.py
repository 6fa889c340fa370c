"""One conformance suite, run against every tier."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tierkit import PAGE, TIER_FACTORIES, payload
from tiers.base import PutOutcome, Tier
from tiers.block import Block

# 1 MiB: the floor the disk tier accepts (LMDB needs room for its own pages).
CAPACITY = 256 * PAGE


@pytest.fixture(params=sorted(TIER_FACTORIES))
async def tier(request: pytest.FixtureRequest, tmp_path: Path) -> Tier:
    t = await TIER_FACTORIES[request.param](tmp_path, CAPACITY)
    yield t  # type: ignore[misc]
    await t.close()


def test_satisfies_protocol(tier: Tier) -> None:
    assert isinstance(tier, Tier)
    assert tier.name and tier.device


@pytest.mark.parametrize("size", [0, 1, PAGE - 1, PAGE, PAGE + 1, 5 * PAGE + 17])
async def test_round_trip_is_bit_identical(tier: Tier, size: int) -> None:
    data = payload(f"k{size}", size)
    block = Block.of(data, dtype="bfloat16", shape=(size,))
    assert await tier.put("t/k", block) is PutOutcome.STORED
    got = await tier.get("t/k")
    assert got is not None
    assert bytes(got.data) == data
    assert got.meta.digest == block.meta.digest
    assert got.meta.dtype == "bfloat16"


async def test_miss_is_none_and_counted(tier: Tier) -> None:
    assert await tier.get("t/absent") is None
    assert tier.stats().misses == 1
    assert tier.stats().hits == 0


async def test_put_never_overwrites(tier: Tier) -> None:
    assert await tier.put("t/k", Block.of(b"first")) is PutOutcome.STORED
    assert await tier.put("t/k", Block.of(b"second")) is PutOutcome.EXISTS
    got = await tier.get("t/k")
    assert got is not None and bytes(got.data) == b"first"


async def test_contains_keys_delete(tier: Tier) -> None:
    await tier.put("t/a", Block.of(b"a"))
    await tier.put("t/b", Block.of(b"b"))
    assert tier.contains("t/a") and not tier.contains("t/c")
    assert sorted(tier.keys()) == ["t/a", "t/b"]
    assert await tier.delete("t/a") is True
    assert await tier.delete("t/a") is False
    assert not tier.contains("t/a")
    assert await tier.get("t/a") is None


async def test_budget_is_never_exceeded_and_no_room_is_a_value(tier: Tier) -> None:
    stored = 0
    for i in range(200):
        outcome = await tier.put(f"t/{i}", Block.of(payload(str(i), 3 * PAGE)))
        stats = tier.stats()
        assert stats.used_bytes <= stats.capacity_bytes
        if outcome is PutOutcome.STORED:
            stored += 1
        else:
            assert outcome is PutOutcome.NO_ROOM
            break
    else:
        pytest.fail("a tier of bounded capacity never said NO_ROOM")
    assert stored > 0
    assert not tier.fits(3 * PAGE)
    assert tier.stats().blocks == stored


async def test_too_large_is_reported(tier: Tier) -> None:
    assert not tier.could_ever_fit(CAPACITY * 4)
    huge = Block.of(payload("huge", CAPACITY * 4))
    assert await tier.put("t/huge", huge) is PutOutcome.TOO_LARGE


async def test_evict_hands_back_the_block_and_frees_room(tier: Tier) -> None:
    data = payload("v", 2 * PAGE)
    await tier.put("t/v", Block.of(data))
    used = tier.stats().used_bytes
    block = await tier.evict("t/v")
    assert block is not None and bytes(block.data) == data
    assert not tier.contains("t/v")
    assert tier.stats().used_bytes < used
    assert tier.stats().evictions == 1
    assert await tier.evict("t/v") is None


async def test_space_is_reused_without_creep(tier: Tier) -> None:
    # Fill, empty and refill with mixed sizes many times: the same capacity must stay usable.
    sizes = [PAGE // 3, PAGE, 2 * PAGE + 5, 7 * PAGE]
    for round_ in range(6):
        keys = []
        for i in range(100):
            key = f"t/{round_}-{i}"
            if await tier.put(key, Block.of(payload(key, sizes[i % 4]))) is not PutOutcome.STORED:
                break
            keys.append(key)
        assert len(keys) >= 10
        for key in keys:
            got = await tier.get(key)
            assert got is not None and bytes(got.data) == payload(key, len(got.data))
            assert await tier.delete(key)
        assert tier.stats().used_bytes == 0


async def test_put_keeps_no_reference_to_the_callers_buffer(tier: Tier) -> None:
    # The gateway receives PUT bodies into pooled buffers (gateway.landing) and reuses them as
    # soon as put returns: a tier must copy (or encode) the bytes, never keep the view.
    data = payload("reused", 3 * PAGE + 5)
    buffer = bytearray(data)
    assert await tier.put("t/k", Block.of(memoryview(buffer))) is PutOutcome.STORED
    buffer[:] = bytes(len(buffer))
    got = await tier.get("t/k")
    assert got is not None and bytes(got.data) == data
