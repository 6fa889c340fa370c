"""The per-tenant usage the hierarchy keeps (``tiers.usage``) matches a recount of where each
tenant's blocks really are, whatever sequence of puts, reads, deletes, demotions and promotions
led there: every place the hierarchy moves a block must tell the usage."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.tierkit import PAGE, payload
from tiers.block import Block, scoped_key
from tiers.hierarchy import Hierarchy
from tiers.memory import ArenaTier

BLOCK = 2 * PAGE
TENANTS = ("alice", "bob")
KEYS = [scoped_key(t, f"k{i}") for t in TENANTS for i in range(6)]

op = st.one_of(
    st.tuples(st.just("put"), st.sampled_from(KEYS), st.integers(1, 3)),
    st.tuples(st.just("get"), st.sampled_from(KEYS), st.just(0)),
    st.tuples(st.just("delete"), st.sampled_from(KEYS), st.just(0)),
)


async def _run(ops: list[tuple[str, str, int]]) -> None:
    tiers = [
        ArenaTier("hbm", 3 * BLOCK, page_bytes=PAGE),
        ArenaTier("dram", 4 * BLOCK, page_bytes=PAGE),
        ArenaTier("cold", 5 * BLOCK, page_bytes=PAGE),
    ]
    h = Hierarchy(tiers)
    reads = dict.fromkeys(TENANTS, 0)
    hits = dict.fromkeys(TENANTS, 0)
    for kind, key, pages in ops:
        tenant = key.split("/")[0]
        if kind == "put":
            await h.put(key, Block.of(payload(key, pages * PAGE)))
        elif kind == "get":
            reads[tenant] += 1
            hits[tenant] += await h.get(key) is not None
        else:
            await h.delete(key)
        await h.quiesce()  # promotions run in the background
        names = [t.name for t in tiers]
        for t in TENANTS:
            rows = h.tenant_stats(t)
            counted = [
                sum(1 for k in KEYS if k.startswith(t + "/") and h.locate(k) == n) for n in names
            ]
            assert [r.blocks for r in rows] == counted
            charged = [
                sum(
                    h.charge_of(h.size_of(k) or 0)
                    for k in KEYS
                    if k.startswith(t + "/") and h.locate(k) == n
                )
                for n in names
            ]
            assert [r.used_bytes for r in rows] == charged
            assert sum(charged) == h.tenant_bytes(t)
            assert sum(r.hits for r in rows) == hits[t]
            assert rows[-1].misses == reads[t] - hits[t]
    # Each tenant is shown its own share; the shares add up to the tiers' own totals.
    totals = h.stats()
    for i, total in enumerate(totals):
        assert sum(h.tenant_stats(t)[i].blocks for t in TENANTS) == total.blocks
    # Every promotion and demotion is some tenant's: theirs add up to the tiers' own.
    for moves in (h.promotions, h.demotions):
        mine = [moves(t) for t in TENANTS]
        assert {n: sum(m[n] for m in mine) for n in moves()} == moves()


@settings(max_examples=60, deadline=None)
@given(st.lists(op, min_size=1, max_size=40))
def test_tenant_usage_matches_a_recount_after_any_sequence(ops: list[tuple[str, str, int]]) -> None:
    asyncio.run(_run(ops))
