"""Tiers sharing one arena (tiers.arena): a demotion hands the block's pages over, no copy.

On a host without CUDA, hbm and dram are both host memory (tiers.factory builds them over one
``ArenaStorage``). These tests hold the hand-over to what a copy would give: the same bytes in
the tier below, each tier's budget kept, no page owned twice, and a reader's pin respected.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.tierkit import payload
from tiers.arena import ArenaStorage
from tiers.block import Block
from tiers.errors import TierClosed, TierConfigError
from tiers.factory import TierSettings, build_hierarchy
from tiers.hierarchy import Hierarchy, StoreOutcome
from tiers.memory import ArenaTier, cuda_available

PAGE = 4096


def pair(hbm_pages: int, dram_pages: int) -> tuple[ArenaStorage, ArenaTier, ArenaTier]:
    storage = ArenaStorage("host", (hbm_pages + dram_pages) * PAGE, page_bytes=PAGE)
    hbm = ArenaTier("hbm", hbm_pages * PAGE, storage=storage)
    dram = ArenaTier("dram", dram_pages * PAGE, storage=storage)
    return storage, hbm, dram


def block(key: str, size: int = PAGE) -> Block:
    return Block.of(payload(key, size))


async def test_a_demotion_hands_the_pages_over_and_copies_nothing(copies_in: list[int]) -> None:
    storage, hbm, dram = pair(1, 4)
    h = Hierarchy([hbm, dram])
    await h.put("a", block("a"))
    copies_in.clear()  # the put itself copied "a" in; what follows must not copy
    runs = hbm._entries["a"].runs
    await h.put("b", block("b"))  # "a" goes down to dram
    assert h.locate("a") == "dram" and dram.taken_over == 1
    assert copies_in == [len(block("b").data)]  # only "b", put from the caller's bytes
    assert dram._entries["a"].runs == runs  # the very pages "a" had in hbm
    assert hbm.pinned_blocks == 0
    assert hbm.stats().used_bytes == PAGE and dram.stats().used_bytes == PAGE
    assert storage.alloc.free_pages == 5 - 2
    hit = await h.get("a")
    assert hit is not None and bytes(hit.block.data) == bytes(block("a").data)


async def test_a_block_a_reader_has_pinned_is_copied_down_instead(copies_in: list[int]) -> None:
    storage, hbm, dram = pair(1, 4)
    h = Hierarchy([hbm, dram])
    await h.put("a", block("a"))
    pin = hbm.pin("a")
    assert pin is not None
    copies_in.clear()
    await h.put("b", block("b"))
    assert h.locate("a") == "dram" and dram.taken_over == 0
    assert len(copies_in) == 2  # "a" copied into dram, "b" from the caller
    views = pin.views()
    assert views is not None and b"".join(views) == bytes(block("a").data)  # still its own
    assert storage.alloc.free_pages == 5 - 3  # "a" twice while the reader holds hbm's copy
    pin.release()
    assert hbm.pinned_blocks == 0 and storage.alloc.free_pages == 5 - 2


async def test_every_block_reads_back_whole_through_many_hand_overs() -> None:
    # Pages that two tiers both thought theirs would show as one block's bytes in another.
    storage, hbm, dram = pair(6, 12)
    h = Hierarchy([hbm, dram])
    rng = random.Random(5)
    live: dict[str, int] = {}
    for step in range(400):
        key = f"k{rng.randrange(60)}"
        roll = rng.random()
        if roll < 0.5 and key not in live:
            size = rng.choice([1, PAGE - 1, PAGE, 2 * PAGE + 5])
            outcome = await h.put(key, block(key, size))
            if outcome is StoreOutcome.STORED:
                live[key] = size
        elif roll < 0.8:
            hit = await h.get(key)
            if hit is not None:
                assert bytes(hit.block.data) == bytes(block(key, live[key]).data), step
        elif await h.delete(key):
            live.pop(key)
        for tier in (hbm, dram):
            stats = tier.stats()
            assert stats.used_bytes <= stats.capacity_bytes
        used = (hbm.stats().used_bytes + dram.stats().used_bytes) // PAGE  # no pins here
        assert storage.alloc.free_pages == 18 - used, step
    assert dram.taken_over > 0
    for key, size in live.items():
        if h.locate(key) is not None:
            hit = await h.get(key)
            assert hit is not None and bytes(hit.block.data) == bytes(block(key, size).data)


def test_a_storage_refuses_more_tiers_than_it_was_sized_for() -> None:
    storage = ArenaStorage("host", 8 * PAGE, page_bytes=PAGE)
    ArenaTier("hbm", 4 * PAGE, storage=storage, landing_bytes=2 * PAGE)
    with pytest.raises(TierConfigError, match="pages"):
        ArenaTier("dram", 3 * PAGE, storage=storage)
    with pytest.raises(TierConfigError, match="cuda"):
        ArenaTier("dram", 2 * PAGE, storage=storage, device="cuda")


async def test_the_storage_closes_with_the_last_tier_using_it() -> None:
    storage, hbm, dram = pair(1, 1)
    await dram.put("d", block("d"))
    await hbm.close()
    assert storage.arena is not None
    hit = await dram.get("d")
    assert hit is not None and bytes(hit.data) == bytes(block("d").data)
    await dram.close()
    assert storage.arena is None
    with pytest.raises(TierClosed):
        storage.live()


@pytest.mark.skipif(cuda_available(), reason="with CUDA, hbm is GPU memory: nothing to share")
async def test_without_cuda_the_factory_puts_hbm_and_dram_in_one_arena(tmp_path: Path) -> None:
    settings = TierSettings(
        data_dir=tmp_path,
        hbm_bytes=2 * PAGE,
        dram_bytes=8 * PAGE,
        disk_bytes=1 << 20,
        page_bytes=PAGE,
    )
    h = await build_hierarchy(settings)
    try:
        hbm, dram = h.tiers[0], h.tiers[1]
        assert isinstance(hbm, ArenaTier) and isinstance(dram, ArenaTier)
        assert hbm.storage is dram.storage and hbm.device == "cpu"
        for i in range(4):
            await h.put(f"k{i}", block(f"k{i}"))
        assert dram.taken_over == 2
        assert [t.capacity_bytes for t in h.stats()[:2]] == [2 * PAGE, 8 * PAGE]
    finally:
        await h.close()
