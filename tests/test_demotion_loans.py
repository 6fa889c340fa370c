"""Demotion without a copy out of the arena (tiers.base.Loan, ArenaTier.lend)."""

from __future__ import annotations

import asyncio

from tiers.base import PutOutcome
from tiers.block import Block
from tiers.hierarchy import Hierarchy, StoreOutcome
from tiers.memory import ArenaTier

PAGE = 4096


class CountingArena(ArenaTier):
    """An arena that counts the evictions that copied the block out."""

    def __init__(self, name: str, pages: int) -> None:
        super().__init__(name, pages * PAGE, page_bytes=PAGE)
        self.copied_out = 0

    async def evict(self, key: str) -> Block | None:
        self.copied_out += 1
        return await super().evict(key)


class GatedArena(ArenaTier):
    """A (volatile) tier below whose stores wait until the test opens the gate."""

    def __init__(self, pages: int = 64) -> None:
        super().__init__("dram", pages * PAGE, page_bytes=PAGE)
        self.gate = asyncio.Event()
        self.storing = asyncio.Event()

    async def put(self, key: str, block: Block) -> PutOutcome:
        self.storing.set()
        await self.gate.wait()
        return await super().put(key, block)


def block(tag: str, pages: int = 1) -> Block:
    return Block.of(tag.encode() * (pages * PAGE))


async def test_a_demotion_between_arenas_copies_nothing_out() -> None:
    hbm, dram = CountingArena("hbm", 1), CountingArena("dram", 8)
    h = Hierarchy([hbm, dram])
    await h.put("a", block("a"))
    await h.put("b", block("b"))  # "a" goes down, lent from hbm's pages
    assert h.locate("a") == "dram" and h.locate("b") == "hbm"
    assert hbm.copied_out == 0
    assert hbm.pinned_blocks == 0  # the loan ended: hbm's page went back to its allocator
    hit = await h.get("a")
    assert hit is not None and bytes(hit.block.data) == bytes(block("a").data)


async def test_a_block_in_several_runs_is_copied_out_as_before() -> None:
    hbm, dram = CountingArena("hbm", 3), CountingArena("dram", 16)
    h = Hierarchy([hbm, dram])
    for key in ("p", "q", "r"):  # pages 0, 1, 2
        await h.put(key, block(key))
    await h.delete("p")
    await h.delete("r")
    await h.put("s", block("s", 2))  # pages 0 and 2: two runs
    assert len(hbm._entries["s"].runs) == 2
    await h.put("u", block("u", 3))  # needs all of hbm: "q" is lent, "s" copied out
    assert hbm.copied_out == 1
    for key, pages in (("q", 1), ("s", 2)):
        assert h.locate(key) == "dram"
        hit = await h.get(key)
        assert hit is not None and bytes(hit.block.data) == bytes(block(key, pages).data)


async def test_a_reader_during_the_move_keeps_its_bytes_after_the_pages_are_reused() -> None:
    hbm, dram = ArenaTier("hbm", PAGE, page_bytes=PAGE), GatedArena()
    h = Hierarchy([hbm, dram])
    await h.put("a", block("a"))
    put_b = asyncio.ensure_future(h.put("b", block("b")))  # lends "a" to the gated store
    await dram.storing.wait()
    assert hbm.pinned_blocks == 1  # the loan holds "a"'s page
    hit = await h.get("a")
    assert hit is not None and isinstance(hit.block.data, bytes)  # a copy, not the lent view
    dram.gate.set()
    assert await put_b is StoreOutcome.STORED  # "b" now occupies the page "a" had
    assert hbm.pinned_blocks == 0
    assert bytes(hit.block.data) == bytes(block("a").data)
    moved = await h.get("a")
    assert moved is not None and moved.tier == "dram"


async def test_a_lent_block_deleted_during_the_move_is_gone_and_its_pages_freed() -> None:
    hbm, dram = ArenaTier("hbm", PAGE, page_bytes=PAGE), GatedArena()
    h = Hierarchy([hbm, dram])
    await h.put("a", block("a"))
    put_b = asyncio.ensure_future(h.put("b", block("b")))
    await dram.storing.wait()
    assert await h.delete("a")
    dram.gate.set()
    assert await put_b is StoreOutcome.STORED
    assert h.locate("a") is None and not dram.contains("a")
    assert hbm.pinned_blocks == 0 and hbm.stats().blocks == 1
