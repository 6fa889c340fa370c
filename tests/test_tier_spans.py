"""Tier spans and the metrics hook, on a hierarchy of three real arena tiers (no HTTP)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, Sampler
from opentelemetry.trace import Tracer

from gateway.metrics import KvgateMetrics
from tests.tierkit import PAGE, payload
from tiers.block import Block, scoped_key
from tiers.errors import TierIOError
from tiers.hierarchy import Hierarchy
from tiers.memory import ArenaTier
from tiers.observe import (
    ATTR_HIT,
    ATTR_KEY_HASH,
    ATTR_OUTCOME,
    ATTR_TENANT,
    ATTR_TIER,
    child_span,
    reset_tracer,
    use_tracer,
)

BLOCK = 2 * PAGE


class Traced:
    def __init__(self, sampler: Sampler) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider(sampler=sampler, shutdown_on_exit=False)
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer: Tracer = self.provider.get_tracer("test")

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        found = [s for s in self.exporter.get_finished_spans() if name in (None, s.name)]
        return sorted(found, key=lambda s: s.start_time or 0)


@pytest.fixture
def traced() -> Iterator[Traced]:
    t = Traced(ALWAYS_ON)
    token = use_tracer(t.provider.get_tracer("kvgate.tiers"))
    yield t
    reset_tracer(token)
    t.provider.shutdown()


def attr(span: ReadableSpan, name: str) -> object:
    return (span.attributes or {})[name]


def three_tiers() -> list[ArenaTier]:
    return [
        ArenaTier("hbm", 2 * BLOCK, page_bytes=PAGE),
        ArenaTier("dram", 2 * BLOCK, page_bytes=PAGE),
        # Copies through the executor, as big blocks (and GPU copies) take: they get a span.
        ArenaTier("disk", 8 * BLOCK, page_bytes=PAGE, inline_copy_bytes=0),
    ]


async def filled(metrics: KvgateMetrics | None = None) -> tuple[Hierarchy, str]:
    """Six blocks: the first two end up in the coldest tier."""
    h = Hierarchy(three_tiers())
    if metrics is not None:
        h.observer = metrics
    keys = [scoped_key("alice", f"k{i}") for i in range(6)]
    for key in keys:
        await h.put(key, Block.of(payload(key, BLOCK)))
    assert h.locate(keys[0]) == "disk"
    return h, keys[0]


async def test_cold_hit_has_one_span_per_tier_in_order(traced: Traced) -> None:
    h, key = await filled()
    with traced.tracer.start_as_current_span("request") as request:
        hit = await h.get(key)
        await h.quiesce()  # the promotion it started belongs to the same trace
    assert hit is not None and hit.tier == "disk"
    gets = traced.spans("kvgate.tier.get")
    assert [attr(s, ATTR_TIER) for s in gets] == ["hbm", "dram", "disk"]
    assert [attr(s, ATTR_HIT) for s in gets] == [False, False, True]
    trace_id = request.get_span_context().trace_id
    for span in gets:
        assert span.context is not None and span.context.trace_id == trace_id
        assert span.parent is not None and span.parent.span_id == request.get_span_context().span_id
        assert span.end_time is not None and span.start_time is not None
        assert span.end_time > span.start_time
        assert attr(span, ATTR_TENANT) == "alice"
        # A hash stands in for the key; the key itself appears in no attribute.
        assert attr(span, ATTR_KEY_HASH) not in (key, "k0")
        assert all("k0" not in str(v) for v in (span.attributes or {}).values())
    # The disk read copied bytes out under its own span, nested in the disk lookup.
    copies = [s for s in traced.spans("kvgate.tier.copy") if s.parent == gets[2].context]
    assert len(copies) == 1 and attr(copies[0], "kvgate.copy.direction") == "out"
    # Small inline copies are noted on the enclosing span instead of getting their own.
    hbm_puts = [s for s in traced.spans("kvgate.tier.put") if attr(s, ATTR_TIER) == "hbm"]
    assert hbm_puts and attr(hbm_puts[0], "kvgate.copy.inline") is True
    assert not [s for s in traced.spans("kvgate.tier.copy") if attr(s, ATTR_TIER) == "hbm"]
    promote = traced.spans("kvgate.tier.promote")
    assert len(promote) == 1
    assert attr(promote[0], ATTR_TIER) == "disk"
    assert attr(promote[0], "kvgate.tier.target") == "hbm"
    assert promote[0].context is not None and promote[0].context.trace_id == trace_id
    # Promotion made room in hbm by demoting a block into dram.
    demotes = traced.spans("kvgate.tier.demote")
    assert demotes and attr(demotes[0], ATTR_TIER) == "hbm"
    await h.close()


async def test_put_spans_show_the_demotion_chain(traced: Traced) -> None:
    h, _ = await filled()
    with traced.tracer.start_as_current_span("request"):
        await h.put(scoped_key("alice", "new"), Block.of(payload("new", BLOCK)))
    puts = traced.spans("kvgate.tier.put")
    top = [s for s in puts if attr(s, ATTR_TIER) == "hbm"]
    assert len(top) == 1 and attr(top[0], ATTR_OUTCOME) == "stored"
    # hbm was full: its victim went to dram, whose victim went to disk, all inside the hbm put.
    demoted = {attr(s, ATTR_TIER) for s in traced.spans("kvgate.tier.demote")}
    assert demoted == {"hbm", "dram"}
    for span in traced.spans("kvgate.tier.demote"):
        assert span.context is not None and top[0].context is not None
        assert span.context.trace_id == top[0].context.trace_id
    await h.close()


class FailingTier(ArenaTier):
    async def get(self, key: str) -> Block | None:
        raise TierIOError("disk on fire")


async def test_a_failing_tier_is_a_miss_and_a_span_event(traced: Traced) -> None:
    tiers = [
        ArenaTier("hbm", BLOCK, page_bytes=PAGE),
        FailingTier("dram", 4 * BLOCK, page_bytes=PAGE),
    ]
    h = Hierarchy(tiers)
    for key in ["a", "b"]:
        await h.put(key, Block.of(payload(key, BLOCK)))
    assert h.locate("a") == "dram"
    with traced.tracer.start_as_current_span("request"):
        assert await h.get("a") is None
    failed = [s for s in traced.spans("kvgate.tier.get") if attr(s, ATTR_TIER) == "dram"]
    assert len(failed) == 1
    assert attr(failed[0], ATTR_OUTCOME) == "error"
    assert attr(failed[0], ATTR_HIT) is False
    assert [e.name for e in failed[0].events] == ["exception"]
    assert "disk on fire" in str(failed[0].events[0].attributes)
    await h.close()


async def test_unsampled_requests_record_nothing() -> None:
    t = Traced(ALWAYS_OFF)
    token = use_tracer(t.provider.get_tracer("kvgate.tiers"))
    try:
        h, key = await filled()
        with t.tracer.start_as_current_span("request") as request:
            assert not request.is_recording()
            with child_span("anything") as span:
                assert not span.is_recording()
            assert await h.get(key) is not None
            await h.quiesce()
        assert t.exporter.get_finished_spans() == ()
        await h.close()
    finally:
        reset_tracer(token)
        t.provider.shutdown()


async def test_no_parent_span_means_no_tier_spans(traced: Traced) -> None:
    h, key = await filled()
    assert await h.get(key) is not None
    await h.quiesce()
    assert traced.spans() == []
    await h.close()


async def test_observer_counts_hits_and_misses_per_tier() -> None:
    metrics = KvgateMetrics()
    h, key = await filled(metrics)
    assert await h.get(key) is not None  # disk hit: hbm and dram missed on the way
    assert await h.get(scoped_key("alice", "absent")) is None  # missed everywhere
    metrics.bind_hierarchy(lambda: h)
    summary = metrics.summary()
    by_tier = {t["name"]: t for t in summary["tiers"]}
    assert by_tier["hbm"]["misses"] == 2 and by_tier["hbm"]["hits"] == 0
    assert by_tier["dram"]["misses"] == 2
    assert by_tier["disk"]["hits"] == 1 and by_tier["disk"]["misses"] == 1
    assert by_tier["disk"]["get"]["count"] == 1  # only the tier that was read is timed
    assert by_tier["hbm"]["get"]["count"] == 0
    assert by_tier["hbm"]["put"]["count"] >= 2
    reads = summary["reads"]
    assert reads == {
        "total": 2,
        "hits": 1,
        "misses": 1,
        "hit_ratio": 0.5,
        "by_tier": {"disk": 1},
    }
    await h.close()


async def test_a_put_received_in_place_says_so_and_has_no_copy(traced: Traced) -> None:
    hbm = ArenaTier("hbm", 2 * BLOCK, page_bytes=PAGE, landing_bytes=BLOCK)
    h = Hierarchy([hbm])
    reservation = h.reserve(BLOCK)
    assert reservation is not None
    reservation.view[:] = payload("a", BLOCK)
    with traced.tracer.start_as_current_span("request"):
        await h.put("a", Block.of(reservation.view), reservation=reservation)
        await h.put("b", Block.of(payload("b", BLOCK)))
    reservation.release()
    puts = traced.spans("kvgate.tier.put")
    assert [(s.attributes or {}).get("kvgate.put.in_place") for s in puts] == [True, None]
    assert [(s.attributes or {}).get("kvgate.copy.inline") for s in puts] == [None, True]
