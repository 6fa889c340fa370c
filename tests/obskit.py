"""Shared pieces of the observability tests: a served app on loopback, a small tier stack."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from gateway.telemetry import TELEMETRY, Telemetry, install
from tests.tierkit import PAGE
from tiers.block import Block, scoped_key
from tiers.disk import DiskTier
from tiers.hierarchy import Hierarchy
from tiers.memory import ArenaTier

BLOCK = 2 * PAGE
MiB = 1024 * 1024


async def small_stack(data_dir: Path) -> Hierarchy:
    """The real three tiers, small: hbm and dram hold two blocks each, LMDB takes the rest."""
    disk = await DiskTier.open(data_dir / "blocks.lmdb", capacity_bytes=16 * MiB, sync=False)
    hierarchy = Hierarchy(
        [
            ArenaTier("hbm", 2 * BLOCK, page_bytes=PAGE),
            ArenaTier("dram", 2 * BLOCK, page_bytes=PAGE),
            disk,
        ]
    )
    await hierarchy.open()
    return hierarchy


def build_app(telemetry: Telemetry, hierarchy: Hierarchy) -> web.Application:
    app = web.Application()
    telemetry.attach(hierarchy)

    async def get_block(request: web.Request) -> web.Response:
        hit = await hierarchy.get(scoped_key("default", request.match_info["key"]))
        if hit is None:
            return web.json_response({"error": "not_found", "detail": ""}, status=404)
        return web.Response(body=hit.block.data, headers={"X-KV-Tier": hit.tier})

    async def put_block(request: web.Request) -> web.Response:
        key = scoped_key("default", request.match_info["key"])
        outcome = await hierarchy.put(key, Block.of(await request.read()))
        return web.json_response({"outcome": outcome.value}, status=201)

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"tiers": [s.as_json() for s in hierarchy.stats()]})

    app.router.add_get("/v1/blocks/{key}", get_block)
    app.router.add_put("/v1/blocks/{key}", put_block)
    app.router.add_get("/v1/stats", stats)
    install(app, telemetry)

    async def close(app: web.Application) -> AsyncIterator[None]:
        yield
        await hierarchy.close()

    app.cleanup_ctx.append(close)
    return app


async def quiesce(served: Served) -> None:
    """Wait for the background promotions reads started (they move blocks between tiers)."""
    hierarchy = served.app[TELEMETRY].metrics.hierarchy()
    assert hierarchy is not None
    await hierarchy.quiesce()


@dataclass
class Served:
    url: str
    app: web.Application


@asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[Served]:
    runner = web.AppRunner(app)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, sock)
    await site.start()
    port = sock.getsockname()[1]
    try:
        yield Served(f"http://127.0.0.1:{port}", app)
    finally:
        await runner.cleanup()
