"""The floor for PUT over HTTP from Python: how fast can any asyncio server take 1 MiB bodies?

A measuring instrument, not a product. It speaks just enough HTTP/1.1 for the ``put``
scenario: a request line, headers with Content-Length, keep-alive. It receives each body with
``recv_into`` straight into one per-connection buffer (``asyncio.BufferedProtocol``), so the only
copy is the kernel's. There is no parser copy, no join and no store, and the bytes are
discarded. Every other server in the comparison does at least this much work per request, and
aiohttp, redis-py, kvgate and the dict server all do more.

    python -m loadtest.put_floor --port 8097
    python -m loadtest.run put --target dict --url http://127.0.0.1:8097 --duration 4

``--target dict`` only picks the HTTP client the scenario uses; the server is this one. See
docs/perf.md ("The floor for PUT").

With ``--get-bytes N`` it is the floor for GET as well: every GET is answered with an N-byte
body, its headers and then the body (a memoryview) written to the transport, as kvgate writes a
pinned block. No lookup, no parser beyond the request line. The bodies are ``--get-keys``
distinct buffers, picked by the request path: one buffer sent again and again would stay in the
CPU caches, which no store serving a working set of 64 MiB enjoys.

    python -m loadtest.put_floor --port 8097 --get-bytes 1MiB
    python -m loadtest.run hot-get --target dict --url http://127.0.0.1:8097 --duration 4
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import zlib

from loadtest.sizes import parse_size

_HEAD_LIMIT = 64 * 1024
_BODY_LIMIT = 64 << 20
_CREATED = b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
_BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class _FloorProtocol(asyncio.BufferedProtocol):
    def __init__(self, get_bodies: list[memoryview] | None = None) -> None:
        self._get_head = (
            b""
            if not get_bodies
            else b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n\r\n" % len(get_bodies[0])
        )
        self._get_bodies = get_bodies
        self._transport: asyncio.Transport | None = None
        self._head = bytearray()
        self._scratch = bytearray(_HEAD_LIMIT)
        # Grown to the largest body seen, once per connection: a fixed 64 MiB per connection
        # would cost page faults on every new connection and measure the allocator instead.
        self._body = bytearray()
        self._body_view = memoryview(self._body)
        self._pos = 0  # the body in progress fills self._body[_pos:_end]
        self._end = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def get_buffer(self, sizehint: int) -> memoryview | bytearray:
        if self._pos < self._end:
            # Exactly the rest of this body: a pipelined next request is not read into it.
            return self._body_view[self._pos : self._end]
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        if self._pos < self._end:
            self._pos += nbytes
            if self._pos == self._end:
                self._answer(_CREATED)
            return
        self._head += self._scratch[:nbytes]
        self._parse()

    def _parse(self) -> None:
        while True:
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > _HEAD_LIMIT:
                    self._answer(_BAD, close=True)
                return
            head = bytes(self._head[:end])
            rest = self._head[end + 4 :]
            method, length = _request(head)
            if method is None or length is None or length > _BODY_LIMIT:
                self._answer(_BAD, close=True)
                return
            if method != b"PUT":
                self._head = rest
                if method == b"GET" and self._get_bodies:
                    self._answer(self._get_head)
                    path = head.split(b" ", 2)[1]
                    self._answer(self._get_bodies[zlib.crc32(path) % len(self._get_bodies)])
                else:
                    self._answer(_OK)
                continue
            if length > len(self._body):
                self._body_view.release()
                self._body = bytearray(length)
                self._body_view = memoryview(self._body)
            taken = min(length, len(rest))
            self._body_view[:taken] = rest[:taken]
            self._head = rest[taken:]
            if taken < length:
                self._pos, self._end = taken, length  # the rest lands via get_buffer
                return
            self._answer(_CREATED)

    def _answer(self, reply: bytes | memoryview, *, close: bool = False) -> None:
        transport = self._transport
        if transport is None:
            return
        transport.write(reply)
        if close:
            transport.close()


def _request(head: bytes) -> tuple[bytes | None, int | None]:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        return None, None
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            try:
                length = int(value)
            except ValueError:
                return None, None
    return parts[0], length


async def _serve(host: str, port: int, get_bytes: int, get_keys: int) -> None:
    loop = asyncio.get_running_loop()
    bodies = [memoryview(os.urandom(get_bytes)) for _ in range(get_keys)] if get_bytes else None
    server = await loop.create_server(lambda: _FloorProtocol(bodies), host, port)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.put_floor", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8097)
    parser.add_argument(
        "--get-bytes",
        type=parse_size,
        default=0,
        metavar="SIZE",
        help="answer every GET with a body of SIZE bytes (0: a 2-byte 'ok', the default)",
    )
    parser.add_argument(
        "--get-keys",
        type=int,
        default=64,
        metavar="N",
        help="distinct GET bodies, as many as the scenario's keys (64)",
    )
    args = parser.parse_args(argv)
    if args.get_keys < 1:
        parser.error("--get-keys must be at least 1")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.host, args.port, args.get_bytes, args.get_keys))


if __name__ == "__main__":
    main()
