"""An async Python client for the kvgate REST API, over one pooled aiohttp session."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar

import aiohttp
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import BytesPayload

from gateway import batch
from gateway.errors import KVGateError, client_error_for
from gateway.shm_client import (
    Dest,
    ShmSession,
    ShmUnavailable,
    dest_len,
    host_tensor,
    is_loopback_url,
)

_R = TypeVar("_R")


class SplitBody(BytesPayload):
    """A request body sent without aiohttp's header/body join (a copy of the whole body).

    aiohttp sends the headers with the body's first write by joining the two (before Python
    3.12.9 it never hands the transport a list instead); a 1-byte first write keeps that join
    tiny, and the rest goes to the transport as a memoryview of the caller's buffer."""

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        view = memoryview(self._value).cast("B")
        if content_length is not None:
            view = view[:content_length]
        if len(view) > 1:
            await writer.write(view[:1])
            view = view[1:]
        await writer.write(view)


@dataclass(frozen=True, slots=True)
class FetchedBlock:
    data: bytes
    tier: str
    etag: str


@dataclass(frozen=True, slots=True)
class Lease:
    """A granted write lease: PUT the block with ``lease_token=lease.token`` before it expires."""

    lease_id: str
    token: int
    expires_at_ms: int


@dataclass(frozen=True, slots=True)
class LeaseHeld:
    """Someone else is writing the block: wait for it (``get_block(wait_ms=...)``) or retry."""

    retry_after_ms: int


@dataclass(frozen=True, slots=True)
class BlockExists:
    """The block is already stored: read it, nothing to write."""


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

    ``get_many``/``put_many`` move the bytes through shared memory when the gateway is on this
    host (``shm=None``, the default: try it for a loopback URL; ``False``: never) and fall back
    to HTTP bodies (``/v1/batch/*``) whenever that path is not available.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        session: aiohttp.ClientSession | None = None,
        timeout_s: float = 60.0,
        max_connections: int = 64,
        shm: bool | None = None,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._own_session = session is None
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._max_connections = max_connections
        self._shm_wanted = is_loopback_url(self._base) if shm is None else shm
        self._shm: ShmSession | None = None
        self._shm_tried = False
        self._shm_release: list[str] = []
        self._shm_attach_lock = asyncio.Lock()
        self.shm_fallback_reason: str | None = None
        """Why the shared-memory path is off (``None`` while it is on or untried)."""

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
        await self._shm_detach()
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
        lease_token: int | str | None = None,
    ) -> bool:
        """``True`` when stored, ``False`` when the key was already present.

        Under a lease pass its ``token``; a lost or stale lease raises :class:`KVGateConflict`.
        """
        headers = dict(self._auth)
        headers["Content-Type"] = "application/octet-stream"
        if dtype is not None:
            headers["X-KV-Dtype"] = dtype
        if shape is not None:
            headers["X-KV-Shape"] = ",".join(str(int(d)) for d in shape)
        if ttl is not None:
            headers["X-KV-TTL"] = repr(float(ttl))
        if lease_token is not None:
            headers["X-KV-Lease-Token"] = str(lease_token)
        session = self._ensure_session()
        body = SplitBody(data, content_type="application/octet-stream")
        async with session.put(self._block_url(key), data=body, headers=headers) as resp:
            if resp.status == 201:
                return True
            if resp.status == 200:
                return False
            raise await _error_of(resp)

    async def get(self, key: str) -> bytes | None:
        block = await self.get_block(key)
        return None if block is None else block.data

    async def get_block(
        self, key: str, *, wait_ms: int | None = None, pin_ms: int | None = None
    ) -> FetchedBlock | None:
        """The block, or ``None``. ``wait_ms``: if a write lease on the key is outstanding, wait
        up to that long for its commit. ``pin_ms``: keep the block from eviction that long."""
        params: dict[str, str] = {}
        if wait_ms is not None:
            params["wait_ms"] = str(wait_ms)
        if pin_ms is not None:
            params["pin_ms"] = str(pin_ms)
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

    async def lookup(
        self, keys: Sequence[str], *, pin_ms: int | None = None
    ) -> tuple[int, list[str]]:
        """``(prefix_hits, tiers)`` for the longest present prefix of ``keys``; ``pin_ms`` also
        pins those blocks against eviction for that long (bounded by the server)."""
        body: dict[str, object] = {"keys": list(keys)}
        if pin_ms is not None:
            body["pin_ms"] = pin_ms
        payload = await self._post_json("/v1/lookup", body, expect=200)
        return int(payload["prefix_hits"]), [str(t) for t in payload["tiers"]]

    async def prefetch(self, keys: Sequence[str]) -> int:
        payload = await self._post_json("/v1/prefetch", {"keys": list(keys)}, expect=202)
        return int(payload.get("accepted", len(keys)))

    # ------------------------------------------------------------------ leases

    async def acquire_lease(
        self, key: str, *, ttl_ms: int = 10_000
    ) -> Lease | LeaseHeld | BlockExists:
        """Ask to be the one writer of ``key``: a :class:`Lease` (write it), :class:`LeaseHeld`
        (someone else is writing it) or :class:`BlockExists` (already stored)."""
        session = self._ensure_session()
        body = {"key": key, "ttl_ms": ttl_ms}
        async with session.post(self._url("/v1/leases"), json=body, headers=self._auth) as resp:
            if resp.status == 201:
                granted = await resp.json()
                return Lease(
                    lease_id=str(granted["lease_id"]),
                    token=int(granted["token"]),
                    expires_at_ms=int(granted["expires_at_ms"]),
                )
            if resp.status == 200:
                return BlockExists()
            if resp.status == 409:
                raw = await resp.read()
                try:
                    held = json.loads(raw)
                    return LeaseHeld(retry_after_ms=int(held["retry_after_ms"]))
                except (ValueError, KeyError, TypeError):
                    pass
                raise client_error_for(409, "conflict", raw[:200].decode("utf-8", "replace"))
            raise await _error_of(resp)

    async def renew_lease(self, lease_id: str, *, ttl_ms: int | None = None) -> int:
        """Extend the lease; its new ``expires_at_ms``. A lost lease raises
        :class:`KVGateConflict` (409) or :class:`KVGateNotFound` (404)."""
        body = {} if ttl_ms is None else {"ttl_ms": ttl_ms}
        payload = await self._post_json(f"/v1/leases/{lease_id}/renew", body, expect=200)
        return int(payload["expires_at_ms"])

    async def release_lease(self, lease_id: str) -> None:
        """Give the key up without writing (waiters are told at once)."""
        session = self._ensure_session()
        async with session.delete(self._url(f"/v1/leases/{lease_id}"), headers=self._auth) as resp:
            if resp.status != 204:
                raise await _error_of(resp)

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

    # ------------------------------------------------------------------ same-host data plane

    @property
    def uses_shm(self) -> bool:
        return self._shm is not None

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The blocks of ``keys`` in order (``None`` for a miss): through shared memory when the
        gateway is on this host, else one ``/v1/batch/get``. Each block is a new ``bytes``."""
        return await self._read_many(
            keys,
            on_shm=lambda _, shm, item: shm.read(item["segment"], item["runs"]),
            on_bytes=lambda _, data: data,
        )

    async def get_many_into(self, keys: Sequence[str], buffers: Sequence[Any]) -> list[int | None]:
        """Copy the blocks of ``keys`` into the caller's writable ``buffers`` (one per key:
        ``bytearray``, ``memoryview``, numpy array, a CPU tensor's ``.numpy()``...), each from
        its start; per key the number of bytes written, or ``None`` for a miss. Through shared
        memory this is one memcpy per block and no allocation (a serving engine copying into its
        own KV-cache pages); without it, the HTTP bytes are copied in. A buffer smaller than its
        block raises ``ValueError``."""
        if len(buffers) != len(keys):
            raise ValueError(f"{len(keys)} keys but {len(buffers)} buffers")
        views = [_byte_view(b) for b in buffers]
        return await self._read_many(
            keys,
            on_shm=lambda i, shm, item: shm.read_into(item["segment"], item["runs"], views[i]),
            on_bytes=lambda i, data: None if data is None else _copy_into(views[i], data),
        )

    async def _read_many(
        self,
        keys: Sequence[str],
        *,
        on_shm: Callable[[int, ShmSession, dict[str, Any]], _R],
        on_bytes: Callable[[int, bytes | None], _R],
    ) -> list[_R]:
        """Per key ``on_shm(i, session, descriptor)`` for a block in shared memory, else
        ``on_bytes(i, bytes or None)`` with the block read over HTTP."""
        read = await self._shm_get(keys)
        if read is None:
            got = await self.batch_get(keys)
            return [on_bytes(i, None if b is None else b.data) for i, b in enumerate(got)]
        shm, lease, items = read
        out: list[_R] = []
        try:
            for i, (key, item) in enumerate(zip(keys, items, strict=True)):
                status = item["status"]
                if status == 200:
                    out.append(on_shm(i, shm, item))
                elif status == 404:
                    out.append(on_bytes(i, None))
                else:  # 307: not in shared memory right now; this one comes over HTTP
                    out.append(on_bytes(i, await self.get(key)))
        finally:
            self._release_later(lease)
        return out

    async def _shm_get(
        self, keys: Sequence[str], *, retry: bool = True
    ) -> tuple[ShmSession, object, list[dict[str, Any]]] | None:
        """One ``/v1/shm/get``: the session, its lease (release it with :meth:`_release_later`
        once the bytes are copied out) and one descriptor per key; ``None`` when the
        shared-memory path is not available (read over HTTP instead)."""
        shm = await self._shm_session()
        if shm is None:
            return None
        payload: dict[str, Any] = {"session": shm.id, "keys": list(keys)}
        if self._shm_release:
            # Releasing the previous read rides on this call: no round trip of its own.
            payload["release"], self._shm_release = self._shm_release, []
        try:
            answer = await self._post_json("/v1/shm/get", payload, expect=200)
        except KVGateError as exc:
            if exc.status != 404 or not retry:
                raise
            # The session is gone (the gateway restarted, or it sat idle): attach once more --
            # unless a concurrent call has dropped it already (it may have attached anew).
            if self._shm is shm:
                self._shm_tried = False
                await self._shm_detach()
            return await self._shm_get(keys, retry=False)
        items = answer["items"]
        if not isinstance(items, list) or len(items) != len(keys):
            raise KVGateError(200, "bad_answer", "one descriptor per key expected")
        return shm, answer.get("lease"), items

    def _release_later(self, lease: object) -> None:
        if isinstance(lease, str):
            self._shm_release.append(lease)

    async def put_many(
        self,
        blocks: Mapping[str, bytes] | Iterable[tuple[str, bytes]],
        *,
        ttl: float | None = None,
        dtype: str | None = None,
    ) -> list[tuple[str, int]]:
        """As :meth:`batch_put`, writing the bytes into a shared staging segment when it can."""
        pairs = list(blocks.items()) if isinstance(blocks, Mapping) else list(blocks)
        shm = await self._shm_session()
        if shm is None:
            return await self.batch_put(pairs, ttl=ttl, dtype=dtype)
        sizes = [len(v) for _, v in pairs]
        reserved = await self._post_json(
            "/v1/shm/reserve", {"session": shm.id, "sizes": sizes}, expect=201
        )
        for (_, value), region in zip(pairs, reserved["regions"], strict=True):
            shm.write(region["segment"], region["runs"], value)
        commit: dict[str, Any] = {
            "session": shm.id,
            "lease": reserved["lease"],
            "keys": [k for k, _ in pairs],
        }
        if ttl is not None:
            commit["ttl_s"] = float(ttl)
        if dtype is not None:
            commit["dtype"] = dtype
        answer = await self._post_json("/v1/shm/commit", commit, expect=200)
        return [(str(r["key"]), int(r["status"])) for r in answer["results"]]

    async def _shm_session(self) -> ShmSession | None:
        if self._shm is not None or not self._shm_wanted:
            return self._shm
        # Concurrent first calls wait for the one attach rather than fall back to HTTP.
        async with self._shm_attach_lock:
            if self._shm is not None or self._shm_tried:
                return self._shm
            self._shm_tried = True
            return await self._shm_attach()

    async def _shm_attach(self) -> ShmSession | None:
        try:
            payload = await self._post_json("/v1/shm/attach", {}, expect=201)
        except KVGateError as exc:
            self.shm_fallback_reason = str(exc) or type(exc).__name__
            return None
        try:
            if ShmSession.blocks_to_attach(payload):
                self._shm = await asyncio.to_thread(ShmSession.from_attach, payload)
            else:
                self._shm = ShmSession.from_attach(payload)
        except ShmUnavailable as exc:
            self.shm_fallback_reason = str(exc) or type(exc).__name__
            await self._post_detach(payload.get("session"))  # free the gateway's side now
        return self._shm

    async def _shm_detach(self) -> None:
        shm, self._shm = self._shm, None
        if shm is None:
            return
        shm.close()
        await self._post_detach(shm.id)

    async def _post_detach(self, session_id: object) -> None:
        if self._session is not None and not self._session.closed:
            with contextlib.suppress(KVGateError, aiohttp.ClientError, OSError):
                async with self._session.post(
                    self._url("/v1/shm/detach"), json={"session": session_id}, headers=self._auth
                ) as resp:
                    await resp.read()

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


def _byte_view(buffer: Any) -> Dest:
    """A byte-addressed destination for ``buffer``: a flat ``memoryview``, or for a torch
    tensor (whose bytes may live on a GPU) a flat ``uint8`` view of the tensor."""
    if type(buffer).__module__.startswith("torch"):
        if not buffer.is_contiguous():
            raise ValueError("get_many_into needs contiguous buffers")
        return buffer.reshape(-1).view(_torch_uint8())
    view = memoryview(buffer)
    if view.readonly:
        raise ValueError("get_many_into needs writable buffers")
    if not view.c_contiguous:
        raise ValueError("get_many_into needs contiguous buffers")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _torch_uint8() -> Any:
    import torch  # only when the caller already handed us a tensor

    return torch.uint8


def _copy_into(dest: Dest, data: bytes) -> int:
    if len(data) > dest_len(dest):
        raise ValueError(f"a block of {len(data)} bytes does not fit a buffer of {dest_len(dest)}")
    if isinstance(dest, memoryview):
        dest[: len(data)] = data
    elif data:
        dest[: len(data)].copy_(host_tensor(data))
    return len(data)


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
