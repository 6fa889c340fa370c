"""PUT bodies received straight into pooled buffers (gateway.landing), in front of aiohttp.

Every HTTP test of the gateway runs through the same listener (tests/conftest.py); these tests
pin down the framing itself: what is landed, what is passed through untouched, and that a
connection carrying a mix of both keeps its requests apart.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from gateway import handlers
from gateway import server as gateway_server
from gateway.landing import LANDING_HEADER, BodyBuffers, BufferPool, Landing, LandingProtocol
from tests.conftest import RunningGateway, running_gateway
from tiers.block import digest


def body(tag: str, size: int) -> bytes:
    seed = tag.encode() * (size // max(len(tag), 1) + 1)
    return bytes((b + i) % 251 for i, b in enumerate(seed[:size]))


async def exchange(url: str, raw: bytes, *, responses: int, chunk: int = 0) -> list[bytes]:
    """Write ``raw`` to the gateway (in ``chunk``-byte writes if set) and read ``responses``
    HTTP responses back, each as head + body bytes."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        if chunk:
            for i in range(0, len(raw), chunk):
                writer.write(raw[i : i + chunk])
                await writer.drain()
        else:
            writer.write(raw)
        out = []
        for _ in range(responses):
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            chunked = False
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
                if name.lower() == b"transfer-encoding":
                    chunked = True
            assert not chunked, head
            out.append(head + await reader.readexactly(length))
        return out
    finally:
        writer.close()


def put_request(key: str, data: bytes, *extra: str) -> bytes:
    lines = [f"PUT /v1/blocks/{key} HTTP/1.1", "Host: x", f"Content-Length: {len(data)}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


def get_request(key: str) -> bytes:
    return f"GET /v1/blocks/{key} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


def status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


async def read_back(gateway: RunningGateway, key: str) -> bytes | None:
    async with aiohttp.ClientSession() as http, http.get(gateway.block_url(key)) as resp:
        return await resp.read() if resp.status == 200 else None


@pytest.fixture
def landed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the bodies put_block took from a landing."""
    sizes: list[int] = []
    real = handlers.take_landing

    def spy(request: web.BaseRequest) -> Landing | None:
        landing = real(request)
        if landing is not None:
            sizes.append(landing.length)
        return landing

    monkeypatch.setattr(handlers, "take_landing", spy)
    return sizes


async def test_pipelined_puts_and_gets_on_one_connection_stay_apart(
    gateway: RunningGateway, landed: list[int]
) -> None:
    a, b = body("a", 300_000), body("b", 70_001)
    raw = put_request("a", a) + get_request("a") + put_request("b", b) + get_request("b")
    got = await exchange(gateway.url, raw, responses=4)
    assert [status(r) for r in got] == [201, 200, 201, 200]
    assert landed == [300_000, 70_001]
    assert got[1].endswith(a) and got[3].endswith(b)
    assert await read_back(gateway, "b") == b


async def test_a_head_and_body_trickling_in_byte_by_byte_lands_whole(
    gateway: RunningGateway,
) -> None:
    data = body("slow", 5_000)
    got = await exchange(gateway.url, put_request("slow", data), responses=1, chunk=1)
    assert status(got[0]) == 201
    assert f'"{digest(data).hex()}"'.encode() in got[0]
    assert await read_back(gateway, "slow") == data


@pytest.mark.parametrize(
    "extra",
    [
        ("Expect: 100-continue",),
        (f"{LANDING_HEADER}: 00ff",),  # a client's own: ignored, its body read the usual way
    ],
)
async def test_heads_not_landed_still_store_their_body(
    gateway: RunningGateway, extra: tuple[str, ...], landed: list[int]
) -> None:
    data = body("other", 40_000)
    raw = put_request("other", data, *extra)
    count = 2 if extra[0].startswith("Expect") else 1  # 100 Continue, then 201
    got = await exchange(gateway.url, raw, responses=count)
    assert status(got[-1]) == 201
    assert landed == []
    assert await read_back(gateway, "other") == data


async def test_chunked_put_passes_through_and_the_connection_goes_on(
    gateway: RunningGateway, landed: list[int]
) -> None:
    data = body("chunked", 9_000)
    head = b"PUT /v1/blocks/ch HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunks = b"".join(
        f"{len(data[i : i + 4000]):x}\r\n".encode() + data[i : i + 4000] + b"\r\n"
        for i in range(0, len(data), 4000)
    )
    # Past a chunked body the framing gives the connection to aiohttp: nothing more lands.
    raw = head + chunks + b"0\r\n\r\n" + get_request("ch") + put_request("after", data)
    got = await exchange(gateway.url, raw, responses=3)
    assert [status(r) for r in got] == [201, 200, 201]
    assert got[1].endswith(data)
    assert landed == []


async def test_an_early_answer_skips_the_body_and_the_next_request_is_served(
    gateway: RunningGateway,
) -> None:
    # "bad key!" is refused (400) before its body is used; the body still has to be read off
    # the connection for the next request's head to be found.
    junk = body("junk", 200_000)
    good = body("good", 10_000)
    raw = put_request("bad%20key!", junk) + put_request("good", good) + get_request("good")
    got = await exchange(gateway.url, raw, responses=3)
    assert [status(r) for r in got] == [400, 201, 200]
    assert json.loads(got[0].split(b"\r\n\r\n", 1)[1])["error"] == "bad_key"
    assert got[2].endswith(good)


async def test_a_body_over_the_limit_is_refused_as_before(gateway: RunningGateway) -> None:
    limit = gateway.config.max_block_bytes
    head = f"PUT /v1/blocks/big HTTP/1.1\r\nHost: x\r\nContent-Length: {limit + 1}\r\n\r\n"
    got = await exchange(gateway.url, head.encode() + b"x" * 1024, responses=1)
    assert status(got[0]) == 413


async def test_a_connection_dropped_mid_body_stores_nothing(gateway: RunningGateway) -> None:
    data = body("cut", 500_000)
    host, port = gateway.url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(put_request("cut", data)[:200_000])
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    # The next request on a new connection is served, and nothing of the cut write is visible.
    got = await exchange(gateway.url, get_request("cut"), responses=1)
    assert status(got[0]) == 404
    assert not gateway.hierarchy.contains("default/cut")


async def test_without_landing_every_byte_goes_through_aiohttp(
    tmp_path: Path, landed: list[int]
) -> None:
    async with running_gateway(tmp_path / "data", land_puts=False) as gw:
        data = body("plain", 100_000)
        raw = put_request("plain", data) + get_request("plain")
        got = await exchange(gw.url, raw, responses=2)
        assert [status(r) for r in got] == [201, 200]
        assert got[1].endswith(data)
        assert landed == []


async def test_landing_buffers_are_reused_only_once_released_and_complete() -> None:
    loop = asyncio.get_running_loop()
    pool = BufferPool(busy_bytes=1 << 20, idle_bytes=1 << 20)
    buffers = BodyBuffers(pool)
    first = buffers.landing(1000, loop)
    assert first is not None and first.reservation is None
    first.release()  # the handler answered early: the body is still arriving
    assert pool.idle_bytes == 0 and pool.busy_bytes == 1000
    first.remaining_view()[:1000] = b"x" * 1000
    assert first.received(1000)
    assert pool.idle_bytes == 1000 and pool.busy_bytes == 0  # complete and released: reusable
    second = buffers.landing(1000, loop)
    assert second is not None and pool.reused == 1
    second.abort(ConnectionResetError("gone"))
    with pytest.raises(ConnectionResetError):
        await second.read()
    second.release()
    assert pool.idle_bytes == 0 and pool.busy_bytes == 0  # an aborted buffer is dropped


@pytest.mark.parametrize("pieces", [[4096], [1, 4095], [1000, 1, 3000, 95], [64] * 64])
async def test_a_body_is_hashed_as_it_arrives_to_the_digest_of_the_whole(
    pieces: list[int],
) -> None:
    data = body("hash", 4096)
    landing = BodyBuffers(BufferPool()).landing(len(data), asyncio.get_running_loop())
    assert landing is not None
    for n in pieces:
        with pytest.raises(RuntimeError):
            landing.digest()  # not all in yet
        start = landing.filled
        landing.remaining_view()[:n] = data[start : start + n]
        landing.received(n)
    assert bytes(await landing.read()) == data
    assert landing.digest() == digest(data)
    landing.release()


def test_the_pool_refuses_past_its_busy_cap() -> None:
    pool = BufferPool(busy_bytes=3000, idle_bytes=0)
    first = pool.take(2000)
    assert first is not None
    assert pool.take(2000) is None  # announced bodies cannot reserve unbounded memory
    pool.give(first)
    assert pool.take(2000) is not None


@pytest.mark.parametrize(
    ("landing_bytes", "pool_bytes"),
    [(0, 150_000), (128 * 1024, 0)],
    ids=["pooled-buffers", "arena-landing-pages"],
)
async def test_heads_past_the_landing_budget_take_the_ordinary_path(
    tmp_path: Path,
    landed: list[int],
    monkeypatch: pytest.MonkeyPatch,
    landing_bytes: int,
    pool_bytes: int,
) -> None:
    # Connections that announce bodies and send them slowly hold their landing buffers (or
    # the arena's landing pages); past that budget the next PUT is read through aiohttp
    # (memory as its bytes arrive).
    monkeypatch.setattr(gateway_server, "BufferPool", lambda: BufferPool(busy_bytes=pool_bytes))
    async with running_gateway(tmp_path / "data", landing_bytes=landing_bytes) as gw:
        held = body("held", 100_000)
        host, port = gw.url.removeprefix("http://").split(":")
        _, stalled = await asyncio.open_connection(host, int(port))
        stalled.write(put_request("held", held)[:1000])  # head + a little: 100 KB reserved
        await stalled.drain()
        data = body("next", 90_000)
        got = await exchange(gw.url, put_request("next", data), responses=1)
        assert status(got[0]) == 201
        assert 90_000 not in landed  # it did not fit the cap: it went through aiohttp
        assert await read_back(gw, "next") == data
        stalled.close()


async def test_an_overlong_head_is_handed_to_aiohttp_as_it_is(
    gateway: RunningGateway, landed: list[int]
) -> None:
    # Past 128 KiB without a blank line the framing gives up: aiohttp reads the head (it has no
    # limit on the whole head, only per line) and the body, the way it did without landing.
    fields = "".join(f"X-Pad-{i}: {'p' * 8000}\r\n" for i in range(20))
    raw = f"PUT /v1/blocks/pad HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n{fields}\r\nabc"
    got = await exchange(gateway.url, raw.encode() + get_request("pad"), responses=2)
    assert [status(r) for r in got] == [201, 200]
    assert got[1].endswith(b"abc")
    assert landed == []


async def test_a_body_given_up_on_raises_for_its_handler_and_its_buffer_is_not_written_again() -> (
    None
):
    fed: list[bytes] = []

    class Inner(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            fed.append(data)

    pool = BufferPool(busy_bytes=1 << 20, idle_bytes=1 << 20)
    protocol = LandingProtocol(Inner(), buffers=BodyBuffers(pool), max_body=1 << 20)

    def arrive(data: bytes) -> None:
        while data:
            view = protocol.get_buffer(len(data))
            n = min(len(view), len(data))
            view[:n] = data[:n]
            protocol.buffer_updated(n)
            data = data[n:]

    assert not protocol.abort_body(RuntimeError("nothing is landing"))
    arrive(put_request("k", body("k", 4096))[:-1000])
    head = fed[-1]
    landing_id = head.split(LANDING_HEADER.encode() + b": ")[1].split(b"\r\n")[0].decode()
    landing = protocol.take(landing_id)
    assert landing is not None and landing.filled == 3096
    landed = landing.view
    assert protocol.abort_body(ConnectionAbortedError("deadline"))
    with pytest.raises(ConnectionAbortedError):
        await landing.read()
    landing.release()
    assert pool.busy_bytes == 0 and pool.idle_bytes == 0  # dropped, never reused
    before = bytes(landed)
    arrive(b"z" * 5000)  # the rest of that body, and more: dropped, not landed, not fed
    assert bytes(landed) == before and len(fed) == 1
