"""Lookup, prefetch, stats, metrics, health, OpenAPI and the lease routes."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from openapi_spec_validator import validate

from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.openapi import build_spec
from tests.conftest import SMALL_TIERS, RunningGateway
from tests.test_http_blocks import MiB, payload
from tiers.errors import TierClosed, TierIOError

STATS_FIELDS = {
    "name",
    "device",
    "capacity_bytes",
    "used_bytes",
    "blocks",
    "hits",
    "misses",
    "evictions",
}


async def put(gateway: RunningGateway, http: aiohttp.ClientSession, key: str, size: int) -> None:
    async with http.put(gateway.block_url(key), data=payload(key, size)) as resp:
        assert resp.status == 201


async def test_lookup_counts_the_longest_present_prefix(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    for key in ("p0", "p1", "p3"):
        await put(gateway, http, key, 1000)
    cases = [
        (["p0", "p1", "p2", "p3"], 2),
        (["p0", "p1"], 2),
        (["p2", "p0", "p1"], 0),
        (["p0", "p1", "p3"], 3),
        ([], 0),
    ]
    for keys, hits in cases:
        async with http.post(f"{gateway.url}/v1/lookup", json={"keys": keys}) as resp:
            assert resp.status == 200
            body = await resp.json()
            assert body == {"prefix_hits": hits, "tiers": ["hbm"] * hits}


async def test_lookup_reports_each_blocks_tier(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    keys = [f"chain:{i}" for i in range(30)]
    for key in keys:
        await put(gateway, http, key, MiB)
    await gateway.hierarchy.quiesce()  # moves to disk finish in the background
    async with http.post(f"{gateway.url}/v1/lookup", json={"keys": keys}) as resp:
        body = await resp.json()
    assert body["prefix_hits"] == 30
    assert body["tiers"] == [gateway.hierarchy.locate(f"default/{k}") for k in keys]
    assert {"hbm", "dram", "disk"} >= set(body["tiers"]) and "disk" in body["tiers"]


async def test_prefetch_answers_202_and_promotes_in_background(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    keys = [f"pf:{i}" for i in range(30)]
    for key in keys:
        await put(gateway, http, key, MiB)
    await gateway.hierarchy.quiesce()  # background demotions done: a moving block is not cold
    cold = [k for k in keys if gateway.hierarchy.locate(f"default/{k}") == "disk"][:3]
    assert cold
    async with http.post(f"{gateway.url}/v1/prefetch", json={"keys": cold}) as resp:
        assert resp.status == 202
        assert (await resp.json())["accepted"] == len(cold)
    await gateway.hierarchy.quiesce()
    for key in cold:
        assert gateway.hierarchy.locate(f"default/{key}") in ("hbm", "dram")
        async with http.get(gateway.block_url(key)) as resp:
            assert await resp.read() == payload(key, MiB)


async def test_stats_have_the_contract_fields_hottest_first(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    for i in range(30):
        await put(gateway, http, f"s{i}", MiB)
    await gateway.hierarchy.quiesce()  # demotions to disk finish in the background (spill_behind)
    await http.get(gateway.block_url("s29"))
    await http.get(gateway.block_url("absent"))
    async with http.get(f"{gateway.url}/v1/stats") as resp:
        assert resp.status == 200
        tiers = (await resp.json())["tiers"]
    assert [t["name"] for t in tiers] == ["hbm", "dram", "disk"]
    for tier in tiers:
        assert set(tier) >= STATS_FIELDS
        assert 0 <= tier["used_bytes"] <= tier["capacity_bytes"]
        assert isinstance(tier["device"], str) and tier["device"]
    assert tiers[0]["capacity_bytes"] == gateway.config.hbm_bytes
    assert tiers[2]["device"] == "lmdb"
    assert sum(t["blocks"] for t in tiers) == 30
    assert sum(t["hits"] for t in tiers) >= 1
    assert any(t["evictions"] > 0 for t in tiers[:2])


async def test_metrics_is_prometheus_text(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    await put(gateway, http, "m", 100)
    async with http.get(f"{gateway.url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    assert re.search(r'^kvgate_tier_blocks\{tier="hbm"\} 1\.0$', text, re.M)
    assert re.search(r'^kvgate_tier_info\{device="[^"]+",tier="hbm"\} 0\.0$', text, re.M)
    assert "# TYPE kvgate_tier_hits_total counter" in text


async def test_health_and_readiness(gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    for path in ("/healthz", "/readyz"):
        async with http.get(f"{gateway.url}{path}") as resp:
            assert resp.status == 200


async def test_openapi_lists_exactly_the_apps_routes(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{gateway.url}/openapi.json") as resp:
        assert resp.status == 200
        spec = await resp.json()
    assert spec["openapi"].startswith("3.")
    assert spec == build_spec()
    documented = {(method.upper(), path) for path, item in spec["paths"].items() for method in item}
    routed = set()
    for route in gateway.app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = str(info.get("formatter") or info.get("path"))
        routed.add((route.method, re.sub(r"\{(\w+):[^}]*\}", r"{\1}", path)))
    assert routed == documented


def test_openapi_spec_validates_against_the_openapi_schema() -> None:
    # Client generators reject a spec that is merely JSON-shaped: hold it to the real schema.
    validate(build_spec())


async def test_lease_routes_answer_per_contract(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    async with http.post(f"{gateway.url}/v1/leases", json={"key": "k", "ttl_ms": 1000}) as resp:
        assert resp.status == 201
        granted = await resp.json()
    assert set(granted) == {"lease_id", "token", "expires_at_ms"}
    renew = f"{gateway.url}/v1/leases/{granted['lease_id']}/renew"
    async with http.post(renew) as resp:
        assert resp.status == 200
        assert set(await resp.json()) == {"expires_at_ms"}
    async with http.delete(f"{gateway.url}/v1/leases/{granted['lease_id']}") as resp:
        assert resp.status == 204
    async with http.post(renew) as resp:
        assert resp.status == 409
        assert (await resp.json())["error"] == "lease_lost"
    async with http.post(f"{gateway.url}/v1/leases/nope/renew") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"] == "lease_not_found"


class ExplodingHierarchy:
    """Stands in for a hierarchy whose reads fail, to drive the error middleware's last resorts."""

    shared = None  # no remote tier

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    async def get(self, key: str, *, hint: object = None) -> None:
        raise self.exc

    async def get_pinned(self, key: str) -> None:
        raise self.exc

    def stats(self) -> list[object]:
        return []

    async def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("exc", "status", "error", "logged"),
    [
        (RuntimeError("boom"), 500, "internal", True),
        (TierIOError("disk gone"), 503, "unavailable", False),
        (TierClosed("closed"), 503, "unavailable", False),
    ],
)
async def test_unexpected_failures_are_json_and_logged(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    exc: Exception,
    status: int,
    error: str,
    logged: bool,
) -> None:
    async def factory(config: GatewayConfig) -> Any:
        return ExplodingHierarchy(exc)

    app = create_app(replace(SMALL_TIERS, data_dir=tmp_path), hierarchy_factory=factory)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/blocks/k"
    try:
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            assert resp.status == status
            body = await resp.json()
            assert body["error"] == error
            assert "boom" not in body["detail"]  # internals stay in the log
    finally:
        await runner.cleanup()
    assert any(r.name == "kvgate.gateway" for r in caplog.records) == logged
