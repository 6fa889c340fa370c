"""Bearer-token tenants: 401 without a known token, and tenants never see each other's blocks."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import aiohttp
import pytest

from gateway.client import KVGateClient
from gateway.config import TenantConfig
from tests.conftest import running_gateway


def tenant(name: str, token: str) -> TenantConfig:
    return TenantConfig(name, hashlib.sha256(token.encode()).hexdigest())


TENANTS = (tenant("alice", "alice-token"), tenant("bob", "bob-token"))


async def test_v1_calls_need_a_known_bearer_token(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, tenants=TENANTS) as gw, aiohttp.ClientSession() as http:
        cases = [
            ({}, 401, "unauthorized"),
            ({"Authorization": "Basic eA=="}, 401, "unauthorized"),
            ({"Authorization": "Bearer"}, 401, "unauthorized"),
            ({"Authorization": "Bearer nope"}, 403, "forbidden"),
        ]
        for headers, status, error in cases:
            async with http.get(gw.block_url("k"), headers=headers) as resp:
                assert resp.status == status
                assert (await resp.json())["error"] == error
                if status == 401:
                    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            async with http.put(gw.block_url("k"), data=b"x", headers=headers) as resp:
                assert resp.status == status
            async with http.post(f"{gw.url}/v1/lookup", json={"keys": []}, headers=headers) as r:
                assert r.status == status
            async with http.get(f"{gw.url}/v1/stats", headers=headers) as resp:
                assert resp.status == status
            # Unknown routes and methods answer as the known ones do: no map of the API for free.
            async with http.get(f"{gw.url}/v1/no-such-route", headers=headers) as resp:
                assert resp.status == status
            async with http.patch(gw.block_url("k"), headers=headers) as resp:
                assert resp.status == status
            # Who asks comes before what is asked: a bad key is not checked for strangers.
            bad = f"{gw.url}/v1/blocks/bad%2Fkey"
            for method in ("GET", "HEAD", "PUT", "DELETE"):
                async with http.request(method, bad, data=b"x", headers=headers) as resp:
                    assert resp.status == status, method
            expect = {**headers, "Expect": "100-continue"}
            async with http.put(bad, data=b"x", headers=expect, expect100=True) as resp:
                assert resp.status == status
        for path in ("/healthz", "/readyz", "/openapi.json", "/metrics"):
            async with http.get(f"{gw.url}{path}") as resp:
                assert resp.status == 200
        good = {"Authorization": "Bearer alice-token"}
        async with http.get(f"{gw.url}/v1/no-such-route", headers=good) as resp:
            assert resp.status == 404


async def test_same_key_two_tenants_two_blocks(tmp_path: Path) -> None:
    async with (
        running_gateway(tmp_path, tenants=TENANTS) as gw,
        KVGateClient(gw.url, token="alice-token") as alice,
        KVGateClient(gw.url, token="bob-token") as bob,
    ):
        assert await alice.put("shared-name", b"alice's") is True
        assert await bob.get("shared-name") is None
        assert await bob.lookup(["shared-name"]) == (0, [])
        assert await bob.put("shared-name", b"bob's") is True
        assert await alice.get("shared-name") == b"alice's"
        assert await bob.get("shared-name") == b"bob's"
        assert await bob.delete("shared-name") is True
        assert await alice.get("shared-name") == b"alice's"


async def test_a_metrics_token_guards_the_scrape_endpoint(tmp_path: Path) -> None:
    # The metrics name every tenant: where tenants can reach the port, the scraper needs a token.
    digest = hashlib.sha256(b"scraper-token").hexdigest()
    async with (
        running_gateway(tmp_path, tenants=TENANTS, metrics_token_sha256=digest) as gw,
        aiohttp.ClientSession() as http,
    ):
        cases = [
            ({}, 401),
            ({"Authorization": "Bearer alice-token"}, 403),  # a tenant's token is not the scraper's
            ({"Authorization": "Bearer scraper-token"}, 200),
        ]
        for headers, status in cases:
            async with http.get(f"{gw.url}/metrics", headers=headers) as resp:
                assert resp.status == status
                if status == 200:
                    assert "kvgate_tier_capacity_bytes" in await resp.text()
                else:
                    assert (await resp.json())["error"] in ("unauthorized", "forbidden")
        async with http.get(f"{gw.url}/healthz") as resp:
            assert resp.status == 200


async def test_open_metrics_with_tenants_is_warned_at_startup(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    digest = hashlib.sha256(b"scraper-token").hexdigest()
    warning = "GET /metrics is open"
    with caplog.at_level(logging.WARNING, logger="kvgate.gateway"):
        async with running_gateway(tmp_path / "a", tenants=TENANTS):
            pass
        assert warning in caplog.text
        caplog.clear()
        async with running_gateway(tmp_path / "b", tenants=TENANTS, metrics_token_sha256=digest):
            pass
        async with running_gateway(tmp_path / "c"):  # one tenant, loopback: nothing to leak
            pass
    assert warning not in caplog.text


async def test_lease_errors_name_the_key_as_the_tenant_sent_it(tmp_path: Path) -> None:
    async with (
        running_gateway(tmp_path, tenants=TENANTS) as gw,
        KVGateClient(gw.url, token="bob-token") as bob,
        aiohttp.ClientSession() as http,
    ):
        await bob.acquire_lease("L1", ttl_ms=5_000)
        headers = {"Authorization": "Bearer bob-token"}
        details = []
        async with http.put(gw.block_url("L1"), data=b"x", headers=headers) as resp:
            assert resp.status == 409
            details.append((await resp.json())["detail"])
        stale = {**headers, "X-KV-Lease-Token": "1"}
        async with http.put(gw.block_url("L1"), data=b"x", headers=stale) as resp:
            assert resp.status == 409
            details.append((await resp.json())["detail"])
    assert "held" in details[0] and "token" in details[1]
    for detail in details:
        assert "'L1'" in detail and "bob/" not in detail, detail
