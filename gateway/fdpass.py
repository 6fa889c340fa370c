"""Handing a private shared-memory segment to its one client as a file descriptor.

A segment with a name in ``/dev/shm`` can be opened by every process of the uid that owns it;
a descriptor passed over a Unix socket (``SCM_RIGHTS``) reaches only the process that asked.
The gateway gives an authenticated ``/v1/shm/attach`` a *ticket* (128 random bits, single use,
short-lived) and the path of this module's socket; the client connects, writes the ticket and a
newline, and reads one JSON line (``{"size": N}`` or ``{"error": "..."}``) carrying the
descriptor as ancillary data. The socket itself is world-connectable on purpose -- clients of
other uids are the point -- so the ticket is the whole credential: it is only ever sent in the
answer to an attach that passed the tenant's bearer token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tiers.clock import Clock
from tiers.shmseg import PREFIX

log = logging.getLogger("kvgate.shm")

TICKET_TTL_S = 30.0
"""How long an attach's ticket can be redeemed: the client does it right after the attach."""
MAX_CONNECTIONS = 32
"""Handoff connections served at once; more are closed at accept (each is one short read)."""
READ_TIMEOUT_S = 2.0
_MAX_LINE = 128


class HandoffError(Exception):
    """The descriptor could not be received (the client then falls back to HTTP)."""


@dataclass(slots=True)
class _Ticket:
    fd_of: Callable[[], int]
    """The descriptor to hand over, looked up at redemption (the session may be gone: -1)."""
    deadline: float


class FdHandoff:
    """The gateway's end: tickets for descriptors, and the Unix socket that redeems them."""

    def __init__(self, directory: Path, *, clock: Clock) -> None:
        self._clock = clock
        self._tickets: dict[str, _Ticket] = {}
        self.path = directory / f"{PREFIX}-{os.getpid()}-{secrets.token_hex(8)}-handoff"
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._conns: set[asyncio.Task[None]] = set()

    def issue(self, fd_of: Callable[[], int]) -> str:
        """A single-use ticket for the descriptor ``fd_of()`` returns when it is redeemed."""
        self._expire()
        ticket = secrets.token_urlsafe(16)
        self._tickets[ticket] = _Ticket(fd_of, self._clock.monotonic() + TICKET_TTL_S)
        return ticket

    def redeem(self, ticket: str) -> int | None:
        """The descriptor behind a live ticket, once; ``None`` for any other string."""
        self._expire()
        entry = self._tickets.pop(ticket, None)
        if entry is None:
            return None
        fd = entry.fd_of()
        return fd if fd >= 0 else None

    @property
    def pending(self) -> int:
        return len(self._tickets)

    def _expire(self) -> None:
        now = self._clock.monotonic()
        for ticket in [t for t, e in self._tickets.items() if now >= e.deadline]:
            del self._tickets[ticket]

    # -- the socket ----------------------------------------------------------------------------

    async def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.path))
            # Clients of other uids must connect (that is what the handoff is for); the
            # ticket, not the file mode, is the credential.
            os.chmod(self.path, 0o666)
            sock.listen(64)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                self.path.unlink()
            raise
        self._sock = sock
        self._task = asyncio.get_running_loop().create_task(self._serve(sock))

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for conn in list(self._conns):
            conn.cancel()
        for conn in list(self._conns):
            with contextlib.suppress(asyncio.CancelledError):
                await conn
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()
        self._tickets.clear()

    async def _serve(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(sock)
            if len(self._conns) >= MAX_CONNECTIONS:
                conn.close()
                continue
            task = loop.create_task(self._one(conn))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    async def _one(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        with conn:
            conn.setblocking(False)
            try:
                line = await asyncio.wait_for(_read_line(loop, conn), READ_TIMEOUT_S)
            except (TimeoutError, OSError, ValueError):
                return
            fd = self.redeem(line)
            if fd is None:
                _reply(conn, {"error": "unknown or expired ticket (attach again)"}, None)
                return
            _reply(conn, {"size": os.fstat(fd).st_size}, fd)
            log.debug("handed a shared-memory segment to pid %d uid %d", *_peer(conn))


async def _read_line(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> str:
    data = b""
    while b"\n" not in data:
        chunk = await loop.sock_recv(conn, _MAX_LINE)
        if not chunk:
            raise ValueError("closed before a ticket")
        data += chunk
        if len(data) > _MAX_LINE:
            raise ValueError("ticket line too long")
    return data.split(b"\n", 1)[0].decode("ascii", "replace")


def _reply(conn: socket.socket, body: dict[str, object], fd: int | None) -> None:
    msg = json.dumps(body).encode() + b"\n"
    # A few dozen bytes into an empty socket buffer: a non-blocking send does not come short.
    with contextlib.suppress(OSError):
        if fd is None:
            conn.send(msg)
        else:
            socket.send_fds(conn, [msg], [fd])


def _peer(conn: socket.socket) -> tuple[int, int]:
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _ = struct.unpack("3i", raw)
    except OSError:
        return -1, -1
    return pid, uid


def receive_fd(path: str, ticket: str, *, timeout_s: float = 5.0) -> int:
    """Client side (blocking): redeem ``ticket`` at the socket ``path``; the descriptor, which
    the caller then owns. Raises :class:`HandoffError`."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(path)
            sock.sendall(ticket.encode("ascii") + b"\n")
            msg, fds, _, _ = socket.recv_fds(sock, 4096, 1)
    except (OSError, UnicodeEncodeError) as exc:
        raise HandoffError(f"no descriptor from {path}: {exc}") from exc
    try:
        answer = json.loads(msg.split(b"\n", 1)[0] or b"{}")
    except ValueError:
        answer = {}
    if not fds:
        reason = answer.get("error") if isinstance(answer, dict) else None
        raise HandoffError(f"the gateway refused the ticket: {reason or 'no descriptor'}")
    for extra in fds[1:]:
        os.close(extra)
    return fds[0]
