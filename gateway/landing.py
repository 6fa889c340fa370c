"""Block PUT bodies received straight into a buffer, past aiohttp's body path.

aiohttp receives a body as the transport's ``bytes`` chunks, copies each one again in its C
parser, queues them in a ``StreamReader`` and joins them on ``read()``: about 570 us of CPU per
MiB before a handler runs (docs/perf.md, "The floor for PUT"). :class:`LandingProtocol` sits in
front of aiohttp's own protocol on the same socket. It frames each request itself (head, then
``Content-Length`` bytes) and hands aiohttp every byte unchanged, except for the body of a
plain ``PUT /v1/blocks/...``: that one the kernel writes with ``recv_into`` straight into a
pooled buffer (a :class:`Landing`), and aiohttp sees the same head with ``Content-Length: 0``
plus an :data:`LANDING_HEADER` naming the landing. Routing, middleware, auth, telemetry and
errors stay aiohttp's; ``put_block`` takes the body from the landing instead of the stream.

Where the hierarchy can reserve room in a tier's own storage (:class:`tiers.base.Reservation`,
the landing pages of a CPU arena), the body is received there, and the tier adopts those pages
as the stored block: the kernel's copy out of the socket is then the only copy of the bytes.
Otherwise it goes into a pooled buffer and the tier copies it in.

Anything unusual goes through untouched: a chunked body, ``Expect``, ``Upgrade``, a
``Content-Encoding``, HTTP/1.0, a head aiohttp would refuse (bare LF line ends included), a
body over the block limit (aiohttp answers 413 as before). Once a connection carries something
this framing cannot follow (chunked, upgrade, an unparseable head), the rest of it is passed
through as it comes.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import OrderedDict
from collections.abc import Callable

from aiohttp import web

from tiers.base import Reservation
from tiers.block import hasher

Reserve = Callable[[int], Reservation | None]

LANDING_HEADER = "X-KVGate-Landing"
_LANDING_HEADER_LOWER = LANDING_HEADER.lower().encode()
_PREFIX = b"/v1/blocks/"
# aiohttp's own head limits (gateway.server) are 64 KiB for the line and 16 KiB per field; a
# head this framing cannot find the end of within this many bytes is passed through as is.
MAX_HEAD_BYTES = 128 * 1024
READ_CHUNK = 256 * 1024  # what asyncio's selector transport reads at a time anyway
# Between requests the socket is read in small pieces: a big read would pull the start of the
# next body in with its head, and every byte of it would then be copied again into the landing.
HEAD_CHUNK = 8 * 1024
# Landings of one connection that no handler has taken yet. aiohttp answers a connection's
# requests in order, so past a few the client is pipelining: those go the ordinary way.
MAX_PENDING = 4


class BufferPool:
    """Body buffers: at most ``busy_bytes`` handed out at once, reused by exact size, at most
    ``idle_bytes`` of them kept idle.

    A landing buffer is allocated when the head arrives, at the size the head announces, before
    a byte of the body is in. The busy cap keeps that from being a lever: heads announcing big
    bodies on many connections get the ordinary path (memory as bytes arrive) once the cap is
    reached. Receiving into a fresh ``bytearray`` zero-fills it first, and blocks come in a few
    sizes, so the previous block's buffer usually fits the next one.
    """

    def __init__(
        self, *, busy_bytes: int = 512 * 1024 * 1024, idle_bytes: int = 64 * 1024 * 1024
    ) -> None:
        self._busy_limit = busy_bytes
        self._idle_limit = idle_bytes
        self._busy_bytes = 0
        self._idle_bytes = 0
        self._free: dict[int, list[bytearray]] = {}
        self.reused = 0

    def take(self, size: int) -> bytearray | None:
        """A buffer of ``size`` bytes, or ``None`` when that would pass the busy cap."""
        if self._busy_bytes + size > self._busy_limit:
            return None
        self._busy_bytes += size
        free = self._free.get(size)
        if free:
            self.reused += 1
            self._idle_bytes -= size
            return free.pop()
        return bytearray(size)

    def give(self, buffer: bytearray, *, reuse: bool = True) -> None:
        """``buffer`` is no longer used; ``reuse=False`` drops it instead of keeping it."""
        size = len(buffer)
        self._busy_bytes -= size
        if not reuse or self._idle_bytes + size > self._idle_limit:
            return
        self._free.setdefault(size, []).append(buffer)
        self._idle_bytes += size

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes

    @property
    def busy_bytes(self) -> int:
        return self._busy_bytes


class BodyBuffers:
    """Where landed bodies go: a reservation in the tiers when ``reserve`` gives one, else a
    buffer from ``pool``."""

    def __init__(self, pool: BufferPool, reserve: Reserve | None = None) -> None:
        self.pool = pool
        self.reserve = reserve

    def landing(self, size: int, loop: asyncio.AbstractEventLoop) -> Landing | None:
        """A landing for a body of ``size`` bytes, ``None`` when there is no room for one."""
        if self.reserve is not None and (reservation := self.reserve(size)) is not None:

            def give_back(_complete: bool, reservation: Reservation = reservation) -> None:
                reservation.release()

            return Landing(reservation.view, give_back, loop, reservation=reservation)
        buffer = self.pool.take(size)
        if buffer is None:
            return None
        pool = self.pool

        def recycle(complete: bool, buffer: bytearray = buffer) -> None:
            pool.give(buffer, reuse=complete)

        return Landing(memoryview(buffer), recycle, loop)


class Landing:
    """One PUT body being received into a buffer or a tier's reservation.

    The handler awaits :meth:`read` and calls :meth:`release` when it no longer needs the
    bytes. The buffer goes back (to the pool, or the reservation to its tier, a no-op once the
    tier adopted it) only once both have happened: released *and* fully received (or the
    connection gone), so a handler that answers early (401, 409) never hands out a buffer the
    socket is still writing into.
    """

    __slots__ = (
        "_done",
        "_give_back",
        "_hasher",
        "_released",
        "_returned",
        "filled",
        "length",
        "reservation",
        "view",
    )

    def __init__(
        self,
        view: memoryview,
        give_back: Callable[[bool], None],
        loop: asyncio.AbstractEventLoop,
        *,
        reservation: Reservation | None = None,
    ) -> None:
        self._give_back = give_back
        self._returned = False
        self.view = view
        self.reservation = reservation
        """Set when the body lands in the tiers' storage: hand it to the put."""
        self.length = len(view)
        self.filled = 0
        self._hasher = hasher()
        self._done: asyncio.Future[None] = loop.create_future()
        self._released = False

    def remaining_view(self) -> memoryview:
        return self.view[self.filled :]

    def received(self, n: int) -> bool:
        """``n`` more bytes are in; ``True`` once the whole body is."""
        # Hashed now, while the kernel's copy has left them in the cache: hashing the block
        # later reads it back from memory (about 60 us more CPU per MiB, docs/perf.md).
        self._hasher.update(self.view[self.filled : self.filled + n])
        self.filled += n
        if self.filled < self.length:
            return False
        self._done.set_result(None)
        self._recycle()
        return True

    def abort(self, exc: BaseException) -> None:
        if not self._done.done():
            self._done.set_exception(exc)
            self._done.exception()  # a handler may never ask: do not log it as lost
            self._recycle()

    async def read(self) -> memoryview:
        """The whole body (valid until :meth:`release`); raises if the connection dropped."""
        await asyncio.shield(self._done)
        return self.view

    def digest(self) -> bytes:
        """:func:`tiers.block.digest` of the body, once it is all in."""
        if self.filled < self.length:
            raise RuntimeError(f"landing has {self.filled} of {self.length} bytes")
        return self._hasher.digest()

    def release(self) -> None:
        self._released = True
        self._recycle()

    def _recycle(self) -> None:
        if self._released and self._done.done() and not self._returned:
            self._returned = True
            self._give_back(self._done.exception() is None)


class _Mode:
    HEAD = 0
    PASS = 1  # a known number of body bytes for aiohttp
    LAND = 2  # a body into the current landing
    THROUGH = 3  # everything to aiohttp from here on
    DISCARD = 4  # a body given up on: its bytes are dropped until the connection closes


class LandingProtocol(asyncio.BufferedProtocol):
    """The transport's protocol: frames requests, lands block bodies, feeds aiohttp the rest."""

    def __init__(self, inner: asyncio.Protocol, *, buffers: BodyBuffers, max_body: int) -> None:
        self._inner = inner
        self._buffers = buffers
        self._max_body = max_body
        self._scratch_view = memoryview(bytearray(READ_CHUNK))
        self._head_view = memoryview(bytearray(HEAD_CHUNK))
        self._reading = self._scratch_view
        self._head = bytearray()
        self._mode = _Mode.HEAD
        self._pass_left = 0
        self._landing: Landing | None = None
        self._pending: OrderedDict[str, Landing] = OrderedDict()
        self._loop = asyncio.get_running_loop()

    # -- what aiohttp's handler calls -------------------------------------------------------

    def take(self, landing_id: str) -> Landing | None:
        if landing_id not in self._pending:
            return None
        # Requests are answered in order, so landings that came before this one and were not
        # taken never will be (their handler answered without the body); they are complete.
        while True:
            key, landing = self._pending.popitem(last=False)
            if key == landing_id:
                return landing
            landing.release()

    def abort_body(self, exc: BaseException) -> bool:
        """Give up on the body being landed (the drain's deadline has come): its handler's
        read raises ``exc``, which it can still answer. What else arrives is dropped; the
        buffer is never written again, so it can go back at once."""
        landing = self._landing
        if self._mode != _Mode.LAND or landing is None:
            return False
        self._landing = None
        self._mode = _Mode.DISCARD
        landing.abort(exc)
        return True

    # -- asyncio.BufferedProtocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        error = ConnectionResetError("the connection closed before the body was complete")
        for landing in self._pending.values():
            landing.abort(error)
            landing.release()
        self._pending.clear()
        if self._landing is not None:
            self._landing.abort(error)
            self._landing = None
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._mode == _Mode.LAND and self._landing is not None:
            return self._landing.remaining_view()
        self._reading = self._head_view if self._mode == _Mode.HEAD else self._scratch_view
        return self._reading

    def buffer_updated(self, nbytes: int) -> None:
        if self._mode == _Mode.LAND and self._landing is not None:
            self._landed(self._landing, nbytes)
            return
        self._consume(self._reading[:nbytes])

    def _landed(self, landing: Landing, nbytes: int) -> None:
        if landing.received(nbytes):
            self._landing = None
            self._mode = _Mode.HEAD

    # -- framing ----------------------------------------------------------------------------

    def _feed(self, data: bytes | bytearray | memoryview) -> None:
        self._inner.data_received(bytes(data))

    def _consume(self, data: memoryview) -> None:
        while data:
            mode = self._mode
            if mode == _Mode.THROUGH:
                self._feed(data)
                return
            if mode == _Mode.DISCARD:
                return
            if mode == _Mode.PASS:
                take = min(len(data), self._pass_left)
                self._feed(data[:take])
                data = data[take:]
                self._pass_left -= take
                if self._pass_left == 0:
                    self._mode = _Mode.HEAD
                continue
            if mode == _Mode.LAND:
                landing = self._landing
                assert landing is not None
                take = min(len(data), landing.length - landing.filled)
                landing.remaining_view()[:take] = data[:take]
                data = data[take:]
                self._landed(landing, take)
                continue
            # HEAD: collect until the blank line
            start = max(0, len(self._head) - 3)
            self._head += data
            data = data[len(data) :]
            end = self._head.find(b"\r\n\r\n", start)
            # A line ended by a bare LF: this framing would wait for a CRLF blank line that may
            # never come, so aiohttp's parser decides what such a head is.
            scanned = len(self._head) if end < 0 else end + 4
            bare_lf = self._head.count(b"\n", 0, scanned) != self._head.count(b"\r\n", 0, scanned)
            if bare_lf or (end < 0 and len(self._head) > MAX_HEAD_BYTES):
                pending, self._head = self._head, bytearray()
                self._through(pending)
                return
            if end < 0:
                return
            head = bytes(self._head[: end + 4])
            rest = bytes(self._head[end + 4 :])
            self._head.clear()
            self._on_head(head)
            data = memoryview(rest)

    def _through(self, pending: bytes | bytearray) -> None:
        """Hand aiohttp ``pending`` and every byte after it as they come."""
        self._mode = _Mode.THROUGH
        self._feed(pending)

    def _on_head(self, head: bytes) -> None:
        parsed = _parse_head(head)
        if parsed is None:
            # aiohttp decides what this is; whatever comes after, it reads on its own.
            self._through(head)
            return
        lines, length, content_line, plain = parsed
        method, target, version = lines[0].split(b" ")
        if (
            not plain
            or method != b"PUT"
            or version != b"HTTP/1.1"
            or not target.startswith(_PREFIX)
            or not 0 < length <= self._max_body
            or len(self._pending) >= MAX_PENDING
            or (landing := self._buffers.landing(length, self._loop)) is None
        ):
            self._feed(head)
            if length:
                self._mode = _Mode.PASS
                self._pass_left = length
            return
        landing_id = secrets.token_hex(12)
        lines[content_line] = b"Content-Length: 0"
        lines.append(f"{LANDING_HEADER}: {landing_id}".encode())
        self._pending[landing_id] = landing
        self._landing = landing
        self._mode = _Mode.LAND
        self._feed(b"\r\n".join(lines) + b"\r\n\r\n")


def _parse_head(head: bytes) -> tuple[list[bytes], int, int, bool] | None:
    """``(lines, content_length, index of its line or -1, plain)`` of a head whose body this
    framing can measure, ``None`` for one it cannot (chunked, upgrade, malformed). ``plain``:
    nothing in it (``Expect``, a client's own landing header) rules out landing the body."""
    lines = head[:-4].split(b"\r\n")
    if lines[0].count(b" ") != 2:
        return None
    length = 0
    content_line = -1
    plain = True
    for i in range(1, len(lines)):
        name, sep, value = lines[i].partition(b":")
        # No colon, whitespace in or around the name, a folded line: aiohttp refuses these (or
        # reads them its own way), and the framing must never measure a body differently.
        if not sep or not name or name != name.strip() or b" " in name or b"\t" in name:
            return None
        lname = name.lower()
        if lname == b"content-length":
            value = value.strip()
            if content_line >= 0 or not value.isdigit():
                return None
            length = int(value)
            content_line = i
        elif lname in (b"transfer-encoding", b"upgrade"):
            return None
        elif lname in (b"expect", _LANDING_HEADER_LOWER):
            plain = False
        elif lname == b"content-encoding" and value.strip().lower() != b"identity":
            plain = False  # aiohttp decodes it; the block is what the client encoded
    return lines, length, content_line, plain


def take_landing(request: web.BaseRequest) -> Landing | None:
    """The landed body of ``request``, if :class:`LandingProtocol` received it."""
    landing_id = request.headers.get(LANDING_HEADER)
    if landing_id is None:
        return None
    transport = request.transport
    protocol = transport.get_protocol() if transport is not None else None
    if not isinstance(protocol, LandingProtocol):
        return None
    return protocol.take(landing_id)


def protocol_factory(
    inner: Callable[[], asyncio.Protocol], *, buffers: BodyBuffers, max_body: int
) -> Callable[[], LandingProtocol]:
    def make() -> LandingProtocol:
        return LandingProtocol(inner(), buffers=buffers, max_body=max_body)

    return make
