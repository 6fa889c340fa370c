"""Shared fixtures: a real gateway on loopback over real tiers in tmp_path, with a FakeClock."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from coherence.sched import FakeScheduler
from gateway.app import create_app
from gateway.config import GatewayConfig, MiB
from gateway.server import listen, make_runner
from gateway.state import STATE
from tiers import memory
from tiers.clock import FakeClock
from tiers.hierarchy import Hierarchy

SMALL_TIERS = GatewayConfig(
    port=0,
    hbm_bytes=8 * MiB,
    dram_bytes=16 * MiB,
    disk_bytes=512 * MiB,
    max_block_bytes=4 * MiB,
    max_batch_bytes=32 * MiB,
    max_batch_keys=256,
    page_bytes=16 * 1024,
    landing_bytes=8 * MiB,
    shutdown_timeout_s=1.0,
    disk_shed=False,  # tests read back everything they wrote: never shed under a slow disk
)


def subprocess_env(root: Path, **extra: str) -> dict[str, str]:
    """This environment for a child Python that imports the repo from ``root``; what is already
    on PYTHONPATH (an installed-elsewhere dependency) stays on it."""
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


@dataclass
class RunningGateway:
    url: str
    app: web.Application
    clock: FakeClock
    config: GatewayConfig
    scheduler: FakeScheduler
    """Lease and waiter timers: ``scheduler.advance(s)`` moves ``clock`` and fires them."""

    @property
    def hierarchy(self) -> Hierarchy:
        return self.app[STATE].store

    def block_url(self, key: str) -> str:
        return f"{self.url}/v1/blocks/{key}"


@asynccontextmanager
async def running_gateway(data_dir: Path, **overrides: Any) -> AsyncIterator[RunningGateway]:
    clock = FakeClock()
    scheduler = FakeScheduler(clock)
    config = replace(SMALL_TIERS, data_dir=data_dir, **overrides)
    app = create_app(config, clock=clock, scheduler=scheduler)
    runner = make_runner(app, config)
    await runner.setup()
    listener = None
    try:
        # The server's own listener (gateway.landing in front of aiohttp), as `kvgate serve`.
        listener = await listen(runner, config, host="127.0.0.1", port=0)
        port = listener.sockets[0].getsockname()[1]
        yield RunningGateway(f"http://127.0.0.1:{port}", app, clock, config, scheduler)
    finally:
        if listener is not None:
            listener.close()
        await runner.cleanup()


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[RunningGateway]:
    async with running_gateway(tmp_path / "data") as gw:
        yield gw


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def copies_in(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the bytes copied into any arena."""
    sizes: list[int] = []
    real = memory._copy_in

    def spy(view: memoryview, runs: list[tuple[int, int]], src: memoryview) -> None:
        sizes.append(len(src))
        real(view, runs, src)

    monkeypatch.setattr(memory, "_copy_in", spy)
    return sizes
