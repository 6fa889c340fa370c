"""Bad input of every kind gets a 4xx with the JSON error shape, and never reaches the 500 path."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from gateway import batch
from gateway.errors import error_code_for_status
from tests.conftest import RunningGateway, running_gateway


@pytest.fixture(autouse=True)
def no_internal_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fails the test if any request went down the unexpected-exception (500) path."""
    caplog.set_level(logging.ERROR, logger="kvgate.gateway")
    yield
    assert not [r for r in caplog.records if r.name == "kvgate.gateway"]


async def assert_json_error(
    resp: aiohttp.ClientResponse, status: int, error: str
) -> dict[str, str]:
    assert resp.status == status, await resp.text()
    assert resp.headers["Content-Type"].startswith("application/json")
    body = await resp.json()
    assert set(body) == {"error", "detail"}
    assert body["error"] == error
    assert isinstance(body["detail"], str) and body["detail"]
    return body  # type: ignore[no-any-return]


async def raw_exchange(url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read one answer (the server closes: every request says so)."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(reader.readexactly(length), 10)
        return status, headers, body
    finally:
        writer.close()


BAD_KEYS = [
    "bad%20key",
    "a%2Fb",
    "a/b",
    "x" * 513,
    "y" * 20_000,
    "%C3%A9",
    "semi;colon",
    "per%25cent",
    "q%3F",
    "k1%0a",  # a newline: the route's pattern once stopped at it (404, not 400)
    "k1%0D%0Ak2",
]


@pytest.mark.parametrize("key", BAD_KEYS, ids=lambda key: f"{key[:12]}-{len(key)}")
async def test_bad_keys_are_400_on_every_method(
    gateway: RunningGateway, http: aiohttp.ClientSession, key: str
) -> None:
    url = f"{gateway.url}/v1/blocks/{key}"
    async with http.put(url, data=b"x") as resp:
        await assert_json_error(resp, 400, "bad_key")
    async with http.get(url) as resp:
        await assert_json_error(resp, 400, "bad_key")
    async with http.delete(url) as resp:
        await assert_json_error(resp, 400, "bad_key")
    async with http.head(url) as resp:
        assert resp.status == 400


async def test_empty_key_is_400(gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{gateway.url}/v1/blocks/") as resp:
        await assert_json_error(resp, 400, "bad_key")


async def test_content_length_over_the_limit_is_413_before_the_body(
    gateway: RunningGateway,
) -> None:
    # Claims 1 TB and sends nothing: the answer can only come from the header.
    request = (
        b"PUT /v1/blocks/big HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n"
        b"Connection: close\r\n\r\n"
    )
    status, headers, body = await raw_exchange(gateway.url, request)
    assert status == 413
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"] == "too_large"


async def test_expect_continue_over_the_limit_is_413_without_100(
    gateway: RunningGateway,
) -> None:
    request = (
        b"PUT /v1/blocks/big HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n"
        b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
    )
    status, _, body = await raw_exchange(gateway.url, request)
    assert status == 413
    assert json.loads(body)["error"] == "too_large"


async def test_unknown_expectation_is_417_json(gateway: RunningGateway) -> None:
    request = (
        b"PUT /v1/blocks/k HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
        b"Expect: teapot\r\nConnection: close\r\n\r\nabc"
    )
    status, _, body = await raw_exchange(gateway.url, request)
    assert status == 417
    assert json.loads(body)["error"] == "expectation_failed"


async def test_body_over_the_limit_is_413(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    too_big = b"x" * (gateway.config.max_block_bytes + 1)
    async with http.put(gateway.block_url("big"), data=too_big) as resp:
        await assert_json_error(resp, 413, "too_large")
    async with http.get(gateway.block_url("big")) as resp:
        assert resp.status == 404


async def test_chunked_body_over_the_limit_is_413(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    chunk = b"y" * (1024 * 1024)
    rounds = gateway.config.max_block_bytes // len(chunk) + 2

    async def body() -> AsyncIterator[bytes]:
        for _ in range(rounds):
            yield chunk

    try:
        async with http.put(gateway.block_url("chunky"), data=body()) as resp:
            await assert_json_error(resp, 413, "too_large")
    except aiohttp.ClientOSError:
        pass  # the server may close while we are still sending: also a refusal
    async with http.get(gateway.block_url("chunky")) as resp:
        assert resp.status == 404


async def test_body_shorter_than_content_length_is_not_stored(gateway: RunningGateway) -> None:
    parts = urlsplit(gateway.url)
    _, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.write(b"PUT /v1/blocks/short HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    async with aiohttp.ClientSession() as http, http.get(gateway.block_url("short")) as resp:
        assert resp.status == 404


@pytest.mark.parametrize(
    ("headers", "detail_part"),
    [
        ({"X-KV-TTL": "abc"}, "X-KV-TTL"),
        ({"X-KV-TTL": "-1"}, "X-KV-TTL"),
        ({"X-KV-TTL": "0"}, "X-KV-TTL"),
        ({"X-KV-TTL": "nan"}, "X-KV-TTL"),
        ({"X-KV-TTL": "inf"}, "X-KV-TTL"),
        ({"X-KV-TTL": "1e400"}, "X-KV-TTL"),
        ({"X-KV-TTL": "1_0"}, "X-KV-TTL"),
        ({"X-KV-TTL": "\u0661\u0660"}, "X-KV-TTL"),
        ({"X-KV-TTL": "1e-300"}, "X-KV-TTL"),
        ({"X-KV-TTL": "0x10"}, "X-KV-TTL"),
        ({"X-KV-TTL": "+5"}, "X-KV-TTL"),
        ({"X-KV-Shape": "1,x"}, "X-KV-Shape"),
        ({"X-KV-Shape": ""}, "X-KV-Shape"),
        ({"X-KV-Shape": "-1,2"}, "X-KV-Shape"),
        ({"X-KV-Shape": "1,,2"}, "X-KV-Shape"),
        ({"X-KV-Dtype": "complex999"}, "X-KV-Dtype"),
        ({"X-KV-Dtype": ""}, "X-KV-Dtype"),
    ],
)
async def test_bad_block_headers_are_400(
    gateway: RunningGateway,
    http: aiohttp.ClientSession,
    headers: dict[str, str],
    detail_part: str,
) -> None:
    async with http.put(gateway.block_url("h"), data=b"abc", headers=headers) as resp:
        body = await assert_json_error(resp, 400, "bad_header")
        assert detail_part in body["detail"]
    async with http.get(gateway.block_url("h")) as resp:
        assert resp.status == 404


@pytest.mark.parametrize("name", ["X-KV-TTL", "X-KV-Dtype", "X-KV-Shape", "X-KV-Lease-Token"])
async def test_a_block_header_sent_twice_is_400(
    gateway: RunningGateway, http: aiohttp.ClientSession, name: str
) -> None:
    # Proxies differ on which copy of a repeated header they keep: the gateway takes neither.
    value = {"X-KV-TTL": "30", "X-KV-Dtype": "uint8", "X-KV-Shape": "3"}.get(name, "1:1")
    headers = CIMultiDict([(name, value), (name, value)])
    async with http.put(gateway.block_url("h"), data=b"abc", headers=headers) as resp:
        body = await assert_json_error(resp, 400, "bad_header")
        assert name in body["detail"]
    async with http.get(gateway.block_url("h")) as resp:
        assert resp.status == 404


@pytest.mark.parametrize("ttl", ["30", "0.5", ".25", "1e3", " 7 ", "0.001"])
async def test_decimal_ttls_are_accepted(
    gateway: RunningGateway, http: aiohttp.ClientSession, ttl: str
) -> None:
    async with http.put(gateway.block_url("t"), data=b"abc", headers={"X-KV-TTL": ttl}) as resp:
        assert resp.status in (200, 201)


@pytest.mark.parametrize("wait", ["abc", "-5", "1.5", "99999999999"])
async def test_bad_wait_ms_is_400(
    gateway: RunningGateway, http: aiohttp.ClientSession, wait: str
) -> None:
    async with http.get(gateway.block_url("k"), params={"wait_ms": wait}) as resp:
        await assert_json_error(resp, 400, "bad_request")


BAD_JSON_BODIES = [b"{not json", b"\xff\xfe\x00", b"[" * 100_000, b"", b'{"keys": [1}']
WRONG_SHAPES: list[object] = [
    [],
    None,
    "keys",
    {"nokeys": []},
    {"keys": "abc"},
    {"keys": [1, 2]},
    {"keys": [None]},
    {"keys": {"a": 1}},
]


@pytest.mark.parametrize("path", ["/v1/lookup", "/v1/prefetch", "/v1/batch/get"])
async def test_malformed_and_misshapen_json_is_400(
    gateway: RunningGateway, http: aiohttp.ClientSession, path: str
) -> None:
    for raw in BAD_JSON_BODIES:
        async with http.post(f"{gateway.url}{path}", data=raw) as resp:
            await assert_json_error(resp, 400, "bad_json")
    for shape in WRONG_SHAPES:
        async with http.post(f"{gateway.url}{path}", json=shape) as resp:
            await assert_json_error(resp, 400, "bad_json")
    async with http.post(f"{gateway.url}{path}", json={"keys": ["ok", "not ok"]}) as resp:
        await assert_json_error(resp, 400, "bad_key")


async def test_too_many_batch_keys_is_413(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    keys = [f"k{i}" for i in range(gateway.config.max_batch_keys + 1)]
    async with http.post(f"{gateway.url}/v1/batch/get", json={"keys": keys}) as resp:
        await assert_json_error(resp, 413, "too_large")


BAD_FRAMES = [
    b"",
    b"garbage",
    b"XXXX" + b"\x01\x00\x00\x00\x00\x00\x00\x01",
    batch.encode([batch.BatchItem("k", b"abc")])[:-1],
    batch.encode([batch.BatchItem("k", b"abc")]) + b"trailing",
    b"KVGB\x01\x00\x00\x00\xff\xff\xff\xff",
    b"KVGB\x02\x00\x00\x00\x00\x00\x00\x00",
]


@pytest.mark.parametrize("frame", BAD_FRAMES)
async def test_bad_batch_frames_are_400(
    gateway: RunningGateway, http: aiohttp.ClientSession, frame: bytes
) -> None:
    headers = {"Content-Type": batch.MEDIA_TYPE}
    async with http.post(f"{gateway.url}/v1/batch/put", data=frame, headers=headers) as resp:
        await assert_json_error(resp, 400, "bad_batch")


async def test_batch_put_checks_keys_and_media_type(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    frame = batch.encode([batch.BatchItem("good", b"1"), batch.BatchItem("bad key", b"2")])
    headers = {"Content-Type": batch.MEDIA_TYPE}
    async with http.post(f"{gateway.url}/v1/batch/put", data=frame, headers=headers) as resp:
        await assert_json_error(resp, 400, "bad_key")
    async with http.get(gateway.block_url("good")) as resp:
        assert resp.status == 404  # validated before anything was stored
    async with http.post(f"{gateway.url}/v1/batch/put", json={"keys": []}) as resp:
        await assert_json_error(resp, 415, "unsupported_media_type")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PATCH", "/v1/blocks/k"),
        ("POST", "/v1/blocks/k"),
        ("GET", "/v1/lookup"),
        ("PUT", "/v1/prefetch"),
        ("POST", "/v1/stats"),
        ("DELETE", "/healthz"),
        ("GET", "/v1/leases"),
    ],
)
async def test_wrong_method_is_405_json_with_allow(
    gateway: RunningGateway, http: aiohttp.ClientSession, method: str, path: str
) -> None:
    async with http.request(method, f"{gateway.url}{path}") as resp:
        await assert_json_error(resp, 405, "method_not_allowed")
        assert resp.headers["Allow"]


@pytest.mark.parametrize("path", ["/", "/v2/blocks/k", "/v1/block/k", "/v1/lookup/extra", "/%zz"])
async def test_unknown_route_is_404_json(
    gateway: RunningGateway, http: aiohttp.ClientSession, path: str
) -> None:
    async with http.get(f"{gateway.url}{path}") as resp:
        assert resp.status in (400, 404)
        await assert_json_error(resp, resp.status, "not_found" if resp.status == 404 else "bad_key")


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    key=st.text(min_size=1, max_size=40).filter(lambda s: "/" not in s and s not in (".", "..")),
    ttl=st.text(max_size=12),
    shape=st.text(max_size=12),
)
async def test_fuzzed_keys_and_headers_never_5xx(
    gateway: RunningGateway, http: aiohttp.ClientSession, key: str, ttl: str, shape: str
) -> None:
    headers = {"X-KV-TTL": ttl, "X-KV-Shape": shape}
    safe_headers = {k: v for k, v in headers.items() if v.isprintable() and v.isascii()}
    url = gateway.block_url(key)
    async with http.put(url, data=b"fuzz", headers=safe_headers) as resp:
        assert resp.status < 500
        if resp.status >= 400:
            assert set(await resp.json()) == {"error", "detail"}
    async with http.get(url) as resp:
        assert resp.status < 500


MALFORMED_HEADS = {
    "bad-content-length": b"PUT /v1/blocks/k HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    "two-content-lengths": (
        b"PUT /v1/blocks/k HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nab"
    ),
    "length-and-chunked": (
        b"PUT /v1/blocks/k HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "binary-method": b"\x00\xff\x00\xff / HTTP/1.1\r\n\r\n",
    "bad-version": b"GET /v1/stats HTTP/9.x\r\nHost: x\r\n\r\n",
    "over-long-line": b"GET /v1/blocks/" + b"k" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "over-long-header": b"GET /healthz HTTP/1.1\r\nX-Big: " + b"v" * 20_000 + b"\r\n\r\n",
    # The landing framing must neither wait for a CRLF that never comes nor read a length
    # aiohttp would refuse.
    "bare-lf-line-ends": b"GET /healthz HTTP/1.1\nHost: x\n\n",
    "space-before-colon": b"PUT /v1/blocks/k HTTP/1.1\r\nHost: x\r\nContent-Length : 1\r\n\r\nA",
}


@pytest.mark.parametrize("land_puts", [True, False], ids=["landing", "aiohttp-only"])
@pytest.mark.parametrize("head", MALFORMED_HEADS.values(), ids=MALFORMED_HEADS.keys())
async def test_heads_the_parser_refuses_get_the_json_error_shape(
    tmp_path: Path, land_puts: bool, head: bytes
) -> None:
    # aiohttp refuses these before any middleware runs; the contract's error shape still holds.
    async with running_gateway(tmp_path / "data", land_puts=land_puts) as gw:
        status, headers, body = await raw_exchange(gw.url, head)
        assert 400 <= status < 500
        assert headers["content-type"].startswith("application/json")
        answer = json.loads(body)
        assert set(answer) == {"error", "detail"}
        assert answer["error"] == error_code_for_status(status)
        assert answer["detail"] and "^" not in answer["detail"]
        async with aiohttp.ClientSession() as http, http.get(f"{gw.url}/healthz") as resp:
            assert resp.status == 200  # the server is still up


def _chunked(method: str, path: str, body: bytes, *, extra: str = "") -> tuple[bytes, bytes]:
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n{extra}"
    return head.encode(), body


def _encoded(method: str, path: str, body: bytes, encoding: str) -> tuple[bytes, bytes]:
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
    return f"{head}Content-Encoding: {encoding}\r\n".encode(), body


JSON = "Content-Type: application/json\r\n"
UNREADABLE_BODIES = {
    "lookup-bad-chunk-size": _chunked("POST", "/v1/lookup", b"zz\r\n{}\r\n0\r\n\r\n", extra=JSON),
    "lookup-negative-chunk": _chunked("POST", "/v1/lookup", b"-5\r\n{}\r\n0\r\n\r\n", extra=JSON),
    "lookup-hex-prefix": _chunked("POST", "/v1/lookup", b"0x2\r\n{}\r\n0\r\n\r\n", extra=JSON),
    "put-chunk-without-crlf": _chunked("PUT", "/v1/blocks/k", b"3\r\nabcXX0\r\n\r\n"),
    "batch-bad-chunk-size": _chunked("POST", "/v1/batch/get", b"zz\r\n{}\r\n0\r\n\r\n", extra=JSON),
    "lookup-bad-gzip": _encoded("POST", "/v1/lookup", b"not gzip at all", "gzip"),
    "put-bad-gzip": _encoded("PUT", "/v1/blocks/k", b"not gzip at all", "gzip"),
    "put-bad-deflate": _encoded("PUT", "/v1/blocks/k", b"not deflate at all", "deflate"),
}


async def exchange_in_two_parts(url: str, head: bytes, body: bytes) -> tuple[int, bytes]:
    """The head with ``Expect: 100-continue``, the body only once the server asked for it: the
    handler is then already reading when the bad body arrives."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(head + b"Expect: 100-continue\r\n\r\n")
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert interim.startswith(b"HTTP/1.1 100"), interim
        writer.write(body)
        await writer.drain()
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status = int(answer.split(b" ", 2)[1])
        length = next(
            int(line.split(b":", 1)[1])
            for line in answer.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        return status, await asyncio.wait_for(reader.readexactly(length), 10)
    finally:
        writer.close()


@pytest.mark.parametrize("delivery", ["one-write", "after-100-continue"])
@pytest.mark.parametrize("land_puts", [True, False], ids=["landing", "aiohttp-only"])
@pytest.mark.parametrize("request_parts", UNREADABLE_BODIES.values(), ids=UNREADABLE_BODIES.keys())
async def test_unreadable_bodies_are_400_and_never_hang(
    tmp_path: Path, land_puts: bool, delivery: str, request_parts: tuple[bytes, bytes]
) -> None:
    head, body = request_parts
    async with running_gateway(tmp_path / "data", land_puts=land_puts) as gw:
        if delivery == "one-write":
            status, _, answer_bytes = await raw_exchange(gw.url, head + b"\r\n" + body)
        else:
            status, answer_bytes = await exchange_in_two_parts(gw.url, head, body)
        assert status == 400, answer_bytes
        answer = json.loads(answer_bytes)
        assert answer["error"] == "bad_request" and answer["detail"]
        async with aiohttp.ClientSession() as http, http.get(gw.block_url("k")) as resp:
            assert resp.status == 404  # nothing was stored from a body that did not decode


@pytest.mark.parametrize("land_puts", [True, False], ids=["landing", "aiohttp-only"])
@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_content_encoded_put_stores_the_decoded_block(
    tmp_path: Path, land_puts: bool, encoding: str
) -> None:
    # HTTP content coding wraps the representation, not the block: both listeners store the
    # same bytes, the ones the client encoded.
    block = bytes(range(256)) * 64
    wrapped = gzip.compress(block) if encoding == "gzip" else zlib.compress(block)
    async with running_gateway(tmp_path / "data", land_puts=land_puts) as gw:
        headers = {"Content-Encoding": encoding, "Content-Type": "application/octet-stream"}
        async with aiohttp.ClientSession() as http:
            async with http.put(gw.block_url("k"), data=wrapped, headers=headers) as resp:
                assert resp.status == 201, await resp.text()
            async with http.get(gw.block_url("k")) as resp:
                assert resp.status == 200
                assert await resp.read() == block


@pytest.mark.parametrize("land_puts", [True, False], ids=["landing", "aiohttp-only"])
@pytest.mark.parametrize("coding", ["x-unknown", "gzip, deflate", "compress"])
async def test_a_content_coding_that_cannot_be_decoded_is_415(
    tmp_path: Path, land_puts: bool, coding: str
) -> None:
    # Stored as sent, these bytes would come back as a block the client never wrote.
    async with (
        running_gateway(tmp_path / "data", land_puts=land_puts) as gw,
        aiohttp.ClientSession() as http,
    ):
        headers = {"Content-Encoding": coding}
        async with http.put(gw.block_url("k"), data=b"abc", headers=headers) as resp:
            await assert_json_error(resp, 415, "unsupported_media_type")
        async with http.get(gw.block_url("k")) as resp:
            assert resp.status == 404
