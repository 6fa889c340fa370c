"""Route handlers of REST API v1.

The block GET path is the hot one: a precompiled regex, one resolver call, one hierarchy call,
and the block's pages written from the arena straight to the socket while they are pinned against
reuse (:func:`send_pinned`; no copy out of the arena, no JSON). Failures raise
:mod:`gateway.errors` types; the error middleware renders them.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import sys
from typing import Any

from aiohttp import ClientPayloadError, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDictProxy

from coherence.errors import BadRequest as CoherenceBadRequest
from coherence.errors import LeaseConflict, QuotaExceeded, StaleToken
from coherence.leases import Held, parse_token
from gateway import batch
from gateway.coherent import DEFAULT_LEASE_TTL_MS, Coherence, Exists
from gateway.context import RequestContext
from gateway.errors import (
    BadBatch,
    BadHeader,
    BadJSON,
    BadKey,
    BadRequest,
    InsufficientStorage,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
    http_error_for,
    json_error,
    unreadable_detail,
)
from gateway.landing import Landing, take_landing
from gateway.openapi import spec_bytes
from gateway.state import GatewayState
from tiers.block import Block
from tiers.hierarchy import Hierarchy, StoreOutcome

KEY_RE = re.compile(r"[A-Za-z0-9._:@-]{1,512}")
_DTYPE_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
_SHAPE_RE = re.compile(r"\d{1,12}(?:,\d{1,12}){0,15}")
_TTL_RE = re.compile(
    r"(?:[0-9]{1,12}(?:\.[0-9]{0,9})?|\.[0-9]{1,9})(?:[eE][+-]?[0-9]{1,3})?", re.ASCII
)
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
# Expiry is checked against a clock read per request; finer than a millisecond means nothing.
MIN_TTL_S = 0.001
MAX_WAIT_MS = 60_000
MAX_PIN_MS = 60_000
MAX_LEASE_ID_CHARS = 128
JSON_BODY_LIMIT = 16 * 1024 * 1024
MAX_LOOKUP_KEYS = 65_536

_OCTET = "application/octet-stream"
_JSON_HEADERS = {"Content-Type": "application/json"}


# asyncio's selector transport copies what a write() cannot send at once into its own buffer
# before Python 3.12; from 3.12 it keeps a reference to the caller's memoryview until sent.
_TRANSPORT_KEEPS_VIEWS = sys.version_info >= (3, 12)


async def send_pinned(
    request: web.Request, views: list[memoryview], size: int, headers: dict[str, str]
) -> web.StreamResponse:
    """Write a pinned block's views to the socket; when this returns, the transport no longer
    needs them (the caller may release the pin)."""
    response = web.StreamResponse(headers=headers)
    response.content_length = size
    if _TRANSPORT_KEEPS_VIEWS and request.transport is not None:
        # Pause on any backlog, so each write's drain waits until the views are really sent.
        request.transport.set_write_buffer_limits(high=0)
    await response.prepare(request)
    # aiohttp sends the headers together with the first body write by joining the two (a copy
    # of the whole body); a 1-byte first write keeps that join tiny, and the rest of the block
    # goes to the transport as the arena's own memoryview.
    first = views[0]
    if len(first) > 1:
        await response.write(first[:1])
        views = [first[1:], *views[1:]]
    for view in views:
        await response.write(view)
    await response.write_eof()
    return response


def _block_response(
    request: web.Request, etag: str, tier: str, data: bytes | memoryview
) -> web.Response:
    """A block answer from bytes the handler holds (HEAD, and reads through the coherence layer)."""
    inm = request.headers.get("If-None-Match")
    if inm is not None and etag_matches(inm, etag):
        return web.Response(status=304, headers={"ETag": etag, "X-KV-Tier": tier})
    return web.Response(
        body=data, headers={"Content-Type": _OCTET, "ETag": etag, "X-KV-Tier": tier}
    )


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


# Content codings aiohttp decodes as the body is read (br and zstd need optional packages).
DECODED_CODINGS = frozenset({"identity", "gzip", "deflate"})


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, refusing more than ``limit`` bytes before reading any (Content-Length)
    or as soon as a chunked or content-coded body goes over it. A ``Content-Encoding`` body is
    the bytes the client encoded; a coding aiohttp cannot decode is refused with 415."""
    coding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if coding not in DECODED_CODINGS:
        raise UnsupportedMediaType(
            f"Content-Encoding {coding[:40]!r} is not supported: send identity, gzip or deflate"
        )
    wire_length = request.content_length
    if wire_length is not None and wire_length > limit:
        raise PayloadTooLarge(f"body of {wire_length} bytes; the limit is {limit}")
    # Content-Length counts the encoded bytes; only an identity body is known to be that long.
    length = wire_length if coding == "identity" else None
    try:
        if length is not None:
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
    except (ClientPayloadError, HttpProcessingError, RequestPayloadError) as exc:
        raise BadRequest(f"unreadable body: {unreadable_detail(exc)}") from None


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


def single_header(headers: CIMultiDictProxy[str], name: str) -> str | None:
    """The one value of `name`; two values of a header that means one thing are misuse."""
    values = headers.getall(name, [])
    if len(values) > 1:
        raise BadHeader(f"{name} was sent {len(values)} times; send it once")
    return values[0] if values else None


def parse_ttl(value: str | None) -> float | None:
    if value is None:
        return None
    # float() alone would take "1_0", non-ASCII digits and "1e-300": refuse what no client means.
    if _TTL_RE.fullmatch(value.strip(" \t")) is None:
        raise BadHeader(f"X-KV-TTL {value[:40]!r} is not a decimal number of seconds")
    ttl = float(value)
    if not math.isfinite(ttl) or ttl < MIN_TTL_S or ttl > MAX_TTL_S:
        raise BadHeader(f"X-KV-TTL must be >= {MIN_TTL_S} and <= {MAX_TTL_S:.0f} seconds")
    return ttl


def parse_wait_ms(request: web.Request) -> int:
    raw = request.query.get("wait_ms")
    if raw is None:
        return 0
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 6 or int(raw) > MAX_WAIT_MS:
        raise BadRequest(f"wait_ms must be an integer in 0..{MAX_WAIT_MS}")
    return int(raw)


def parse_pin_ms(value: object, *, where: str) -> int | None:
    """``pin_ms`` (query or JSON): how long to pin what is read; absent -> no pin."""
    if value is None:
        return None
    if isinstance(value, str):
        value = int(value) if value.isascii() and value.isdigit() and len(value) <= 6 else -1
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PIN_MS:
        raise BadRequest(f"{where} pin_ms must be an integer in 1..{MAX_PIN_MS}")
    return value


def parse_lease_token(value: str | None) -> int | None:
    try:
        return parse_token(value)
    except CoherenceBadRequest as exc:
        raise BadHeader(str(exc)) from None


def lease_id_of(request: web.Request) -> str:
    lease_id = request.match_info["lease_id"]
    if not 1 <= len(lease_id) <= MAX_LEASE_ID_CHARS:
        raise BadRequest(f"a lease id is 1..{MAX_LEASE_ID_CHARS} characters")
    return lease_id


async def refusal_of(state: GatewayState, request: web.Request) -> web.Response | None:
    """The 401/403 answer for a caller the tenants do not admit, ``None`` for one they do:
    for answers given before (or instead of) a handler, which must not tell strangers more."""
    try:
        await state.resolve(request)
    except Exception as exc:
        refused = http_error_for(exc)
        if refused is None:
            raise
        return json_error(refused.status, refused.error, refused.detail, headers=refused.headers)
    return None


class Handlers:
    """The v1 handlers, bound to the app's state (so the hot path skips app-dict lookups)."""

    def __init__(self, state: GatewayState) -> None:
        self._state = state
        self._config = state.config
        self._openapi = spec_bytes()

    # ------------------------------------------------------------------ blocks

    async def get_block(self, request: web.Request) -> web.StreamResponse:
        state = self._state
        ctx = await state.resolve(request)  # who asks comes first: 401 before 400
        key = request.match_info["key"]
        if KEY_RE.fullmatch(key) is None:
            check_key(key)
        if request.query_string:
            # Waiting for a writer's commit, or pinning what is read: the coherence layer.
            wait_ms = parse_wait_ms(request)
            pin_ms = parse_pin_ms(request.query.get("pin_ms"), where="query")
            hit = await state.coherent.get(ctx.scope(key), wait_ms=wait_ms, pin_ms=pin_ms)
            if hit is None:
                raise NotFound(f"no block {key!r}")
            return _block_response(request, hit.block.meta.etag, hit.tier, hit.block.data)
        store = state.store
        if request.method == "HEAD":
            return await self._head_block(request, store, ctx.scope(key), key)
        pinned = await store.get_pinned(ctx.scope(key))
        if pinned is None:
            raise NotFound(f"no block {key!r}")
        block = pinned.block
        try:
            meta = block.meta
            etag = meta.etag
            inm = request.headers.get("If-None-Match")
            if inm is not None and etag_matches(inm, etag):
                return web.Response(status=304, headers={"ETag": etag, "X-KV-Tier": pinned.tier})
            headers = {"Content-Type": _OCTET, "ETag": etag, "X-KV-Tier": pinned.tier}
            if meta.size == 0:
                return web.Response(body=b"", headers=headers)
            views = block.views()
            if views is None:
                # Not host-addressable (HBM on a GPU): one copy to the host, under the pin,
                # then written as views too (web.Response would join it to the headers: a
                # second copy of the block, a fifth of the loop's time in a GPU host profile).
                views = [memoryview(await block.read()).cast("B")]
            return await send_pinned(request, views, meta.size, headers)
        finally:
            block.release()

    async def _head_block(
        self, request: web.Request, store: Hierarchy, scoped: str, key: str
    ) -> web.Response:
        hit = await store.get(scoped)
        if hit is None:
            raise NotFound(f"no block {key!r}")
        return _block_response(request, hit.block.meta.etag, hit.tier, hit.block.data)

    async def put_block(self, request: web.Request) -> web.Response:
        # The body may have been received already, straight into a buffer (gateway.landing).
        landing = take_landing(request)
        try:
            return await self._put_block(request, landing)
        finally:
            if landing is not None:
                landing.release()

    async def _put_block(self, request: web.Request, landing: Landing | None) -> web.Response:
        state = self._state
        ctx = await state.resolve(request)
        key = check_key(request.match_info["key"])
        limit = self._config.max_block_bytes
        length = request.content_length if landing is None else landing.length
        if length is not None and length > limit:
            raise PayloadTooLarge(f"body of {length} bytes; the limit is {limit}")
        headers = request.headers
        dtype = parse_dtype(single_header(headers, "X-KV-Dtype"))
        shape = parse_shape(single_header(headers, "X-KV-Shape"))
        ttl = parse_ttl(single_header(headers, "X-KV-TTL"))
        token = parse_lease_token(single_header(headers, "X-KV-Lease-Token"))
        coherent = state.coherent
        scoped = ctx.scope(key)
        # Refuse a fenced-off writer before reading a body that could never be stored.
        await coherent.check_write(scoped, token)
        # The whole body is staged in memory first: a writer that dies mid-upload leaves nothing.
        data: bytes | memoryview
        known_digest = None
        if landing is None:
            data = await read_body(request, limit)
        else:
            data = await landing.read()
            known_digest = landing.digest()
        expires_at = None if ttl is None else state.clock.time() + ttl
        block = Block.of(
            data, dtype=dtype, shape=shape, expires_at=expires_at, known_digest=known_digest
        )
        reservation = None if landing is None else landing.reservation
        outcome = await coherent.put(ctx, scoped, block, token=token, reservation=reservation)
        etag = block.meta.etag
        if outcome is StoreOutcome.STORED:
            return web.Response(status=201, headers={"ETag": etag})
        if outcome is StoreOutcome.EXISTS:
            return web.Response(status=200)
        if outcome is StoreOutcome.TOO_LARGE:
            raise PayloadTooLarge(f"a block of {len(data)} bytes fits no tier")
        raise InsufficientStorage("no room: every tier is full and nothing can be evicted")

    async def delete_block(self, request: web.Request) -> web.Response:
        ctx = await self._state.resolve(request)
        key = check_key(request.match_info["key"])
        if not await self._state.coherent.delete(ctx.scope(key)):
            raise NotFound(f"no block {key!r}")
        return web.Response(status=204)

    async def expect_put(self, request: web.Request) -> web.StreamResponse | None:
        """``Expect: 100-continue``: refuse an oversized or badly keyed PUT before its body."""
        refused = await refusal_of(self._state, request)
        if refused is not None:
            return refused
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
        payload = await read_json(request)
        keys = keys_of(payload, limit=MAX_LOOKUP_KEYS)
        pin_ms = parse_pin_ms(payload.get("pin_ms"), where="lookup")
        scoped = [ctx.scope(k) for k in keys]
        # A lookup is how a frontend starts a request: the policies learn its chain here.
        self._state.store.note_request(scoped)
        if pin_ms is None:
            tiers = await self._state.store.lookup_shared(scoped)
            return json_response({"prefix_hits": len(tiers), "tiers": tiers})
        tiers, pinned = await self._state.coherent.lookup(scoped, pin_ms=pin_ms)
        return json_response({"prefix_hits": len(tiers), "tiers": tiers, "pinned": pinned})

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
        dtype = parse_dtype(single_header(headers, "X-KV-Dtype"))
        ttl = parse_ttl(single_header(headers, "X-KV-TTL"))
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
        coherent = self._state.coherent
        results: list[dict[str, object]] = []
        counts = {"stored": 0, "exists": 0}
        # One at a time, in order: a key repeated in the batch keeps its first body.
        for item in items:
            block = Block.of(bytes(item.data), dtype=dtype, expires_at=expires_at)
            result = await put_item(coherent, ctx, item.key, block)
            results.append(result)
            if result["status"] == 201:
                counts["stored"] += 1
            elif result["status"] == 200:
                counts["exists"] += 1
        return json_response({**counts, "results": results})

    # ------------------------------------------------------------------ leases

    async def acquire_lease(self, request: web.Request) -> web.Response:
        ctx = await self._state.resolve(request)
        payload = await read_json(request)
        if not isinstance(payload, dict) or not isinstance(payload.get("key"), str):
            raise BadJSON('expected a JSON object {"key": ..., "ttl_ms": ...}')
        key = check_key(payload["key"])
        ttl_ms = payload.get("ttl_ms", DEFAULT_LEASE_TTL_MS)
        if isinstance(ttl_ms, bool) or not isinstance(ttl_ms, int) or ttl_ms < 1:
            raise BadJSON('"ttl_ms" must be a positive integer')
        answer = await self._state.coherent.acquire(ctx.scope(key), ttl_ms)
        if isinstance(answer, Exists):
            return json_response({"exists": True})
        if isinstance(answer, Held):
            body = {
                "error": "lease_conflict",
                "detail": f"another writer holds the lease on {key!r}",
                "retry_after_ms": answer.retry_after_ms,
            }
            response = json_response(body, status=409)
            response.headers["Retry-After"] = str(max(1, math.ceil(answer.retry_after_ms / 1000)))
            return response
        return json_response(answer.as_json(), status=201)

    async def renew_lease(self, request: web.Request) -> web.Response:
        ctx = await self._state.resolve(request)
        lease_id = lease_id_of(request)
        ttl_ms: int | None = None
        raw_body = await read_body(request, JSON_BODY_LIMIT) if request.body_exists else b""
        if raw_body.strip():
            try:
                payload = json.loads(raw_body)
            except (ValueError, RecursionError):
                raise BadJSON("the body is not valid JSON") from None
            if not isinstance(payload, dict):
                raise BadJSON('expected a JSON object {"ttl_ms": ...} or no body')
            raw = payload.get("ttl_ms")
            if raw is not None:
                if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
                    raise BadJSON('"ttl_ms" must be a positive integer')
                ttl_ms = raw
        coherent = self._state.coherent
        expires_at_ms = await coherent.renew(lease_id, ttl_ms, tenant=ctx.tenant)
        return json_response({"expires_at_ms": expires_at_ms})

    async def release_lease(self, request: web.Request) -> web.Response:
        ctx = await self._state.resolve(request)
        await self._state.coherent.release(lease_id_of(request), tenant=ctx.tenant)
        return web.Response(status=204)

    # ------------------------------------------------------------------ service

    async def stats(self, request: web.Request) -> web.Response:
        ctx = await self._state.resolve(request)
        store = self._state.store
        await store.refresh_shared()
        coherent = self._state.coherent
        if self._state.config.auth_enabled:
            # Tenants share the tiers: each is shown its own share of them, never totals,
            # whose changes would tell of the other tenants' reads and writes (the operator's
            # totals are on /metrics).
            tiers = store.tenant_stats(ctx.tenant)
            pinned_bytes, pinned_blocks = coherent.pins.tenant_pins(ctx.tenant)
            leases = coherent.lease_stats(ctx.tenant)
        else:
            tiers = store.stats()
            pinned_bytes, pinned_blocks = coherent.pins.pinned_bytes(), len(coherent.pins)
            leases = coherent.lease_stats()
        return json_response(
            {
                "tiers": [s.as_json() for s in tiers],
                "pinned_bytes": pinned_bytes,
                "pinned_blocks": pinned_blocks,
                "leases": {
                    "live": leases.live,
                    "waiters": leases.waiters,
                    "remembered": leases.remembered,
                },
                "tenant": {
                    "name": ctx.tenant,
                    "used_bytes": store.tenant_bytes(ctx.tenant),
                    "quota_bytes": ctx.quota_bytes,
                },
            }
        )

    async def healthz(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        if not self._state.ready:
            return json_error(503, "unavailable", "the tiers are not open yet")
        return json_response({"status": "ready"})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=self._openapi, headers=_JSON_HEADERS)


async def put_item(
    coherent: Coherence, ctx: RequestContext, key: str, block: Block
) -> dict[str, object]:
    """One item of a multi-block write, through the coherence layer like a single PUT (leases,
    fencing, quotas, waiters woken), answered as that item's result instead of raised."""
    try:
        outcome = await coherent.put(ctx, ctx.scope(key), block, token=None)
    except (LeaseConflict, StaleToken, QuotaExceeded) as exc:
        return {"key": key, "status": exc.http_status, "error": exc.code}
    return _put_result(key, outcome)


def _put_result(key: str, outcome: StoreOutcome) -> dict[str, object]:
    if outcome is StoreOutcome.STORED:
        return {"key": key, "status": 201}
    if outcome is StoreOutcome.EXISTS:
        return {"key": key, "status": 200}
    if outcome is StoreOutcome.TOO_LARGE:
        return {"key": key, "status": 413, "error": "too_large"}
    return {"key": key, "status": 507, "error": "no_room"}
