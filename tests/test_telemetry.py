"""Traces and metrics through a real server on loopback: in-memory SDK pipelines and OTLP/HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from coherence.leases import Granted, LeaseTable, MemoryTokenStore
from coherence.sched import FakeScheduler
from gateway.telemetry import TELEMETRY, Telemetry, TelemetryConfig, traced_lease_wait
from tests.obskit import BLOCK, Served, build_app, quiesce, serve
from tests.tierkit import payload
from tiers.block import scoped_key
from tiers.clock import FakeClock
from tiers.observe import ATTR_HIT, ATTR_TIER, reset_tracer, use_tracer

TIERS = ["hbm", "dram", "disk"]
KEYS = [f"k{i}" for i in range(6)]  # hbm and dram hold two each: k0, k1 end up on disk
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def attr(span: ReadableSpan, name: str) -> object:
    return (span.attributes or {})[name]


async def fill(session: aiohttp.ClientSession, url: str) -> None:
    for key in KEYS:
        async with session.put(f"{url}/v1/blocks/{key}", data=payload(key, BLOCK)) as resp:
            assert resp.status == 201


@pytest.fixture
async def traced(
    tmp_path: Path,
) -> AsyncIterator[tuple[Served, InMemorySpanExporter, InMemoryMetricReader]]:
    exporter = InMemorySpanExporter()
    reader = InMemoryMetricReader()
    telemetry = Telemetry(
        TelemetryConfig(),
        span_processors=[SimpleSpanProcessor(exporter)],
        metric_readers=[reader],
        sampler=ALWAYS_ON,
    )
    async with serve(build_app(telemetry, tmp_path)) as served:
        yield served, exporter, reader


async def test_disk_hit_is_one_trace_through_all_three_tiers(
    traced: tuple[Served, InMemorySpanExporter, InMemoryMetricReader],
) -> None:
    served, exporter, _ = traced
    async with aiohttp.ClientSession() as session:
        await fill(session, served.url)
        exporter.clear()
        headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
        async with session.get(f"{served.url}/v1/blocks/k0", headers=headers) as resp:
            assert resp.status == 200
            assert resp.headers["X-KV-Tier"] == "disk"
            assert await resp.read() == payload("k0", BLOCK)
    spans = exporter.get_finished_spans()
    server = [s for s in spans if s.kind is SpanKind.SERVER]
    assert len(server) == 1
    root = server[0]
    assert root.name == "GET /v1/blocks/{key}"
    assert attr(root, "http.response.status_code") == 200
    assert attr(root, "http.route") == "/v1/blocks/{key}"
    # The incoming W3C traceparent is honoured: same trace, parented on the caller's span.
    assert root.context is not None and f"{root.context.trace_id:032x}" == TRACE_ID
    assert root.parent is not None and f"{root.parent.span_id:016x}" == PARENT_ID
    gets = sorted(
        (s for s in spans if s.name == "kvgate.tier.get"), key=lambda s: s.start_time or 0
    )
    assert [attr(s, ATTR_TIER) for s in gets] == TIERS
    assert [attr(s, ATTR_HIT) for s in gets] == [False, False, True]
    for span in gets:
        assert span.context is not None and span.context.trace_id == root.context.trace_id
        assert span.parent is not None and span.parent.span_id == root.context.span_id
        assert span.start_time is not None and span.end_time is not None
        assert span.end_time > span.start_time
    # The disk read: one LMDB read transaction, and the frame decoded inside it (on the read
    # thread, which got the request's context handed over).
    by_id = {s.context.span_id: s for s in spans if s.context}
    txn = [s for s in spans if s.name == "kvgate.lmdb.txn" and attr(s, "kvgate.lmdb.op") == "read"]
    assert len(txn) == 1 and txn[0].parent is not None
    assert by_id[txn[0].parent.span_id] is gets[2]
    decompress = [s for s in spans if s.name == "kvgate.zstd.decompress"]
    assert decompress and decompress[0].parent is not None
    assert by_id[decompress[0].parent.span_id] is txn[0]
    assert int(str(attr(decompress[0], "kvgate.frame_bytes"))) > 0
    # Everything the request caused (copies, the promotion and its demotions) is in this trace.
    assert {s.context.trace_id for s in spans if s.context} == {root.context.trace_id}
    # Nothing carries the raw key: not the server span (route template), not the tier spans.
    for span in spans:
        assert all(v != "k0" and "/k0" not in str(v) for v in (span.attributes or {}).values())


async def test_error_status_and_misses_are_recorded(
    traced: tuple[Served, InMemorySpanExporter, InMemoryMetricReader],
) -> None:
    served, exporter, _ = traced
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{served.url}/v1/blocks/absent") as resp:
            assert resp.status == 404
        async with session.get(f"{served.url}/no/such/route") as resp:
            assert resp.status == 404
    spans = exporter.get_finished_spans()
    server = [s for s in spans if s.kind is SpanKind.SERVER]
    assert [s.name for s in server] == ["GET /v1/blocks/{key}", "GET unmatched"]
    for span in server:
        assert attr(span, "http.response.status_code") == 404
        assert span.status.status_code is not StatusCode.ERROR  # a 4xx is the client's doing
    misses = [s for s in spans if s.name == "kvgate.tier.get"]
    assert [attr(s, ATTR_TIER) for s in misses] == TIERS
    assert not any(attr(s, ATTR_HIT) for s in misses)


async def test_prometheus_exposition_has_per_tier_latency_histograms(
    traced: tuple[Served, InMemorySpanExporter, InMemoryMetricReader],
) -> None:
    served, _, _ = traced
    async with aiohttp.ClientSession() as session:
        await fill(session, served.url)
        for key in ["k5", "k3", "k0", "nope"]:  # hbm, dram, disk, miss
            async with session.get(f"{served.url}/v1/blocks/{key}") as resp:
                assert resp.status in (200, 404)
        await quiesce(served)  # the disk hit's promotion has finished moving blocks
        async with session.get(f"{served.url}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    get_hist = families["kvgate_tier_get_seconds"]
    assert get_hist.type == "histogram"
    counts = {s.labels["tier"]: s.value for s in get_hist.samples if s.name.endswith("_count")}
    assert counts == {"hbm": 1.0, "dram": 1.0, "disk": 1.0}
    put_counts = {
        s.labels["tier"]
        for s in families["kvgate_tier_put_seconds"].samples
        if s.name.endswith("_count") and s.value > 0
    }
    assert put_counts == set(TIERS)  # puts to hbm, demotions into dram and disk
    hits = {s.labels["tier"]: s.value for s in families["kvgate_tier_hits"].samples}
    misses = {s.labels["tier"]: s.value for s in families["kvgate_tier_misses"].samples}
    assert hits == {"hbm": 1.0, "dram": 1.0, "disk": 1.0}
    # hbm: missed by the dram read, the disk read and the miss; dram: disk read and the miss.
    assert misses == {"hbm": 3.0, "dram": 2.0, "disk": 1.0}

    def gauge(name: str) -> dict[str, float]:
        return {s.labels["tier"]: s.value for s in families[name].samples}

    hierarchy = served.app[TELEMETRY].metrics.hierarchy()
    assert hierarchy is not None
    stats = {t.name: t for t in hierarchy.stats()}
    assert gauge("kvgate_tier_capacity_bytes") == {n: t.capacity_bytes for n, t in stats.items()}
    assert gauge("kvgate_tier_used_bytes") == {n: t.used_bytes for n, t in stats.items()}
    assert gauge("kvgate_tier_capacity_bytes")["hbm"] == 2 * BLOCK
    assert gauge("kvgate_tier_blocks") == {"hbm": 2.0, "dram": 2.0, "disk": 2.0}
    assert gauge("kvgate_tier_used_bytes")["disk"] > 0
    assert gauge("kvgate_tier_evictions")["hbm"] >= 4
    reads = {
        (s.labels["tenant"], s.labels["tier"]): s.value
        for s in families["kvgate_block_reads"].samples
    }
    assert reads == {
        ("default", "hbm"): 1.0,
        ("default", "dram"): 1.0,
        ("default", "disk"): 1.0,
        ("default", "miss"): 1.0,
    }
    tenant_bytes = {s.labels["tenant"]: s.value for s in families["kvgate_tenant_bytes"].samples}
    assert tenant_bytes == {"default": len(KEYS) * BLOCK}
    http = families["kvgate_http_request_seconds"]
    routes = {
        (s.labels["method"], s.labels["route"], s.labels["status"])
        for s in http.samples
        if s.name.endswith("_count")
    }
    assert ("PUT", "/v1/blocks/{key}", "201") in routes
    assert ("GET", "/v1/blocks/{key}", "404") in routes


async def test_otel_metrics_reach_the_meter_reader(
    traced: tuple[Served, InMemorySpanExporter, InMemoryMetricReader],
) -> None:
    served, _, reader = traced
    async with aiohttp.ClientSession() as session:
        await fill(session, served.url)
        for key in ["k5", "k3", "k0"]:
            async with session.get(f"{served.url}/v1/blocks/{key}") as resp:
                assert resp.status == 200
        await quiesce(served)
    data = reader.get_metrics_data()
    assert data is not None
    points: dict[str, list[tuple[dict[str, object], object]]] = {}
    for rm in data.resource_metrics:
        assert rm.resource.attributes["service.name"] == "kvgate"
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                points[metric.name] = [
                    (dict(p.attributes or {}), p) for p in metric.data.data_points
                ]
    get_tiers = {a["kvgate.tier"] for a, p in points["kvgate.tier.get.duration"]}
    assert get_tiers == set(TIERS)
    hierarchy = served.app[TELEMETRY].metrics.hierarchy()
    assert hierarchy is not None
    used = {a["kvgate.tier"]: p.value for a, p in points["kvgate.tier.used_bytes"]}  # type: ignore[attr-defined]
    assert used == {t.name: t.used_bytes for t in hierarchy.stats()}
    blocks = {a["kvgate.tier"]: p.value for a, p in points["kvgate.tier.blocks"]}  # type: ignore[attr-defined]
    assert blocks == {"hbm": 2, "dram": 2, "disk": 2}


async def test_summary_endpoint_reports_percentiles_and_hit_ratio(
    traced: tuple[Served, InMemorySpanExporter, InMemoryMetricReader],
) -> None:
    served, _, _ = traced
    async with aiohttp.ClientSession() as session:
        await fill(session, served.url)
        for key in ["k5", "k5", "k4", "missing"]:
            async with session.get(f"{served.url}/v1/blocks/{key}") as resp:
                assert resp.status in (200, 404)
        async with session.get(f"{served.url}/v1/metrics/summary") as resp:
            assert resp.status == 200
            summary = await resp.json()
    assert summary["reads"]["total"] == 4
    assert summary["reads"]["hits"] == 3
    assert summary["reads"]["hit_ratio"] == 0.75
    assert [t["name"] for t in summary["tiers"]] == TIERS
    hbm = summary["tiers"][0]
    assert hbm["get"]["count"] == 3
    p50, p99 = hbm["get"]["p50_ms"], hbm["get"]["p99_ms"]
    assert p50 is not None and p99 is not None and 0 < p50 <= p99
    assert hbm["blocks"] == 2 and hbm["capacity_bytes"] == 2 * BLOCK


# -- OTLP over HTTP/protobuf, configured only through the environment --------------------------


class Receiver:
    """A tiny OTLP/HTTP trace receiver: POST /v1/traces with a protobuf body."""

    def __init__(self) -> None:
        self.spans: list[ProtoSpan] = []
        self.arrived = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        for resource_spans in message.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(scope_spans.spans)
        self.arrived.set()
        body = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=body, content_type="application/x-protobuf")


async def test_otlp_receiver_gets_the_disk_hit_as_one_trace(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    receiver = Receiver()
    sink = web.Application()
    sink.router.add_post("/v1/traces", receiver.handle)
    async with serve(sink) as collector:
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.url)
        monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_on")
        monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
        config = TelemetryConfig.from_env()
        assert config.traces_exporters == ("otlp",)
        telemetry = Telemetry(config)
        assert telemetry.tracing
        loop = asyncio.get_running_loop()
        async with serve(build_app(telemetry, tmp_path)) as served:
            async with aiohttp.ClientSession() as session:
                await fill(session, served.url)
                async with session.get(f"{served.url}/v1/blocks/k0") as resp:
                    assert resp.status == 200 and resp.headers["X-KV-Tier"] == "disk"
            # The batch processor exports from its own thread; flushing blocks, so not here.
            await loop.run_in_executor(None, telemetry.force_flush)
    assert receiver.arrived.is_set()
    server_get = [
        s
        for s in receiver.spans
        if s.kind == ProtoSpan.SPAN_KIND_SERVER and s.name == "GET /v1/blocks/{key}"
    ]
    assert len(server_get) == 1
    trace_id = server_get[0].trace_id
    in_trace = [s for s in receiver.spans if s.trace_id == trace_id]

    def attrs(span: ProtoSpan) -> dict[str, object]:
        out: dict[str, object] = {}
        for kv in span.attributes:
            kind = kv.value.WhichOneof("value")
            out[kv.key] = getattr(kv.value, kind) if kind else None
        return out

    gets = sorted(
        (s for s in in_trace if s.name == "kvgate.tier.get"), key=lambda s: s.start_time_unix_nano
    )
    assert [attrs(s)[ATTR_TIER] for s in gets] == TIERS
    assert [attrs(s)[ATTR_HIT] for s in gets] == [False, False, True]
    assert all(s.parent_span_id == server_get[0].span_id for s in gets)
    assert all(s.end_time_unix_nano > s.start_time_unix_nano for s in gets)
    # The PUTs were traces of their own.
    put_traces = {s.trace_id for s in receiver.spans if s.name == "PUT /v1/blocks/{key}"}
    assert len(put_traces) == len(KEYS) and trace_id not in put_traces


# -- configuration from OTEL_* ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "traces", "metrics"),
    [
        ({}, (), ()),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, ("otlp",), ("otlp",)),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ("otlp",), ()),
        (
            {"OTEL_TRACES_EXPORTER": "console,otlp", "OTEL_METRICS_EXPORTER": "none"},
            ("console", "otlp"),
            (),
        ),
        (
            {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"},
            (),
            ("otlp",),
        ),
        ({"OTEL_TRACES_EXPORTER": "jaeger"}, (), ()),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, (), ()),
    ],
)
def test_config_follows_otel_env(
    env: dict[str, str], traces: tuple[str, ...], metrics: tuple[str, ...]
) -> None:
    config = TelemetryConfig.from_env(env)
    assert config.traces_exporters == traces
    assert config.metrics_exporters == metrics


async def test_sampler_comes_from_env_and_respects_a_sampled_parent(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    exporter = InMemorySpanExporter()
    telemetry = Telemetry(TelemetryConfig(), span_processors=[SimpleSpanProcessor(exporter)])
    app = build_app(telemetry, tmp_path)
    async with serve(app) as served, aiohttp.ClientSession() as session:
        await fill(session, served.url)
        assert exporter.get_finished_spans() == ()  # ratio 0: roots are never sampled
        headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
        async with session.get(f"{served.url}/v1/blocks/k0", headers=headers) as resp:
            assert resp.status == 200
        async with session.get(f"{served.url}/metrics") as resp:
            text = await resp.text()
    names = sorted(s.name for s in exporter.get_finished_spans())
    assert "GET /v1/blocks/{key}" in names and names.count("kvgate.tier.get") == 3
    # Unsampled requests are still measured.
    families = {f.name: f for f in text_string_to_metric_families(text)}
    put_count = sum(
        s.value
        for s in families["kvgate_http_request_seconds"].samples
        if s.name.endswith("_count") and s.labels["method"] == "PUT"
    )
    assert put_count == len(KEYS)


# -- lease metrics: the hooks the coherence layer records through ------------------------------


async def test_lease_metrics_and_wait_span() -> None:
    clock = FakeClock()
    table = LeaseTable(MemoryTokenStore(), clock=clock, scheduler=FakeScheduler(clock))
    await table.open()
    exporter = InMemorySpanExporter()
    telemetry = Telemetry(
        TelemetryConfig(), span_processors=[SimpleSpanProcessor(exporter)], sampler=ALWAYS_ON
    )
    metrics = telemetry.metrics
    metrics.bind_leases(table.stats)
    key = scoped_key("alice", "blk")
    granted = await table.acquire(key, 5_000)
    assert isinstance(granted, Granted)
    metrics.lease_event("granted", tenant="alice")
    metrics.lease_event("conflict", tenant="bob", count=2)
    with pytest.raises(ValueError, match="unknown lease event"):
        metrics.lease_event("bogus", tenant="alice")
    assert telemetry.tracer_provider is not None
    tracer = telemetry.tracer_provider.get_tracer("test")
    token = use_tracer(telemetry.tracer_provider.get_tracer("kvgate.tiers"))
    try:
        with tracer.start_as_current_span("request"):
            waiting = asyncio.ensure_future(traced_lease_wait(metrics, key, table.wait(key, 1_000)))
            await asyncio.sleep(0)  # let the waiter park (no time passes: FakeClock)
            families = {
                f.name: f
                for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())
            }
            assert families["kvgate_lease_waiters"].samples[0].value == 1
            assert families["kvgate_leases_live"].samples[0].value == 1
            assert table.commit(granted.lease_id, granted.token)
            outcome = await waiting
    finally:
        reset_tracer(token)
    assert outcome.value == "committed"
    text = generate_latest(metrics.registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    events = {
        (s.labels["event"], s.labels["tenant"]): s.value
        for s in families["kvgate_lease_events"].samples
        if s.name.endswith("_total")
    }
    assert events == {("granted", "alice"): 1.0, ("conflict", "bob"): 2.0}
    assert families["kvgate_lease_waiters"].samples[0].value == 0
    waits = {
        s.labels["outcome"]: s.value
        for s in families["kvgate_lease_wait_seconds"].samples
        if s.name.endswith("_count")
    }
    assert waits == {"committed": 1.0}
    spans = [s for s in exporter.get_finished_spans() if s.name == "kvgate.lease.wait"]
    assert len(spans) == 1 and attr(spans[0], "kvgate.outcome") == "committed"
    assert attr(spans[0], "kvgate.tenant") == "alice"
    telemetry.shutdown()
