"""The hierarchy's hooks for coherence: fenced publication and per-tenant shedding."""

from __future__ import annotations

import asyncio

from tests.test_hierarchy import BLOCK, put, three_tiers
from tests.tierkit import PAGE, payload
from tiers.block import Block, scoped_key
from tiers.hierarchy import Hierarchy, StoreOutcome
from tiers.memory import ArenaTier


async def test_a_fenced_put_is_never_visible_and_leaves_no_bytes() -> None:
    h = Hierarchy(three_tiers())
    asked: list[str] = []

    def refuse() -> bool:
        asked.append("asked")
        return False

    outcome = await h.put("t/k", Block.of(payload("k", BLOCK)), publish_if=refuse)
    assert outcome is StoreOutcome.FENCED
    assert asked == ["asked"]
    assert h.locate("t/k") is None and await h.get("t/k") is None
    assert all(not tier.contains("t/k") for tier in h.tiers)
    assert h.tenant_bytes("t") == 0
    assert all(s.used_bytes == 0 for s in h.stats())
    # The key is free for the next writer.
    assert await h.put("t/k", Block.of(payload("k", BLOCK)), publish_if=lambda: True) is (
        StoreOutcome.STORED
    )
    assert h.locate("t/k") == "hbm"


async def test_a_concurrent_put_retries_after_the_first_writer_is_fenced() -> None:
    # Copies through the executor: the first writer is suspended mid-store when the second comes.
    h = Hierarchy([ArenaTier("hbm", 8 * BLOCK, page_bytes=PAGE, inline_copy_bytes=0)])
    first = asyncio.create_task(h.put("t/k", Block.of(b"first" * 100), publish_if=lambda: False))
    second = asyncio.create_task(h.put("t/k", Block.of(b"second" * 100)))
    assert await first is StoreOutcome.FENCED
    assert await second is StoreOutcome.STORED
    hit = await h.get("t/k")
    assert hit is not None and bytes(hit.block.data) == b"second" * 100


async def test_shed_drops_only_the_tenants_own_coldest_blocks() -> None:
    h = Hierarchy(three_tiers(2, 3, 4))
    for i in range(3):
        assert await put(h, scoped_key("bob", f"b{i}")) is StoreOutcome.STORED
    for i in range(6):
        assert await put(h, scoped_key("alice", f"a{i}")) is StoreOutcome.STORED
    bob_before = h.tenant_bytes("bob")
    freed = await h.shed("alice", 2 * BLOCK)
    assert freed == 2 * BLOCK
    assert h.tenant_bytes("alice") == 4 * BLOCK
    assert h.tenant_bytes("bob") == bob_before
    assert all(h.locate(scoped_key("bob", f"b{i}")) is not None for i in range(3))
    # The oldest (coldest) of alice's blocks went; the newest stay.
    assert [h.locate(scoped_key("alice", f"a{i}")) is None for i in range(6)] == [
        True,
        True,
        False,
        False,
        False,
        False,
    ]


async def test_shed_skips_pinned_blocks_and_reports_a_shortfall() -> None:
    pinned = {scoped_key("alice", "a0"), scoped_key("alice", "a1")}
    h = Hierarchy(three_tiers(), is_pinned=pinned.__contains__)
    for i in range(3):
        await put(h, scoped_key("alice", f"a{i}"))
    await put(h, scoped_key("bob", "b0"))
    assert await h.shed("alice", 3 * BLOCK) == BLOCK
    assert h.locate(scoped_key("alice", "a2")) is None
    assert all(h.locate(k) is not None for k in pinned)
    assert h.locate(scoped_key("bob", "b0")) is not None
    assert await h.shed("carol", BLOCK) == 0


async def test_size_of_reads_the_index() -> None:
    h = Hierarchy(three_tiers())
    await put(h, "t/k", 1000)
    assert h.size_of("t/k") == 1000
    assert h.size_of("t/absent") is None
