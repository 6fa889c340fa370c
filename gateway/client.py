"""An async Python client for the kvgate REST API, over one pooled aiohttp session."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import aiohttp

from gateway import batch
from gateway.errors import KVGateError, client_error_for


@dataclass(frozen=True, slots=True)
class FetchedBlock:
    data: bytes
    tier: str
    etag: str


@dataclass(frozen=True, slots=True)
class BlockInfo:
    """What HEAD says about a block."""

    tier: str
    etag: str
    size: int


class KVGateClient:
    """``async with KVGateClient("http://127.0.0.1:8080") as kv: await kv.put("k", data)``.

    Misses are ``None`` / ``False``; other error answers raise :class:`KVGateError` subclasses
    (see :mod:`gateway.errors`). Pass ``session`` to share a pool; it is then not closed here.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        session: aiohttp.ClientSession | None = None,
        timeout_s: float = 60.0,
        max_connections: int = 64,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._own_session = session is None
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._max_connections = max_connections

    async def __aenter__(self) -> Self:
        self._ensure_session()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                timeout=self._timeout,
                headers=self._headers,
            )
            self._own_session = True
        return self._session

    def _url(self, path: str) -> str:
        return f"{self._base}{path}"

    def _block_url(self, key: str) -> str:
        # Keys are [A-Za-z0-9._:@-]: URL-safe as they are; the server rejects anything else.
        return f"{self._base}/v1/blocks/{key}"

    @property
    def _auth(self) -> Mapping[str, str]:
        # A shared session does not carry our token in its defaults.
        return {} if self._own_session else self._headers

    # ------------------------------------------------------------------ blocks

    async def put(
        self,
        key: str,
        data: bytes | bytearray | memoryview,
        *,
        dtype: str | None = None,
        shape: Sequence[int] | None = None,
        ttl: float | None = None,
        lease_token: str | None = None,
    ) -> bool:
        """``True`` when stored, ``False`` when the key was already present."""
        headers = dict(self._auth)
        headers["Content-Type"] = "application/octet-stream"
        if dtype is not None:
            headers["X-KV-Dtype"] = dtype
        if shape is not None:
            headers["X-KV-Shape"] = ",".join(str(int(d)) for d in shape)
        if ttl is not None:
            headers["X-KV-TTL"] = repr(float(ttl))
        if lease_token is not None:
            headers["X-KV-Lease-Token"] = lease_token
        session = self._ensure_session()
        async with session.put(self._block_url(key), data=data, headers=headers) as resp:
            if resp.status == 201:
                return True
            if resp.status == 200:
                return False
            raise await _error_of(resp)

    async def get(self, key: str) -> bytes | None:
        block = await self.get_block(key)
        return None if block is None else block.data

    async def get_block(self, key: str, *, wait_ms: int | None = None) -> FetchedBlock | None:
        params = {"wait_ms": str(wait_ms)} if wait_ms is not None else None
        session = self._ensure_session()
        async with session.get(self._block_url(key), params=params, headers=self._auth) as resp:
            if resp.status == 200:
                return FetchedBlock(
                    data=await resp.read(),
                    tier=resp.headers.get("X-KV-Tier", ""),
                    etag=resp.headers.get("ETag", ""),
                )
            if resp.status == 404:
                return None
            raise await _error_of(resp)

    async def head(self, key: str) -> BlockInfo | None:
        session = self._ensure_session()
        async with session.head(self._block_url(key), headers=self._auth) as resp:
            if resp.status == 200:
                return BlockInfo(
                    tier=resp.headers.get("X-KV-Tier", ""),
                    etag=resp.headers.get("ETag", ""),
                    size=int(resp.headers.get("Content-Length", "0")),
                )
            if resp.status == 404:
                return None
            raise KVGateError(resp.status, "head_failed", resp.reason or "")

    async def delete(self, key: str) -> bool:
        session = self._ensure_session()
        async with session.delete(self._block_url(key), headers=self._auth) as resp:
            if resp.status == 204:
                return True
            if resp.status == 404:
                return False
            raise await _error_of(resp)

    # ------------------------------------------------------------------ chains

    async def lookup(self, keys: Sequence[str]) -> tuple[int, list[str]]:
        """``(prefix_hits, tiers)`` for the longest present prefix of ``keys``."""
        payload = await self._post_json("/v1/lookup", {"keys": list(keys)}, expect=200)
        return int(payload["prefix_hits"]), [str(t) for t in payload["tiers"]]

    async def prefetch(self, keys: Sequence[str]) -> int:
        payload = await self._post_json("/v1/prefetch", {"keys": list(keys)}, expect=202)
        return int(payload.get("accepted", len(keys)))

    # ------------------------------------------------------------------ batch

    async def batch_get(self, keys: Sequence[str]) -> list[FetchedBlock | None]:
        """One entry per key, in order: the block or ``None`` on a miss."""
        session = self._ensure_session()
        async with session.post(
            self._url("/v1/batch/get"), json={"keys": list(keys)}, headers=self._auth
        ) as resp:
            if resp.status != 200:
                raise await _error_of(resp)
            body = await resp.read()
        items = batch.decode(body)
        if [item.key for item in items] != list(keys):
            raise KVGateError(200, "bad_batch", "the answer's keys do not match the request")
        return [
            FetchedBlock(data=bytes(item.data), tier=item.tier, etag="")
            if item.status == 200
            else None
            for item in items
        ]

    async def batch_put(
        self,
        blocks: Mapping[str, bytes] | Iterable[tuple[str, bytes]],
        *,
        ttl: float | None = None,
        dtype: str | None = None,
    ) -> list[tuple[str, int]]:
        """``(key, status)`` per item in order: 201 stored, 200 present, 413, 507."""
        pairs = list(blocks.items()) if isinstance(blocks, Mapping) else list(blocks)
        body = batch.encode([batch.BatchItem(key=k, data=v) for k, v in pairs])
        headers = dict(self._auth)
        headers["Content-Type"] = batch.MEDIA_TYPE
        if ttl is not None:
            headers["X-KV-TTL"] = repr(float(ttl))
        if dtype is not None:
            headers["X-KV-Dtype"] = dtype
        session = self._ensure_session()
        async with session.post(self._url("/v1/batch/put"), data=body, headers=headers) as resp:
            if resp.status != 200:
                raise await _error_of(resp)
            payload = await resp.json()
        return [(str(r["key"]), int(r["status"])) for r in payload["results"]]

    # ------------------------------------------------------------------ service

    async def stats(self) -> list[dict[str, Any]]:
        session = self._ensure_session()
        async with session.get(self._url("/v1/stats"), headers=self._auth) as resp:
            if resp.status != 200:
                raise await _error_of(resp)
            payload = await resp.json()
        return list(payload["tiers"])

    async def ready(self) -> bool:
        session = self._ensure_session()
        async with session.get(self._url("/readyz")) as resp:
            return resp.status == 200

    async def _post_json(self, path: str, payload: object, *, expect: int) -> dict[str, Any]:
        session = self._ensure_session()
        async with session.post(self._url(path), json=payload, headers=self._auth) as resp:
            if resp.status != expect:
                raise await _error_of(resp)
            result = await resp.json()
        if not isinstance(result, dict):
            raise KVGateError(resp.status, "bad_answer", "expected a JSON object")
        return result


async def _error_of(resp: aiohttp.ClientResponse) -> KVGateError:
    raw = await resp.read()
    error, detail = "http_error", raw[:200].decode("utf-8", "replace")
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        error = str(payload.get("error", error))
        detail = str(payload.get("detail", ""))
    return client_error_for(resp.status, error, detail)
