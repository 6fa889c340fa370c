"""kvgate (and the dict ceiling server) over its REST API, through one pooled aiohttp session."""

from __future__ import annotations

import json
from collections.abc import Sequence

import aiohttp

from gateway.client import SplitBody
from loadtest.targets.base import GetResult, Lease, LeaseRefusal, PutStatus, TargetError

_OCTET = "application/octet-stream"
_PUT_STATUS = {
    201: PutStatus.STORED,
    200: PutStatus.EXISTS,
    409: PutStatus.CONFLICT,
    507: PutStatus.NO_ROOM,
}


class HttpTarget:
    """The block subset of kvgate's REST API (PUT/GET blocks, lookup), which the dict ceiling
    server speaks too. Construct inside a running event loop."""

    def __init__(
        self,
        name: str,
        base_url: str,
        *,
        concurrency: int,
        default_tier: str | None = None,
        headers: dict[str, str] | None = None,
        only_scenarios: frozenset[str] | None = None,
    ) -> None:
        self.name = name
        self.only_scenarios = only_scenarios
        """Run only these scenarios against this target (all when ``None``)."""
        self._base = base_url.rstrip("/")
        self._blocks = f"{self._base}/v1/blocks/"
        self._default_tier = default_tier or name
        # One pooled session, one connection per concurrent worker: no connection churn, so the
        # client's share of the 2 cores stays small.
        connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=120),
            auto_decompress=False,
            headers=headers,
        )
        self._octet = {"Content-Type": _OCTET}

    async def put(self, key: str, value: bytes) -> PutStatus:
        return await self._put(key, value, self._octet)

    async def _put(self, key: str, value: bytes, headers: dict[str, str]) -> PutStatus:
        async with self._session.put(
            self._blocks + key, data=SplitBody(value, content_type=_OCTET), headers=headers
        ) as resp:
            await resp.read()
            status = _PUT_STATUS.get(resp.status)
            if status is None:
                raise TargetError(f"PUT {key}: HTTP {resp.status}")
            return status

    async def get(self, key: str) -> GetResult:
        return await self._get(self._blocks + key)

    async def _get(self, url: str) -> GetResult:
        async with self._session.get(url) as resp:
            body = await resp.read()
            if resp.status == 404:
                return GetResult(None, self._default_tier)
            if resp.status != 200:
                raise TargetError(f"GET {url}: HTTP {resp.status}")
            return GetResult(body, resp.headers.get("X-KV-Tier", self._default_tier))

    async def lookup(self, keys: Sequence[str]) -> int:
        payload = json.dumps({"keys": list(keys)})
        async with self._session.post(
            f"{self._base}/v1/lookup", data=payload, headers={"Content-Type": "application/json"}
        ) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise TargetError(f"POST /v1/lookup: HTTP {resp.status}")
            hits: int = json.loads(body)["prefix_hits"]
            return hits

    async def close(self) -> None:
        await self._session.close()


class KvgateTarget(HttpTarget):
    """kvgate itself: the block API plus leases and waiting reads."""

    async def put_leased(self, key: str, value: bytes, *, token: str) -> PutStatus:
        return await self._put(key, value, {**self._octet, "X-KV-Lease-Token": token})

    async def get_waiting(self, key: str, *, wait_ms: int) -> GetResult:
        return await self._get(f"{self._blocks}{key}?wait_ms={wait_ms}")

    async def acquire_lease(self, key: str, *, ttl_ms: int) -> Lease | LeaseRefusal:
        payload = json.dumps({"key": key, "ttl_ms": ttl_ms})
        async with self._session.post(
            f"{self._base}/v1/leases", data=payload, headers={"Content-Type": "application/json"}
        ) as resp:
            body = await resp.read()
            if resp.status == 201:
                answer = json.loads(body)
                return Lease(lease_id=str(answer["lease_id"]), token=str(answer["token"]))
            if resp.status == 200:
                return LeaseRefusal.EXISTS
            if resp.status == 409:
                return LeaseRefusal.HELD
            raise TargetError(f"POST /v1/leases: HTTP {resp.status}")

    async def release_lease(self, lease_id: str) -> None:
        async with self._session.delete(f"{self._base}/v1/leases/{lease_id}") as resp:
            await resp.read()
