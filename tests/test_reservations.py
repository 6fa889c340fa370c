"""Blocks received in place: a tier's reservation adopted as the stored block, with no copy in
(tiers.base.Reservation, ArenaTier.reserve/adopt, Hierarchy.reserve/put(reservation=)),
and the HTTP PUT path that lands bodies there (gateway.landing)."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from tests.conftest import running_gateway
from tiers.base import PutOutcome
from tiers.block import Block
from tiers.errors import TierError
from tiers.hierarchy import Hierarchy, StoreOutcome
from tiers.memory import ArenaTier

PAGE = 4096


def arena(name: str = "hbm", pages: int = 4, landing_pages: int = 2) -> ArenaTier:
    return ArenaTier(name, pages * PAGE, page_bytes=PAGE, landing_bytes=landing_pages * PAGE)


def fill(tier_view: memoryview, tag: str) -> Block:
    """Write a pattern into a reservation's view, as a socket would, and describe it."""
    data = (tag.encode() * len(tier_view))[: len(tier_view)]
    tier_view[:] = data
    return Block.of(tier_view)


async def test_an_adopted_reservation_is_the_stored_block_with_no_copy(
    copies_in: list[int],
) -> None:
    tier = arena()
    reservation = tier.reserve(PAGE + 10)
    assert reservation is not None and len(reservation.view) == PAGE + 10
    block = fill(reservation.view, "r")
    assert tier.adopt("k", reservation, block.meta) is PutOutcome.STORED
    assert copies_in == [] and tier.adopted == 1
    got = await tier.get("k")
    assert got is not None and bytes(got.data) == bytes(block.data)
    reservation.release()  # after adoption: nothing to give back, the block stays
    assert tier.contains("k") and tier.reserved_bytes == 0
    assert tier.stats().used_bytes == 2 * PAGE


async def test_reservations_take_no_budget_until_adopted() -> None:
    tier = arena(pages=2, landing_pages=2)
    for key in ("a", "b"):
        assert await tier.put(key, Block.of(key.encode() * PAGE)) is PutOutcome.STORED
    assert not tier.fits(PAGE)  # the budget is full...
    reservation = tier.reserve(PAGE)
    assert reservation is not None  # ...and a body can still be received in place
    assert tier.stats().used_bytes == 2 * PAGE and tier.reserved_bytes == PAGE
    block = fill(reservation.view, "c")
    assert tier.adopt("c", reservation, block.meta) is PutOutcome.NO_ROOM  # room first
    await tier.delete("a")
    assert tier.adopt("c", reservation, block.meta) is PutOutcome.STORED
    assert tier.stats().used_bytes == 2 * PAGE and tier.reserved_bytes == 0


async def test_a_released_reservation_gives_its_pages_back() -> None:
    tier = arena(pages=1, landing_pages=2)
    first = tier.reserve(2 * PAGE)
    assert first is not None
    assert tier.reserve(1) is None  # the landing pages are taken
    first.release()
    first.release()  # idempotent
    assert tier.reserved_bytes == 0
    again = tier.reserve(2 * PAGE)
    assert again is not None
    assert tier.adopt("k", first, Block.of(b"x" * 2 * PAGE).meta) is None  # released: not adoptable


async def test_only_the_tier_that_reserved_adopts() -> None:
    a, b = arena("hbm"), arena("dram")
    reservation = a.reserve(PAGE)
    assert reservation is not None
    block = fill(reservation.view, "x")
    assert b.adopt("k", reservation, block.meta) is None
    with pytest.raises(TierError):
        a.adopt("k", reservation, Block.of(b"short").meta)
    assert arena(landing_pages=0).reserve(PAGE) is None  # no landing pages: no reservations


async def test_a_reservation_is_one_run_or_none() -> None:
    tier = arena(pages=2, landing_pages=2)
    held = [tier.reserve(PAGE) for _ in range(2)]  # pages 0 and 1
    assert all(r is not None for r in held)
    assert await tier.put("k", Block.of(b"k" * PAGE)) is PutOutcome.STORED  # page 2
    held[0].release()  # type: ignore[union-attr]  # page 0 free again, page 3 free
    # Two pages are free, but not next to each other: a body cannot land across them.
    assert tier.reserve(2 * PAGE) is None
    assert tier.reserved_bytes == PAGE  # the failed attempt gave everything back


async def test_the_hierarchy_adopts_into_a_full_top_tier_after_making_room(
    copies_in: list[int],
) -> None:
    hbm, dram = arena("hbm", pages=2), arena("dram", pages=8, landing_pages=0)
    h = Hierarchy([hbm, dram])
    for key in ("a", "b"):
        await h.put(key, Block.of(key.encode() * PAGE))
    copies_in.clear()
    reservation = h.reserve(PAGE)
    assert reservation is not None
    block = fill(reservation.view, "c")
    assert await h.put("c", block, reservation=reservation) is StoreOutcome.STORED
    reservation.release()
    assert h.locate("c") == "hbm" and h.locate("a") == "dram"
    assert hbm.adopted == 1
    assert copies_in == [PAGE]  # the demoted "a" into dram; "c" itself was never copied
    hit = await h.get("c")
    assert hit is not None and bytes(hit.block.data) == (b"c" * PAGE)


async def test_a_tier_below_copies_from_the_reservation(copies_in: list[int]) -> None:
    # The top tier's policy may refuse a block; the tier that stores it then copies the bytes
    # out of the reservation, which goes back when released.
    hbm, dram = arena("hbm", pages=2, landing_pages=0), arena("dram", pages=8)
    h = Hierarchy([hbm, dram])
    reservation = h.reserve(PAGE)
    assert reservation is not None  # dram's landing pages: the first tier that reserves
    block = fill(reservation.view, "d")
    assert await h.put("d", block, reservation=reservation) is StoreOutcome.STORED
    assert h.locate("d") == "hbm" and copies_in == [PAGE]  # hbm copied it in
    reservation.release()
    assert dram.reserved_bytes == 0 and dram.stats().used_bytes == 0


async def test_a_fenced_adopted_block_leaves_nothing_behind() -> None:
    hbm = arena("hbm", pages=2)
    h = Hierarchy([hbm])
    reservation = h.reserve(PAGE)
    assert reservation is not None
    block = fill(reservation.view, "f")
    outcome = await h.put("f", block, reservation=reservation, publish_if=lambda: False)
    reservation.release()
    assert outcome is StoreOutcome.FENCED and not h.contains("f")
    assert hbm.stats().used_bytes == 0 and hbm.reserved_bytes == 0
    # Every page is free again: the whole budget plus the landing pages can be reserved.
    assert (
        hbm.reserve(2 * PAGE) is not None
        and await hbm.put("g", Block.of(b"g" * 2 * PAGE)) is PutOutcome.STORED
    )


async def test_http_puts_land_in_the_hbm_arena_and_read_back(tmp_path: Path) -> None:
    async with running_gateway(tmp_path / "data") as gw:
        hbm = next(t for t in gw.hierarchy._tiers if t.name == "hbm")
        assert isinstance(hbm, ArenaTier) and hbm.landing_bytes > 0
        bodies = {f"k{i}": bytes((i + j) % 256 for j in range(200_000 + i)) for i in range(6)}
        async with aiohttp.ClientSession() as http:
            for key, data in bodies.items():
                async with http.put(gw.block_url(key), data=data) as resp:
                    assert resp.status == 201
            for key, data in bodies.items():
                async with http.get(gw.block_url(key)) as resp:
                    assert resp.status == 200 and await resp.read() == data
        assert hbm.adopted == len(bodies)
        assert hbm.reserved_bytes == 0  # every landing was adopted or given back


async def test_http_puts_without_landing_pages_are_copied_in(
    tmp_path: Path, copies_in: list[int]
) -> None:
    async with running_gateway(tmp_path / "data", landing_bytes=0) as gw:
        data = b"z" * 100_000
        async with aiohttp.ClientSession() as http:
            async with http.put(gw.block_url("z"), data=data) as resp:
                assert resp.status == 201
            async with http.get(gw.block_url("z")) as resp:
                assert await resp.read() == data
        assert copies_in == [len(data)]
