"""Shared pieces of the observability tests: a served app on loopback, a small tier stack."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.telemetry import TELEMETRY, Telemetry
from tests.tierkit import PAGE
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


def build_app(telemetry: Telemetry, data_dir: Path) -> web.Application:
    """The real gateway app over :func:`small_stack`, with ``telemetry`` as its pipelines."""

    async def factory(config: GatewayConfig) -> Hierarchy:
        return await small_stack(data_dir)

    config = GatewayConfig(port=0, data_dir=data_dir, shutdown_timeout_s=1.0)
    return create_app(config, hierarchy_factory=factory, telemetry=telemetry)


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
