"""loadtest.put_floor, the PUT floor instrument: it must answer every request of a keep-alive
connection correctly, or the floor it measures is not a floor of HTTP."""

from __future__ import annotations

import asyncio
import os

import aiohttp

from loadtest.put_floor import _FloorProtocol


async def test_floor_server_takes_bodies_of_any_split_on_one_connection() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_FloorProtocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    try:
        connector = aiohttp.TCPConnector(limit=1)  # one connection: keep-alive is exercised
        async with aiohttp.ClientSession(connector=connector) as http:
            for size in (3 << 20, 10, 0, 1 << 20):
                async with http.put(f"{url}/v1/blocks/k{size}", data=os.urandom(size)) as resp:
                    assert resp.status == 201
            async with http.get(f"{url}/healthz") as resp:
                assert resp.status == 200 and await resp.text() == "ok"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # Two pipelined requests in one write: the first body must not swallow the second.
        writer.write(
            b"PUT /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"
            b"PUT /b HTTP/1.1\r\nContent-Length: 2\r\n\r\nde"
        )
        answers = await reader.readexactly(
            2 * len(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        )
        assert answers.count(b"201 Created") == 2
        writer.write(b"garbage\r\n\r\n")
        assert b"400" in await reader.read(1024)
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_get_floor_answers_each_path_with_its_own_fixed_body() -> None:
    bodies = [memoryview(os.urandom(70_000)) for _ in range(4)]
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _FloorProtocol(bodies), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector) as http:
            seen: dict[str, bytes] = {}
            for key in [f"k{i}" for i in range(16)] * 2:
                async with http.get(f"{url}/v1/blocks/{key}") as resp:
                    assert resp.status == 200
                    data = await resp.read()
                assert data in {bytes(b) for b in bodies}
                assert seen.setdefault(key, data) == data  # the same path, the same body
            assert len(set(seen.values())) > 1  # the paths spread over the buffers
            async with http.put(f"{url}/v1/blocks/p", data=b"x" * 10) as resp:
                assert resp.status == 201  # PUTs are still taken in between
    finally:
        server.close()
        await server.wait_closed()
