"""Lease protocol events reach /metrics (coherence wired to telemetry)."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RunningGateway


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


async def test_lease_events_and_waits_are_counted(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    async with http.post(f"{gateway.url}/v1/leases", json={"key": "k", "ttl_ms": 5000}) as r:
        assert r.status == 201
        lease = await r.json()
    async with http.post(f"{gateway.url}/v1/leases", json={"key": "k", "ttl_ms": 5000}) as r:
        assert r.status == 409
    headers = {"X-KV-Lease-Token": str(lease["token"])}
    async with http.put(gateway.block_url("k"), data=b"kv", headers=headers) as r:
        assert r.status == 201
    async with http.get(gateway.block_url("nothing") + "?wait_ms=1") as r:
        assert r.status == 404
    async with http.get(f"{gateway.url}/metrics") as r:
        text = await r.text()
    events = samples(text, "kvgate_lease_events_total")
    assert events[(("event", "granted"), ("tenant", "default"))] == 1
    assert events[(("event", "conflict"), ("tenant", "default"))] == 1
    assert events[(("event", "committed"), ("tenant", "default"))] == 1
    waits = samples(text, "kvgate_lease_wait_seconds_count")
    assert sum(waits.values()) == 1
