"""The aiohttp application: routes, the error middleware, and the hierarchy's lifetime.

Seams for later issues, so they plug in without touching handlers:

* ``context_resolver`` -- who is asking (issue 3: bearer tokens -> tenants);
* ``middlewares`` -- wrap every request outside the error middleware, so they see the final
  status of every answer (issue 5: tracing, latency histograms);
* ``hierarchy_factory`` -- what stores the blocks (tests inject clocks; issue 4 may add a
  remote tier); the default one gets the read pins' ``is_pinned`` as its eviction filter;
* ``scheduler`` / ``token_store`` -- lease timers and durable fencing epochs (tests inject a
  ``FakeScheduler`` over their ``FakeClock``; the default epochs live in the disk tier);
* :data:`gateway.state.STATE` -- the one AppKey holding the state, for whoever needs it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from coherence.leases import LeaseTable, TokenStore
from coherence.pins import PinTable
from coherence.redis_leases import RedisLeaseTable
from coherence.sched import Scheduler
from gateway import shm
from gateway.coherent import Coherence, token_store_for
from gateway.config import GatewayConfig
from gateway.context import ContextResolver, resolver_for
from gateway.errors import (
    GatewayError,
    error_code_for_status,
    http_error_for,
    json_error,
)
from gateway.handlers import Handlers, refusal_of
from gateway.state import STATE, GatewayState
from gateway.telemetry import Telemetry
from gateway.telemetry import install as install_telemetry
from tiers.block import DEFAULT_TENANT
from tiers.clock import SYSTEM_CLOCK, Clock
from tiers.factory import TierSettings, build_hierarchy
from tiers.hierarchy import Hierarchy
from tiers.remote import RemoteSettings

log = logging.getLogger("kvgate.gateway")

HierarchyFactory = Callable[[GatewayConfig], Awaitable[Hierarchy]]
"""Builds and opens the hierarchy for a config; the app closes it on teardown."""

# JSON bodies (lookup, prefetch, batch keys) and the headers of a block PUT fit in this slack.
BODY_SLACK_BYTES = 1024 * 1024


def tier_settings(config: GatewayConfig) -> TierSettings:
    return TierSettings(
        data_dir=config.data_dir,
        hbm_bytes=config.hbm_bytes,
        dram_bytes=config.dram_bytes,
        disk_bytes=config.disk_bytes,
        page_bytes=config.page_bytes,
        hbm_policy=config.hbm_policy,
        dram_policy=config.dram_policy,
        disk_policy=config.disk_policy,
        write_through=config.write_through,
        disk_compression_level=config.disk_compression_level,
        shm_dir=Path(config.shm_dir) if config.shm else None,
        shed_when_disk_behind=config.disk_shed,
        prefault=config.prefault,
        landing_bytes=config.landing_bytes if config.land_puts else 0,
        remote=None
        if config.remote is None
        else RemoteSettings(
            url=config.remote,
            capacity_bytes=config.remote_bytes,
            prefix=config.remote_prefix,
            level=config.disk_compression_level,
        ),
    )


def default_hierarchy_factory(
    clock: Clock = SYSTEM_CLOCK, *, is_pinned: Callable[[str], bool] | None = None
) -> HierarchyFactory:
    async def factory(config: GatewayConfig) -> Hierarchy:
        return await build_hierarchy(tier_settings(config), clock=clock, is_pinned=is_pinned)

    return factory


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error answer becomes ``{"error", "detail"}`` JSON; nothing escapes as a bare 500."""
    try:
        return await handler(request)
    except GatewayError as exc:
        return json_error(exc.status, exc.error, exc.detail, headers=exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status in (404, 405) and request.path.startswith("/v1/"):
            # Authenticate before saying which routes exist: a caller without a token learns
            # nothing about the API from probing it.
            refused = await refusal_of(request.app[STATE], request)
            if refused is not None:
                return refused
        return _from_http_exception(request, exc)
    except ConnectionError:
        raise  # the client went away; aiohttp closes the connection quietly
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise  # the handler itself is being cancelled
        # What aiohttp fails a body stream with when the shutdown drain stops waiting for it.
        return json_error(503, "unavailable", "the gateway shut down before the body was complete")
    except Exception as exc:
        mapped = http_error_for(exc)
        if mapped is not None:
            return json_error(mapped.status, mapped.error, mapped.detail, headers=mapped.headers)
        log.exception("unexpected error on %s %s", request.method, request.path)
        return json_error(500, "internal", "unexpected server error (logged)")


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> web.Response:
    status = exc.status
    if status == 404:
        detail = f"no route for {request.path[:200]}"
    elif status == 405:
        detail = f"{request.method} is not allowed on {request.path[:200]}"
    elif status == 413:
        detail = "request body over the limit"
    else:
        detail = exc.text or exc.reason
    headers = {name: exc.headers[name] for name in ("Allow", "Retry-After") if name in exc.headers}
    return json_error(status, error_code_for_status(status), detail, headers=headers)


def create_app(
    config: GatewayConfig,
    *,
    hierarchy_factory: HierarchyFactory | None = None,
    clock: Clock = SYSTEM_CLOCK,
    context_resolver: ContextResolver | None = None,
    middlewares: Sequence[Middleware] = (),
    scheduler: Scheduler | None = None,
    token_store: TokenStore | None = None,
    telemetry: Telemetry | None = None,
) -> web.Application:
    """The gateway app; the hierarchy is built on startup and closed (spilled) on cleanup,
    the lease table opened after it and closed before it.

    ``telemetry`` defaults to pipelines configured from the ``OTEL_*`` environment variables.
    """
    state = GatewayState(
        config=config,
        clock=clock,
        resolve=context_resolver or resolver_for(config.tenants),
        pins=PinTable(clock=clock),
    )
    factory = hierarchy_factory or default_hierarchy_factory(clock, is_pinned=state.pins.is_pinned)
    app = web.Application(
        middlewares=[*middlewares, error_middleware],
        # Block bodies are read by hand with their own limits (checked before reading); this
        # caps any body read through request.read()/post() at a block plus JSON slack.
        client_max_size=config.max_block_bytes + BODY_SLACK_BYTES,
    )
    app[STATE] = state
    telemetry = telemetry if telemetry is not None else Telemetry()

    async def summary_scope(request: web.Request) -> str | None:
        # Tenants share the tiers: each sees its own figures, as on /v1/stats.
        ctx = await state.resolve(request)
        return ctx.tenant if config.auth_enabled else None

    # Installed first: its middleware wraps everything, its cleanup runs after the tiers close.
    install_telemetry(
        app,
        telemetry,
        scope=summary_scope,
        metrics_token_sha256=config.metrics_token_sha256,
    )
    telemetry.bind_hierarchy(lambda: state.hierarchy)

    async def tiers_ctx(app: web.Application) -> AsyncIterator[None]:
        state.hierarchy = await factory(config)
        state.hierarchy.observer = telemetry.metrics
        try:
            yield
        finally:
            hierarchy, state.hierarchy = state.hierarchy, None
            # close() spills the volatile tiers to disk before closing them.
            await hierarchy.close()

    async def coherence_ctx(app: web.Application) -> AsyncIterator[None]:
        hierarchy = state.store
        leases: LeaseTable | RedisLeaseTable
        if hierarchy.shared is not None:
            # Several gateways, one cache: one writer per key across all of them.
            leases = RedisLeaseTable(
                hierarchy.shared.client,
                prefix=hierarchy.shared.prefix,
                clock=clock,
                scheduler=scheduler,
            )
        else:
            leases = LeaseTable(
                token_store or token_store_for(hierarchy, config.data_dir),
                clock=clock,
                scheduler=scheduler,
            )
        # Reserves a fresh fencing epoch (a durable increment): every token of a previous run
        # is older than any this run hands out. The Redis table subscribes to lease events.
        await leases.open([t.name for t in config.tenants] or [DEFAULT_TENANT])
        telemetry.metrics.bind_leases(leases.stats)
        state.coherence = Coherence(
            hierarchy,
            leases,
            state.pins,
            metrics=telemetry.metrics,
            remote_inclusive=config.remote_inclusive,
        )
        try:
            yield
        finally:
            state.coherence = None
            leases.stop_waiting()
            if isinstance(leases, RedisLeaseTable):
                await leases.close()

    async def wake_waiters(app: web.Application) -> None:
        # Graceful shutdown waits for in-flight requests: parked GETs answer now, not after
        # their wait_ms.
        if state.coherence is not None:
            state.coherence.stop_waiting()

    async def warn_open_metrics(app: web.Application) -> None:
        log.warning(
            "GET /metrics is open and names every tenant with its usage: set "
            "metrics_token_sha256 where tenants can reach this port"
        )

    app.cleanup_ctx.append(tiers_ctx)
    app.cleanup_ctx.append(coherence_ctx)
    app.on_shutdown.append(wake_waiters)
    if config.auth_enabled and config.metrics_token_sha256 is None:
        app.on_startup.append(warn_open_metrics)
    add_routes(app, Handlers(state))
    if config.shm:
        shm.install(app)  # the same-host data plane: /v1/shm/*
    return app


def add_routes(app: web.Application, h: Handlers) -> None:
    r = app.router
    # The pattern routes every key, even a malformed one, here: bad keys are 400, not 404.
    # [\s\S], not ".": a decoded newline (%0a) would end the match, and the route with it.
    block = r.add_resource(r"/v1/blocks/{key:[\s\S]*}", name="block")
    block.add_route("GET", h.get_block)  # HEAD is routed here too and answered without a body
    block.add_route("HEAD", h.get_block)
    block.add_route("PUT", h.put_block, expect_handler=h.expect_put)
    block.add_route("DELETE", h.delete_block)
    r.add_post("/v1/lookup", h.lookup)
    r.add_post("/v1/prefetch", h.prefetch)
    r.add_post("/v1/batch/get", h.batch_get)
    r.add_post("/v1/batch/put", h.batch_put)
    r.add_post("/v1/leases", h.acquire_lease)
    r.add_post("/v1/leases/{lease_id}/renew", h.renew_lease)
    r.add_delete("/v1/leases/{lease_id}", h.release_lease)
    r.add_get("/v1/stats", h.stats, allow_head=False)
    r.add_get("/healthz", h.healthz, allow_head=False)
    r.add_get("/readyz", h.readyz, allow_head=False)
    r.add_get("/openapi.json", h.openapi, allow_head=False)
