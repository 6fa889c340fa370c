"""Telemetry for one gateway app: the OTel SDK pipelines, the server-span middleware, the routes.

Everything is configured from the standard ``OTEL_*`` variables:

- ``OTEL_TRACES_EXPORTER``: ``otlp`` (OTLP over HTTP/protobuf), ``console``, ``none``, or a comma
  list. Unset, it is ``otlp`` when an OTLP endpoint is configured (``OTEL_EXPORTER_OTLP_ENDPOINT``
  or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) and ``none`` otherwise: with no collector named there
  is nowhere to send spans, and a dead exporter would only retry and log.
- ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG`` (default ``parentbased_always_on``),
  ``OTEL_EXPORTER_OTLP_*`` (endpoint, headers, timeout, compression), ``OTEL_SERVICE_NAME``,
  ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_BSP_*``: read by the SDK itself.
- ``OTEL_METRICS_EXPORTER``: ``otlp``, ``console`` or ``none`` (same default rule, with
  ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT``); ``/metrics`` (Prometheus text) is always served.
  ``OTEL_METRIC_EXPORT_INTERVAL`` sets the push period.
- ``OTEL_SDK_DISABLED=true`` turns both pipelines off.

The providers belong to the app, not to the process (nothing is installed globally), so several
apps in one process never share a pipeline. The middleware makes the app's ``kvgate.tiers`` tracer
current for each request (:func:`tiers.observe.use_tracer`), so spans the tiers open land in the
same trace and pipeline as the server span. Spans leave through a ``BatchSpanProcessor``: export
runs on its own thread, off the request path.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from aiohttp import web
from opentelemetry import context, propagate, trace
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import Sampler
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from coherence.errors import Forbidden, Unauthorized
from coherence.tenants import Tenant, TenantRegistry
from gateway.metrics import HierarchySource, KvgateMetrics
from tiers.block import split_key
from tiers.hierarchy import Hierarchy
from tiers.observe import (
    ATTR_KEY_HASH,
    ATTR_OUTCOME,
    ATTR_TENANT,
    child_span,
    key_hash,
    reset_tracer,
    use_tracer,
)

log = logging.getLogger(__name__)

SERVICE_NAME = "kvgate"
EXPORTERS = ("otlp", "console")
STATIC_DIR = Path(__file__).with_name("static")
DASHBOARD_FILE = STATIC_DIR / "dashboard.html"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Authenticates a /v1/metrics/summary caller (raising 401/403) and names whose figures it may
# see: a tenant's own, or None for the totals (no tenants configured).
SummaryScope = Callable[[web.Request], Awaitable[str | None]]


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    traces_exporters: tuple[str, ...] = ()
    metrics_exporters: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TelemetryConfig:
        env = os.environ if environ is None else environ
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return cls()
        endpoint = bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip())
        traces_endpoint = endpoint or bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", ""))
        metrics_endpoint = endpoint or bool(env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", ""))
        return cls(
            traces_exporters=_exporters(env, "OTEL_TRACES_EXPORTER", default_otlp=traces_endpoint),
            metrics_exporters=_exporters(
                env, "OTEL_METRICS_EXPORTER", default_otlp=metrics_endpoint
            ),
        )


def _exporters(env: Mapping[str, str], name: str, *, default_otlp: bool) -> tuple[str, ...]:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return ("otlp",) if default_otlp else ()
    chosen: list[str] = []
    for item in raw.split(","):
        item = item.strip().lower()
        if item in ("", "none"):
            continue
        if item not in EXPORTERS:
            log.warning("%s=%s: unsupported exporter %r ignored", name, raw, item)
            continue
        if item not in chosen:
            chosen.append(item)
    return tuple(chosen)


class Telemetry:
    """The app's tracer and meter providers, metrics, and the request middleware.

    ``span_processors``, ``metric_readers`` and ``sampler`` are for tests and benchmarks (an
    ``InMemorySpanExporter`` behind a ``SimpleSpanProcessor``, an ``InMemoryMetricReader``, a
    fixed ratio); in production everything comes from :class:`TelemetryConfig`.
    """

    def __init__(
        self,
        config: TelemetryConfig | None = None,
        *,
        span_processors: Sequence[SpanProcessor] = (),
        metric_readers: Sequence[MetricReader] = (),
        sampler: Sampler | None = None,
        resource: Resource | None = None,
    ) -> None:
        config = TelemetryConfig.from_env() if config is None else config
        self.config = config
        resource = resource or Resource.create({"service.name": SERVICE_NAME})
        processors = list(span_processors)
        for name in config.traces_exporters:
            processors.append(BatchSpanProcessor(_span_exporter(name)))
        self.tracer_provider: TracerProvider | None = None
        self._tracer: Tracer | None = None
        self._tiers_tracer: Tracer | None = None
        if processors:
            provider = TracerProvider(sampler=sampler, resource=resource, shutdown_on_exit=False)
            for processor in processors:
                provider.add_span_processor(processor)
            self.tracer_provider = provider
            self._tracer = provider.get_tracer("kvgate.gateway")
            self._tiers_tracer = provider.get_tracer("kvgate.tiers")
        readers = list(metric_readers)
        for name in config.metrics_exporters:
            readers.append(PeriodicExportingMetricReader(_metric_exporter(name)))
        self.meter_provider: MeterProvider | None = None
        if readers:
            self.meter_provider = MeterProvider(
                metric_readers=readers, resource=resource, shutdown_on_exit=False
            )
        self.metrics = KvgateMetrics(
            meter=self.meter_provider.get_meter("kvgate") if self.meter_provider else None
        )

    @property
    def tracing(self) -> bool:
        return self._tracer is not None

    def attach(self, hierarchy: Hierarchy) -> None:
        """Measure ``hierarchy`` (call once it is open)."""
        hierarchy.observer = self.metrics
        self.metrics.bind_hierarchy(lambda: hierarchy)

    def bind_hierarchy(self, source: HierarchySource) -> None:
        """Read tier levels through ``source`` (when the hierarchy is opened and closed later)."""
        self.metrics.bind_hierarchy(source)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """One SERVER span per request, parented on an incoming W3C ``traceparent``."""
        started = time.perf_counter()
        method = request.method
        route = _route(request)
        status = 500
        tracer = self._tracer
        token = use_tracer(self._tiers_tracer) if self._tiers_tracer is not None else None
        try:
            if tracer is None:
                try:
                    response = await handler(request)
                except web.HTTPException as exc:
                    status = exc.status
                    raise
                except asyncio.CancelledError:
                    status = 499
                    raise
                status = response.status
                return response
            # start_span + attach rather than start_as_current_span: its generator-based context
            # managers cost more than the span itself when it is not sampled.
            span = tracer.start_span(
                f"{method} {route}",
                context=propagate.extract(request.headers),
                kind=SpanKind.SERVER,
                attributes={"http.request.method": method, "http.route": route},
            )
            span_token = context.attach(trace.set_span_in_context(span))
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                status = exc.status
                _end_server_span(span, status, None)
                raise
            except asyncio.CancelledError:
                status = 499  # the client went away
                _end_server_span(span, status, None)
                raise
            except BaseException as exc:
                _end_server_span(span, status, exc)
                raise
            finally:
                context.detach(span_token)
            status = response.status
            _end_server_span(span, status, None)
            return response
        finally:
            if token is not None:
                reset_tracer(token)
            self.metrics.http_request(method, route, status, time.perf_counter() - started)

    def force_flush(self, timeout_ms: int = 10_000) -> None:
        if self.tracer_provider is not None:
            self.tracer_provider.force_flush(timeout_ms)
        if self.meter_provider is not None:
            self.meter_provider.force_flush(timeout_ms)

    def shutdown(self) -> None:
        """Flush and stop the pipelines (blocking: run it in an executor from async code)."""
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()


def _end_server_span(span: Span, status: int, exc: BaseException | None) -> None:
    if span.is_recording():
        span.set_attribute("http.response.status_code", status)
        if exc is not None:
            span.record_exception(exc)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
    span.end()


def _span_exporter(name: str) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter()
    return OTLPSpanExporter()


def _metric_exporter(name: str) -> MetricExporter:
    if name == "console":
        return ConsoleMetricExporter()
    return OTLPMetricExporter()


def _route(request: web.Request) -> str:
    """The route template (``/v1/blocks/{key}``), never the path: paths carry raw keys."""
    resource = request.match_info.route.resource
    if resource is None:
        return "unmatched"
    return resource.canonical


E = TypeVar("E", bound=enum.Enum)


async def traced_lease_wait(metrics: KvgateMetrics, scoped_key: str, waiting: Awaitable[E]) -> E:
    """Await a lease wait (``LeaseTable.wait(...)``) under a ``kvgate.lease.wait`` span, and
    record its duration under its outcome's value (committed, gone, timeout, no_lease)."""
    started = time.perf_counter()
    with child_span("kvgate.lease.wait") as span:
        if span.is_recording():
            span.set_attribute(ATTR_TENANT, split_key(scoped_key)[0])
            span.set_attribute(ATTR_KEY_HASH, key_hash(scoped_key))
        outcome = await waiting
        if span.is_recording():
            span.set_attribute(ATTR_OUTCOME, str(outcome.value))
    metrics.lease_wait(time.perf_counter() - started, outcome=str(outcome.value))
    return outcome


# -- app wiring -------------------------------------------------------------------------------

TELEMETRY = web.AppKey("kvgate_telemetry", Telemetry)
_SCOPE = web.AppKey[SummaryScope | None]("kvgate_telemetry_scope")
_SCRAPER = web.AppKey[TenantRegistry | None]("kvgate_telemetry_scraper")


def install(
    app: web.Application,
    telemetry: Telemetry,
    *,
    scope: SummaryScope | None = None,
    metrics_token_sha256: str | None = None,
) -> None:
    """Add the middleware (outermost), ``/metrics``, ``/dashboard`` and ``/v1/metrics/summary``.

    ``scope`` guards the ``/v1/`` route like every other ``/v1/`` call and scopes its answer to
    the caller's tenant; without it the summary shows totals to anyone. ``/metrics`` is open
    unless ``metrics_token_sha256`` names the scraper's bearer token, which also reads the
    summary's totals. The dashboard page itself is static and always open.
    The pipelines are flushed and shut down when the app cleans up.
    """
    app[TELEMETRY] = telemetry
    app[_SCOPE] = scope
    app[_SCRAPER] = (
        None
        if metrics_token_sha256 is None
        else TenantRegistry([Tenant("metrics-scraper", metrics_token_sha256)])
    )
    app.middlewares.insert(0, telemetry.middleware)
    app.router.add_get("/metrics", metrics_handler, allow_head=False)
    app.router.add_get("/dashboard", dashboard_handler, allow_head=False)
    app.router.add_get("/v1/metrics/summary", summary_handler, allow_head=False)
    app.cleanup_ctx.append(_lifecycle)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    yield
    await asyncio.get_running_loop().run_in_executor(None, app[TELEMETRY].shutdown)


async def metrics_handler(request: web.Request) -> web.Response:
    scraper = request.app[_SCRAPER]
    if scraper is not None:
        scraper.authenticate(request.headers.get("Authorization"))  # 401 / 403 when refused
    body = generate_latest(request.app[TELEMETRY].metrics.registry)
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


async def summary_handler(request: web.Request) -> web.Response:
    tenant: str | None = None
    scraper = request.app[_SCRAPER]
    scope = request.app[_SCOPE]
    if scope is not None and not (scraper is not None and _is_scraper(scraper, request)):
        tenant = await scope(request)  # 401 / 403 when refused
    return web.json_response(request.app[TELEMETRY].metrics.summary(tenant))


def _is_scraper(scraper: TenantRegistry, request: web.Request) -> bool:
    """Whether the request bears the metrics token: the operator's, which reads the totals."""
    try:
        scraper.authenticate(request.headers.get("Authorization"))
    except (Unauthorized, Forbidden):
        return False
    return True


async def dashboard_handler(request: web.Request) -> web.Response:
    html = await asyncio.get_running_loop().run_in_executor(None, DASHBOARD_FILE.read_bytes)
    response = web.Response(body=html, content_type="text/html", charset="utf-8")
    response.headers["Cache-Control"] = "no-cache"
    return response
