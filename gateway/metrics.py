"""The gateway's metrics: one object per app, Prometheus text at ``/metrics``, OTLP when asked.

Counters and latency histograms live in a private :class:`prometheus_client.CollectorRegistry`
(never the global one: several apps in one process must not share series). When an OTel
``Meter`` is given (``OTEL_METRICS_EXPORTER=otlp``, or a test's ``InMemoryMetricReader``), every
measurement is recorded there too, under the same names with dots.

Hot-path calls (:meth:`KvgateMetrics.tier_get`, ``tier_put``, ``block_read``, ``http_request``)
are a dict lookup of a pre-bound child plus one ``observe``/``inc``. Levels that the hierarchy
already keeps (bytes used, capacity, blocks, evictions, promotions, demotions, bytes per tenant)
and lease gauges are read at scrape time from the bound sources, never tracked twice.

Lease metrics (coherence): the gateway records events with :meth:`KvgateMetrics.lease_event`
(``"granted"``, ``"conflict"``, ``"stale"``, ``"expired"``, ``"released"``, ``"committed"``),
waits with :meth:`KvgateMetrics.lease_wait`, and binds the live/waiters gauges once with
:meth:`KvgateMetrics.bind_leases` (a callable taking a tenant or None and answering anything
with ``live`` and ``waiters`` integer attributes, e.g. ``coherence.leases.LeaseTable.stats``).
"""

from __future__ import annotations

import itertools
import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tiers.hierarchy import Hierarchy

# 10 us .. 10 s: an inline arena copy is tens of microseconds, a cold LMDB read milliseconds.
LATENCY_BUCKETS: tuple[float, ...] = (
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
LEASE_EVENTS = ("granted", "conflict", "stale", "expired", "released", "committed")
MISS = "miss"


class LeaseGauges(Protocol):
    @property
    def live(self) -> int: ...

    @property
    def waiters(self) -> int: ...


HierarchySource = Callable[[], Hierarchy | None]
# Called with None for all leases, or a tenant for that tenant's own (``LeaseTable.stats``).
LeaseSource = Callable[[str | None], LeaseGauges | None]


class KvgateMetrics:
    """Implements :class:`tiers.observe.TierObserver`; attach with ``hierarchy.observer = m``."""

    def __init__(self, *, meter: Meter | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._started = time.time()
        self._hierarchy: HierarchySource = _none
        self._leases: LeaseSource = _no_leases
        reg = self.registry
        self._get_seconds = Histogram(
            "kvgate_tier_get_seconds",
            "Latency of reads served by a tier (the tier's own work: copy, LMDB, decompress)",
            ["tier"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self._put_seconds = Histogram(
            "kvgate_tier_put_seconds",
            "Latency of stores into a tier (after room was made)",
            ["tier"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self._hits = Counter("kvgate_tier_hits", "Reads a tier answered", ["tier"], registry=reg)
        self._misses = Counter(
            "kvgate_tier_misses",
            "Reads a tier could not answer (including those the index answered for it)",
            ["tier"],
            registry=reg,
        )
        self._puts = Counter(
            "kvgate_tier_puts", "Store attempts into a tier", ["tier", "outcome"], registry=reg
        )
        self._reads = Counter(
            "kvgate_block_reads",
            "Block reads through the hierarchy, by tenant and serving tier (tier=miss: none)",
            ["tenant", "tier"],
            registry=reg,
        )
        self._http = Histogram(
            "kvgate_http_request_seconds",
            "HTTP request latency, by method, route and status",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self._lease_events = Counter(
            "kvgate_lease_events", "Lease protocol events", ["event", "tenant"], registry=reg
        )
        self._lease_wait = Histogram(
            "kvgate_lease_wait_seconds",
            "Time GETs with wait_ms spent waiting on a write lease, by outcome",
            ["outcome"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        reg.register(_LevelsCollector(self))
        # Pre-bound children: labels() takes a lock and hashes the label tuple every call.
        self._get_children: dict[str, Any] = {}
        self._put_children: dict[str, Any] = {}
        self._hit_children: dict[str, Any] = {}
        self._miss_children: dict[str, Any] = {}
        self._read_children: dict[tuple[str, str], Any] = {}
        self._put_outcome_children: dict[tuple[str, str], Any] = {}
        # The same latencies per tenant, for a tenant's own summary only: not on /metrics,
        # where a tenant label would multiply every histogram's series by the tenant count.
        self._tenant_get = _TenantHistograms()
        self._tenant_put = _TenantHistograms()
        self._otel = _OtelInstruments(meter, self) if meter is not None else None

    # -- sources read at scrape time -------------------------------------------------------

    def bind_hierarchy(self, source: HierarchySource) -> None:
        """Where to read tier levels from (a callable: the hierarchy may not be open yet)."""
        self._hierarchy = source

    def bind_leases(self, source: LeaseSource) -> None:
        """Where to read the lease gauges from: ``table.stats`` (called with a tenant or None)."""
        self._leases = source

    def hierarchy(self) -> Hierarchy | None:
        return self._hierarchy()

    def leases(self, tenant: str | None = None) -> LeaseGauges | None:
        return self._leases(tenant)

    # -- TierObserver ----------------------------------------------------------------------

    def tier_get(self, tier: str, seconds: float | None, hit: bool, *, tenant: str) -> None:
        if hit:
            _child(self._hit_children, self._hits, tier).inc()
        else:
            _child(self._miss_children, self._misses, tier).inc()
        if seconds is not None:
            _child(self._get_children, self._get_seconds, tier).observe(seconds)
            self._tenant_get.observe(tenant, tier, seconds)
        if self._otel is not None:
            self._otel.tier_get(tier, seconds, hit)

    def tier_put(self, tier: str, seconds: float, outcome: str, *, tenant: str) -> None:
        _child(self._put_children, self._put_seconds, tier).observe(seconds)
        self._tenant_put.observe(tenant, tier, seconds)
        label = (tier, outcome)
        child = self._put_outcome_children.get(label)
        if child is None:
            child = self._put_outcome_children[label] = self._puts.labels(*label)
        child.inc()
        if self._otel is not None:
            self._otel.tier_put(tier, seconds, outcome)

    def block_read(self, tenant: str, tier: str | None) -> None:
        label = (tenant, tier or MISS)
        child = self._read_children.get(label)
        if child is None:
            child = self._read_children[label] = self._reads.labels(*label)
        child.inc()
        if self._otel is not None:
            self._otel.block_read(tenant, tier)

    # -- gateway and coherence -------------------------------------------------------------

    def http_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self._http.labels(method, route, str(status)).observe(seconds)
        if self._otel is not None:
            self._otel.http_request(method, route, status, seconds)

    def lease_event(self, event: str, *, tenant: str, count: int = 1) -> None:
        """Count a lease event; ``event`` is one of :data:`LEASE_EVENTS`."""
        if event not in LEASE_EVENTS:
            raise ValueError(f"unknown lease event {event!r}")
        self._lease_events.labels(event, tenant).inc(count)
        if self._otel is not None:
            self._otel.lease_event(event, tenant, count)

    def lease_wait(self, seconds: float, *, outcome: str) -> None:
        """A GET ``?wait_ms`` finished waiting: ``outcome`` is committed/gone/timeout."""
        self._lease_wait.labels(outcome).observe(seconds)
        if self._otel is not None:
            self._otel.lease_wait(seconds, outcome)

    # -- the JSON summary behind the dashboard ---------------------------------------------

    def summary(self, tenant: str | None = None) -> dict[str, Any]:
        """Per-tier levels, hits, misses and latency percentiles; overall hit ratio.

        With ``tenant``, every figure is that tenant's own (as ``/v1/stats`` shows a tenant):
        its bytes and blocks per tier, its reads, moves and tier latencies, its leases.
        Capacities stay the tiers' own.
        """
        hierarchy = self._hierarchy()
        if tenant is None:
            get_hist = _histograms(self._get_seconds.collect())
            put_hist = _histograms(self._put_seconds.collect())
            hits = _counter_values(self._hits.collect(), "tier")
            misses = _counter_values(self._misses.collect(), "tier")
            levels = [] if hierarchy is None else hierarchy.stats()
        else:
            get_hist = self._tenant_get.of(tenant)
            put_hist = self._tenant_put.of(tenant)
            levels = [] if hierarchy is None else hierarchy.tenant_stats(tenant)
            # A tenant's reads per tier are what the hierarchy counts for it (the totals'
            # hits/misses include index answers, which the tenant's misses already count).
            hits = {s.name: float(s.hits) for s in levels}
            misses = {s.name: float(s.misses) for s in levels}
        tiers: list[dict[str, object]] = []
        if hierarchy is not None:
            promotions = hierarchy.promotions(tenant)
            demotions = hierarchy.demotions(tenant)
            for stats in levels:
                entry = stats.as_json()
                name = stats.name
                h, m = hits.get(name, 0.0), misses.get(name, 0.0)
                entry.update(
                    {
                        "hits": int(h),
                        "misses": int(m),
                        "hit_ratio": _ratio(h, h + m),
                        "tier_hits": stats.hits,
                        "tier_misses": stats.misses,
                        "promotions": promotions.get(name, 0),
                        "demotions": demotions.get(name, 0),
                        "get": _latency(get_hist.get(name)),
                        "put": _latency(put_hist.get(name)),
                    }
                )
                tiers.append(entry)
        served: dict[str, float] = {}
        for sample in _samples(self._reads.collect(), "_total"):
            if tenant is not None and sample.labels["tenant"] != tenant:
                continue
            tier = sample.labels["tier"]
            served[tier] = served.get(tier, 0.0) + sample.value
        missed = served.pop(MISS, 0.0)
        found = sum(served.values())
        leases = self._leases(tenant)
        return {
            "uptime_s": round(time.time() - self._started, 3),
            "tiers": tiers,
            "reads": {
                "total": int(found + missed),
                "hits": int(found),
                "misses": int(missed),
                "hit_ratio": _ratio(found, found + missed),
                "by_tier": {k: int(v) for k, v in served.items()},
            },
            "leases": None if leases is None else {"live": leases.live, "waiters": leases.waiters},
        }


def _none() -> None:
    return None


def _no_leases(tenant: str | None) -> None:
    return None


class _TenantHistograms:
    """Latency histograms keyed by (tenant, tier), on :data:`LATENCY_BUCKETS`: a bisect and two
    additions per observation, read back as :func:`_histograms` reads a Prometheus family."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], list[int]] = {}
        self._sums: dict[tuple[str, str], float] = {}

    def observe(self, tenant: str, tier: str, seconds: float) -> None:
        label = (tenant, tier)
        counts = self._counts.get(label)
        if counts is None:
            counts = self._counts[label] = [0] * (len(LATENCY_BUCKETS) + 1)  # the last: +Inf
            self._sums[label] = 0.0
        counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1  # le: a bound holds values <= it
        self._sums[label] += seconds

    def of(self, tenant: str) -> dict[str, tuple[list[tuple[float, float]], float]]:
        """tier -> (cumulative buckets [(upper bound, count)], sum), for ``tenant`` only."""
        out: dict[str, tuple[list[tuple[float, float]], float]] = {}
        bounds = (*LATENCY_BUCKETS, math.inf)
        for (owner, tier), counts in self._counts.items():
            if owner != tenant:
                continue
            cumulative = list(itertools.accumulate(counts))
            out[tier] = (
                [(b, float(c)) for b, c in zip(bounds, cumulative, strict=True)],
                self._sums[(owner, tier)],
            )
        return out


def _child(cache: dict[str, Any], metric: Any, label: str) -> Any:
    child = cache.get(label)
    if child is None:
        child = cache[label] = metric.labels(label)
    return child


def _ratio(part: float, whole: float) -> float | None:
    return round(part / whole, 6) if whole else None


def _samples(families: Iterable[Metric], suffix: str) -> Iterator[Any]:
    for family in families:
        for sample in family.samples:
            if sample.name.endswith(suffix):
                yield sample


def _counter_values(families: Iterable[Metric], label: str) -> dict[str, float]:
    return {s.labels[label]: s.value for s in _samples(families, "_total")}


def _histograms(families: Iterable[Metric]) -> dict[str, tuple[list[tuple[float, float]], float]]:
    """tier -> (cumulative buckets [(upper bound, count)], sum of observations)."""
    buckets: dict[str, list[tuple[float, float]]] = {}
    sums: dict[str, float] = {}
    for family in families:
        for s in family.samples:
            tier = s.labels.get("tier", "")
            if s.name.endswith("_bucket"):
                buckets.setdefault(tier, []).append((float(s.labels["le"]), s.value))
            elif s.name.endswith("_sum"):
                sums[tier] = s.value
    return {t: (sorted(b), sums.get(t, 0.0)) for t, b in buckets.items()}


def quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus-style ``histogram_quantile``: linear within the bucket holding rank q."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # past the last finite bucket: its bound is all we know
            width = count - lower_count
            frac = (rank - lower_count) / width if width else 1.0
            return lower_bound + (bound - lower_bound) * frac
        lower_bound, lower_count = bound, count
    return lower_bound


def _latency(hist: tuple[list[tuple[float, float]], float] | None) -> dict[str, object]:
    if hist is None:
        return {"count": 0, "mean_ms": None, "p50_ms": None, "p90_ms": None, "p99_ms": None}
    buckets, total = hist
    count = buckets[-1][1] if buckets else 0.0

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000.0, 4)

    return {
        "count": int(count),
        "mean_ms": ms(total / count) if count else None,
        "p50_ms": ms(quantile(0.5, buckets)),
        "p90_ms": ms(quantile(0.9, buckets)),
        "p99_ms": ms(quantile(0.99, buckets)),
    }


class _LevelsCollector(Collector):
    """Gauges and counters the hierarchy and lease table already keep, read at scrape time."""

    def __init__(self, metrics: KvgateMetrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []  # unknown until the hierarchy is open; nothing to check for collisions

    def collect(self) -> Iterable[Metric]:
        hierarchy = self._metrics.hierarchy()
        if hierarchy is not None:
            yield from _tier_families(hierarchy)
        leases = self._metrics.leases()
        if leases is not None:
            live = GaugeMetricFamily("kvgate_leases_live", "Write leases outstanding")
            live.add_metric([], leases.live)
            waiters = GaugeMetricFamily(
                "kvgate_lease_waiters", "Readers waiting on a write lease's commit"
            )
            waiters.add_metric([], leases.waiters)
            yield live
            yield waiters


def _tier_families(hierarchy: Hierarchy) -> Iterator[Metric]:
    info = GaugeMetricFamily(
        "kvgate_tier_info", "The tiers, hottest first", labels=["tier", "device"]
    )
    used = GaugeMetricFamily("kvgate_tier_used_bytes", "Bytes held", labels=["tier"])
    capacity = GaugeMetricFamily("kvgate_tier_capacity_bytes", "Byte budget", labels=["tier"])
    blocks = GaugeMetricFamily("kvgate_tier_blocks", "Blocks held", labels=["tier"])
    evictions = CounterMetricFamily(
        "kvgate_tier_evictions", "Blocks evicted from a tier", labels=["tier"]
    )
    promotions = CounterMetricFamily(
        "kvgate_tier_promotions", "Blocks promoted out of a tier to a hotter one", labels=["tier"]
    )
    demotions = CounterMetricFamily(
        "kvgate_tier_demotions", "Blocks demoted out of a tier to a colder one", labels=["tier"]
    )
    promoted = hierarchy.promotions()
    demoted = hierarchy.demotions()
    for rank, stats in enumerate(hierarchy.stats()):
        t = [stats.name]
        info.add_metric([stats.name, stats.device], rank)
        used.add_metric(t, stats.used_bytes)
        capacity.add_metric(t, stats.capacity_bytes)
        blocks.add_metric(t, stats.blocks)
        evictions.add_metric(t, stats.evictions)
        promotions.add_metric(t, promoted.get(stats.name, 0))
        demotions.add_metric(t, demoted.get(stats.name, 0))
    tenants = GaugeMetricFamily(
        "kvgate_tenant_bytes", "Bytes held per tenant over all tiers", labels=["tenant"]
    )
    for tenant, nbytes in sorted(hierarchy.tenant_usage().items()):
        tenants.add_metric([tenant], nbytes)
    yield from (info, used, capacity, blocks, evictions, promotions, demotions, tenants)


class _OtelInstruments:
    """The same measurements through the OTel metrics API (exported by the app's reader)."""

    def __init__(self, meter: Meter, metrics: KvgateMetrics) -> None:
        self._metrics = metrics
        self._attrs: dict[str, dict[str, str]] = {}
        self.get_duration = meter.create_histogram(
            "kvgate.tier.get.duration", unit="s", description="Latency of reads served by a tier"
        )
        self.put_duration = meter.create_histogram(
            "kvgate.tier.put.duration", unit="s", description="Latency of stores into a tier"
        )
        self.hits = meter.create_counter("kvgate.tier.hits", description="Reads a tier answered")
        self.misses = meter.create_counter(
            "kvgate.tier.misses", description="Reads a tier could not answer"
        )
        self.reads = meter.create_counter(
            "kvgate.block.reads", description="Block reads by tenant and serving tier"
        )
        self.http = meter.create_histogram(
            "kvgate.http.server.duration", unit="s", description="HTTP request latency"
        )
        self.lease_events = meter.create_counter(
            "kvgate.lease.events", description="Lease protocol events"
        )
        self.lease_wait_duration = meter.create_histogram(
            "kvgate.lease.wait.duration", unit="s", description="Time spent waiting on a lease"
        )
        meter.create_observable_up_down_counter(
            "kvgate.tier.used_bytes", [self._levels("used_bytes")], unit="By"
        )
        meter.create_observable_up_down_counter(
            "kvgate.tier.capacity_bytes", [self._levels("capacity_bytes")], unit="By"
        )
        meter.create_observable_up_down_counter("kvgate.tier.blocks", [self._levels("blocks")])
        meter.create_observable_counter("kvgate.tier.evictions", [self._levels("evictions")])
        meter.create_observable_counter("kvgate.tier.promotions", [self._moves(promote=True)])
        meter.create_observable_counter("kvgate.tier.demotions", [self._moves(promote=False)])
        meter.create_observable_up_down_counter("kvgate.leases.live", [self._lease("live")])
        meter.create_observable_up_down_counter("kvgate.lease.waiters", [self._lease("waiters")])

    def _tier(self, tier: str) -> dict[str, str]:
        attrs = self._attrs.get(tier)
        if attrs is None:
            attrs = self._attrs[tier] = {"kvgate.tier": tier}
        return attrs

    def tier_get(self, tier: str, seconds: float | None, hit: bool) -> None:
        attrs = self._tier(tier)
        (self.hits if hit else self.misses).add(1, attrs)
        if seconds is not None:
            self.get_duration.record(seconds, attrs)

    def tier_put(self, tier: str, seconds: float, outcome: str) -> None:
        self.put_duration.record(seconds, {"kvgate.tier": tier, "kvgate.outcome": outcome})

    def block_read(self, tenant: str, tier: str | None) -> None:
        self.reads.add(1, {"kvgate.tenant": tenant, "kvgate.tier": tier or MISS})

    def http_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.http.record(
            seconds,
            {
                "http.request.method": method,
                "http.route": route,
                "http.response.status_code": status,
            },
        )

    def lease_event(self, event: str, tenant: str, count: int) -> None:
        self.lease_events.add(count, {"kvgate.lease.event": event, "kvgate.tenant": tenant})

    def lease_wait(self, seconds: float, outcome: str) -> None:
        self.lease_wait_duration.record(seconds, {"kvgate.outcome": outcome})

    def _levels(self, field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            hierarchy = self._metrics.hierarchy()
            if hierarchy is None:
                return []
            return [Observation(getattr(s, field), self._tier(s.name)) for s in hierarchy.stats()]

        return observe

    def _moves(self, *, promote: bool) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            hierarchy = self._metrics.hierarchy()
            if hierarchy is None:
                return []
            counts = hierarchy.promotions() if promote else hierarchy.demotions()
            return [Observation(n, self._tier(t)) for t, n in counts.items()]

        return observe

    def _lease(self, field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            leases = self._metrics.leases()
            return [] if leases is None else [Observation(int(getattr(leases, field)))]

        return observe
