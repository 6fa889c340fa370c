"""Route handlers of REST API v1.

The block GET path is the hot one: a precompiled regex, one resolver call, one hierarchy call and
a ``web.Response`` over the block's own buffer (no copy, no JSON). Failures raise
:mod:`gateway.errors` types; the error middleware renders them.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from typing import Any

from aiohttp import ClientPayloadError, web
from aiohttp.http_exceptions import HttpProcessingError

from gateway import batch
from gateway.errors import (
    BadBatch,
    BadHeader,
    BadJSON,
    BadKey,
    BadRequest,
    InsufficientStorage,
    NotFound,
    NotImplementedYet,
    PayloadTooLarge,
    UnsupportedMediaType,
    json_error,
)
from gateway.openapi import spec_bytes
from gateway.state import GatewayState
from tiers.block import Block
from tiers.hierarchy import StoreOutcome

KEY_RE = re.compile(r"[A-Za-z0-9._:@-]{1,512}")
_DTYPE_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
_SHAPE_RE = re.compile(r"\d{1,12}(?:,\d{1,12}){0,15}")
KNOWN_DTYPES = frozenset(
    {
        "bool",
        "uint8",
        "int8",
        "int16",
        "int32",
        "int64",
        "float16",
        "bfloat16",
        "float32",
        "float64",
        "float8_e4m3fn",
        "float8_e5m2",
    }
)
MAX_TTL_S = 10 * 365 * 24 * 3600.0
MAX_WAIT_MS = 60_000
JSON_BODY_LIMIT = 16 * 1024 * 1024
MAX_LOOKUP_KEYS = 65_536

_OCTET = "application/octet-stream"
_JSON_HEADERS = {"Content-Type": "application/json"}


def check_key(key: str) -> str:
    if KEY_RE.fullmatch(key) is None:
        shown = key if len(key) <= 64 else key[:64] + "..."
        raise BadKey(f"key {shown!r} does not match [A-Za-z0-9._:@-]{{1,512}}")
    return key


def json_response(payload: object, *, status: int = 200) -> web.Response:
    return web.Response(status=status, body=json.dumps(payload).encode(), headers=_JSON_HEADERS)


def etag_matches(if_none_match: str, etag: str) -> bool:
    for candidate in if_none_match.split(","):
        tag = candidate.strip()
        if tag == "*":
            return True
        if tag.startswith("W/"):
            tag = tag[2:]
        if tag == etag:
            return True
    return False


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, refusing more than ``limit`` bytes before reading any (Content-Length)
    or as soon as a chunked body goes over it."""
    length = request.content_length
    try:
        if length is not None:
            if length > limit:
                raise PayloadTooLarge(f"body of {length} bytes; the limit is {limit}")
            if length == 0:
                return b""
            return await request.content.readexactly(length)
        chunks: list[bytes] = []
        total = 0
        async for chunk in request.content.iter_any():
            total += len(chunk)
            if total > limit:
                raise PayloadTooLarge(f"body over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    except asyncio.IncompleteReadError:
        raise BadRequest("the body ended before Content-Length bytes") from None
    except (ClientPayloadError, HttpProcessingError) as exc:
        raise BadRequest(f"unreadable body: {exc}") from None


async def read_json(request: web.Request) -> Any:
    raw = await read_body(request, JSON_BODY_LIMIT)
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and UnicodeDecodeError; deep nesting recurses.
        raise BadJSON(f"the body is not valid JSON: {str(exc)[:200]}") from None


def keys_of(payload: Any, *, limit: int) -> list[str]:
    if not isinstance(payload, dict) or "keys" not in payload:
        raise BadJSON('expected a JSON object {"keys": [...]}')
    keys = payload["keys"]
    if not isinstance(keys, list):
        raise BadJSON('"keys" must be a list of strings')
    if len(keys) > limit:
        raise PayloadTooLarge(f"{len(keys)} keys in one call; at most {limit}")
    for key in keys:
        if not isinstance(key, str):
            raise BadJSON('"keys" must be a list of strings')
        check_key(key)
    return keys


def parse_dtype(value: str | None) -> str | None:
    if value is None:
        return None
    dtype = value.strip().lower()
    if _DTYPE_RE.fullmatch(dtype) is None or dtype not in KNOWN_DTYPES:
        raise BadHeader(f"X-KV-Dtype {value[:40]!r} is not one of {sorted(KNOWN_DTYPES)}")
    return dtype


def parse_shape(value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    compact = value.replace(" ", "")
    if _SHAPE_RE.fullmatch(compact) is None:
        raise BadHeader(f"X-KV-Shape {value[:40]!r} is not comma-separated non-negative integers")
    return tuple(int(part) for part in compact.split(","))


def parse_ttl(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        ttl = float(value)
    except ValueError:
        raise BadHeader(f"X-KV-TTL {value[:40]!r} is not a number of seconds") from None
    if not math.isfinite(ttl) or ttl <= 0 or ttl > MAX_TTL_S:
        raise BadHeader(f"X-KV-TTL must be > 0 and <= {MAX_TTL_S:.0f} seconds")
    return ttl


def parse_wait_ms(request: web.Request) -> int:
    raw = request.query.get("wait_ms")
    if raw is None:
        return 0
    if not raw.isdigit() or int(raw) > MAX_WAIT_MS:
        raise BadRequest(f"wait_ms must be an integer in 0..{MAX_WAIT_MS}")
    return int(raw)


class Handlers:
    """The v1 handlers, bound to the app's state (so the hot path skips app-dict lookups)."""

    def __init__(self, state: GatewayState) -> None:
        self._state = state
        self._config = state.config
        self._openapi = spec_bytes()

    # ------------------------------------------------------------------ blocks

    async def get_block(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        if KEY_RE.fullmatch(key) is None:
            check_key(key)
        state = self._state
        ctx = await state.resolve(request)
        if request.query_string:
            # The lease wait (issue 3) plugs in here; until then there is never a write to wait on.
            parse_wait_ms(request)
        hit = await state.store.get(ctx.scope(key))
        if hit is None:
            raise NotFound(f"no block {key!r}")
        etag = hit.block.meta.etag
        inm = request.headers.get("If-None-Match")
        if inm is not None and etag_matches(inm, etag):
            return web.Response(status=304, headers={"ETag": etag, "X-KV-Tier": hit.tier})
        return web.Response(
            body=hit.block.data,
            headers={"Content-Type": _OCTET, "ETag": etag, "X-KV-Tier": hit.tier},
        )

    async def put_block(self, request: web.Request) -> web.Response:
        key = check_key(request.match_info["key"])
        state = self._state
        ctx = await state.resolve(request)
        limit = self._config.max_block_bytes
        length = request.content_length
        if length is not None and length > limit:
            raise PayloadTooLarge(f"body of {length} bytes; the limit is {limit}")
        headers = request.headers
        dtype = parse_dtype(headers.get("X-KV-Dtype"))
        shape = parse_shape(headers.get("X-KV-Shape"))
        ttl = parse_ttl(headers.get("X-KV-TTL"))
        # X-KV-Lease-Token is checked by the coherence layer from issue 3 on.
        data = await read_body(request, limit)
        expires_at = None if ttl is None else state.clock.time() + ttl
        block = Block.of(data, dtype=dtype, shape=shape, expires_at=expires_at)
        outcome = await state.store.put(ctx.scope(key), block)
        etag = block.meta.etag
        if outcome is StoreOutcome.STORED:
            return web.Response(status=201, headers={"ETag": etag})
        if outcome is StoreOutcome.EXISTS:
            return web.Response(status=200)
        if outcome is StoreOutcome.TOO_LARGE:
            raise PayloadTooLarge(f"a block of {len(data)} bytes fits no tier")
        raise InsufficientStorage("no room: every tier is full and nothing can be evicted")

    async def delete_block(self, request: web.Request) -> web.Response:
        key = check_key(request.match_info["key"])
        ctx = await self._state.resolve(request)
        if not await self._state.store.delete(ctx.scope(key)):
            raise NotFound(f"no block {key!r}")
        return web.Response(status=204)

    async def expect_put(self, request: web.Request) -> web.StreamResponse | None:
        """``Expect: 100-continue``: refuse an oversized or badly keyed PUT before its body."""
        expect = request.headers.get("Expect", "")
        if expect.lower() != "100-continue":
            return json_error(417, "expectation_failed", f"unknown Expect: {expect[:40]!r}")
        length = request.content_length
        limit = self._config.max_block_bytes
        if length is not None and length > limit:
            return json_error(413, "too_large", f"body of {length} bytes; the limit is {limit}")
        if KEY_RE.fullmatch(request.match_info.get("key", "")) is None:
            return json_error(400, "bad_key", "key does not match [A-Za-z0-9._:@-]{1,512}")
        if request.version >= (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            # The interim answer is not part of the response's own size accounting.
            request.writer.output_size = 0
        return None

    # ------------------------------------------------------------------ chains

    async def lookup(self, request: web.Request) -> web.Response:
        ctx = await self._state.resolve(request)
        keys = keys_of(await read_json(request), limit=MAX_LOOKUP_KEYS)
        tiers = self._state.store.lookup([ctx.scope(k) for k in keys])
        return json_response({"prefix_hits": len(tiers), "tiers": tiers})

    async def prefetch(self, request: web.Request) -> web.Response:
        ctx = await self._state.resolve(request)
        keys = keys_of(await read_json(request), limit=MAX_LOOKUP_KEYS)
        await self._state.store.prefetch([ctx.scope(k) for k in keys])
        return json_response({"accepted": len(keys)}, status=202)

    # ------------------------------------------------------------------ batch

    async def batch_get(self, request: web.Request) -> web.StreamResponse:
        ctx = await self._state.resolve(request)
        keys = keys_of(await read_json(request), limit=self._config.max_batch_keys)
        store = self._state.store
        hits = await asyncio.gather(*(store.get(ctx.scope(k)) for k in keys))
        items = [
            batch.BatchItem(key=k, status=404)
            if hit is None
            else batch.BatchItem(key=k, data=hit.block.data, status=200, tier=hit.tier)
            for k, hit in zip(keys, hits, strict=True)
        ]
        parts = batch.encode_parts(items)
        response = web.StreamResponse(headers={"Content-Type": batch.MEDIA_TYPE})
        response.content_length = batch.frame_length(parts)
        await response.prepare(request)
        for part in parts:
            await response.write(part)
        await response.write_eof()
        return response

    async def batch_put(self, request: web.Request) -> web.Response:
        ctx = await self._state.resolve(request)
        content_type = request.headers.get("Content-Type")
        if content_type is not None and request.content_type not in (batch.MEDIA_TYPE, _OCTET):
            raise UnsupportedMediaType(f"send {batch.MEDIA_TYPE}, not {content_type[:60]!r}")
        headers = request.headers
        dtype = parse_dtype(headers.get("X-KV-Dtype"))
        ttl = parse_ttl(headers.get("X-KV-TTL"))
        raw = await read_body(request, self._config.max_batch_bytes)
        try:
            items = batch.decode(
                raw,
                max_items=self._config.max_batch_keys,
                max_item_bytes=self._config.max_block_bytes,
            )
        except batch.BatchFormatError as exc:
            raise BadBatch(str(exc)) from None
        for item in items:
            check_key(item.key)
        expires_at = None if ttl is None else self._state.clock.time() + ttl
        store = self._state.store
        results: list[dict[str, object]] = []
        counts = {"stored": 0, "exists": 0}
        # One at a time, in order: a key repeated in the batch keeps its first body.
        for item in items:
            block = Block.of(bytes(item.data), dtype=dtype, expires_at=expires_at)
            outcome = await store.put(ctx.scope(item.key), block)
            results.append(_put_result(item.key, outcome))
            if outcome is StoreOutcome.STORED:
                counts["stored"] += 1
            elif outcome is StoreOutcome.EXISTS:
                counts["exists"] += 1
        return json_response({**counts, "results": results})

    # ------------------------------------------------------------------ leases (issue 3)

    async def leases_not_ready(self, request: web.Request) -> web.Response:
        await self._state.resolve(request)
        raise NotImplementedYet("leases are not wired into this build yet")

    # ------------------------------------------------------------------ service

    async def stats(self, request: web.Request) -> web.Response:
        await self._state.resolve(request)
        return json_response({"tiers": [s.as_json() for s in self._state.store.stats()]})

    async def healthz(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        if not self._state.ready:
            return json_error(503, "unavailable", "the tiers are not open yet")
        return json_response({"status": "ready"})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=self._openapi, headers=_JSON_HEADERS)


def _put_result(key: str, outcome: StoreOutcome) -> dict[str, object]:
    if outcome is StoreOutcome.STORED:
        return {"key": key, "status": 201}
    if outcome is StoreOutcome.EXISTS:
        return {"key": key, "status": 200}
    if outcome is StoreOutcome.TOO_LARGE:
        return {"key": key, "status": 413, "error": "too_large"}
    return {"key": key, "status": 507, "error": "no_room"}
