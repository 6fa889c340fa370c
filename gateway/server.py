"""Run the gateway until SIGTERM/SIGINT, then shut down gracefully (spilling volatile tiers)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable

from aiohttp import web, web_protocol
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from gateway.app import HierarchyFactory, create_app
from gateway.config import GatewayConfig, format_size
from gateway.errors import Unavailable, error_code_for_status, json_error, parser_detail
from gateway.landing import BodyBuffers, BufferPool, LandingProtocol, protocol_factory
from gateway.state import STATE
from tiers.clock import SYSTEM_CLOCK, Clock

log = logging.getLogger("kvgate.server")

# aiohttp's private record of a refused message (3.9 through 3.14 at least). Should a release
# drop it, the gateway still runs; only the early 400 for a broken body falls back to aiohttp's
# own behaviour (tests/test_http_errors.py shows which).
_ErrInfo: type | None = getattr(web_protocol, "_ErrInfo", None)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _url(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}"
    return str(address)


def describe_tiers(app: web.Application) -> str:
    hierarchy = app[STATE].hierarchy
    if hierarchy is None:
        return "none"
    return ", ".join(
        f"{t.name} (device {t.device}, capacity {format_size(t.capacity_bytes)})"
        for t in hierarchy.stats()
    )


def _has_durable_tier(app: web.Application) -> bool:
    hierarchy = app[STATE].hierarchy
    return hierarchy is not None and any(not t.volatile for t in hierarchy.tiers)


# Lines this long reach the handlers, which answer a JSON 400 for an over-long key; longer
# ones are refused by aiohttp's parser (in JSON too, through JsonErrorHandler).
MAX_LINE_BYTES = 64 * 1024
MAX_FIELD_BYTES = 16 * 1024
# What aiohttp's protocol is built with: given to the runner (its web.Server) and to
# JsonErrorHandler alike, so the two cannot drift apart.
_HANDLER_ARGS: dict[str, object] = {
    "access_log": None,
    "max_line_size": MAX_LINE_BYTES,
    "max_field_size": MAX_FIELD_BYTES,
}


class JsonErrorHandler(RequestHandler):
    """aiohttp's HTTP protocol, except that what its parser refuses before any middleware runs
    (a malformed request line or header, a bad ``Content-Length``, an over-long line) is
    answered in the contract's JSON error form instead of ``text/plain``."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        if (self._close or self._force_close) and self._body_in_flight():
            self._finish_body(data)
        else:
            self._receive(data)

    def _receive(self, data: bytes) -> None:
        messages = getattr(self, "_messages", None)
        if messages is None or _ErrInfo is None:
            super().data_received(data)
            return
        queued = len(messages)
        super().data_received(data)
        # aiohttp queues a body its parser refuses (a bad chunk size, a broken chunk) as an
        # error answer for after the request that body belongs to, and leaves that request
        # reading a body that never ends: its handler would wait until the client gives up.
        # That body's reader gets the parser's error instead; the error middleware answers 400.
        if len(messages) <= queued:
            return
        refused = messages[-1][0]
        exc = getattr(refused, "exc", None)
        if not isinstance(refused, _ErrInfo) or not isinstance(exc, HttpProcessingError):
            return
        if len(messages) >= 2:
            body = messages[-2][1]  # its handler has not started yet
        elif (current := getattr(self, "_current_request", None)) is not None:
            body = current.content
        else:
            return
        if not body.is_eof():
            body.set_exception(exc)

    def _body_in_flight(self) -> bool:
        current = getattr(self, "_current_request", None)
        return current is not None and self.transport is not None and not current.content.is_eof()

    def _finish_body(self, data: bytes) -> None:
        # Shutting down, aiohttp stops reading at once (``close()``, then ``shutdown()``), yet
        # waits up to the shutdown timeout for the request in progress: one whose body was
        # still arriving could never finish, and its client got no answer at all. Its body is
        # read still; whatever comes after it (pipelined requests) is not served.
        close, force_close = self._close, self._force_close
        queued = len(self._messages)
        self._close = self._force_close = False
        try:
            self._receive(data)
        finally:
            self._close = self._close or close
            self._force_close = self._force_close or force_close
        while len(self._messages) > queued:
            self._messages.pop()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's own answer still logs the error and refuses once a response is under way.
        plain = super().handle_error(request, status, exc, message)
        detail = plain.reason if status >= 500 or not message else parser_detail(message)
        answer = json_error(status, error_code_for_status(status), detail)
        answer.force_close()
        return answer


def make_runner(app: web.Application, config: GatewayConfig) -> web.AppRunner:
    return web.AppRunner(
        app,
        handle_signals=False,
        shutdown_timeout=config.shutdown_timeout_s,
        **_HANDLER_ARGS,  # type: ignore[arg-type]
    )


async def listen(
    runner: web.AppRunner,
    config: GatewayConfig,
    *,
    host: str | None = None,
    port: int | None = None,
) -> asyncio.Server:
    """Accept connections for ``runner`` (set up already) on ``host:port`` (the config's unless
    given). With ``land_puts`` each connection's protocol is a :class:`~gateway.landing.
    LandingProtocol` in front of aiohttp's; close the server before ``runner.cleanup()``."""
    server = runner.server
    if server is None:
        raise RuntimeError("listen() needs a runner that has been set up")
    loop = asyncio.get_running_loop()
    web_server = server

    def http_protocol() -> RequestHandler:
        return JsonErrorHandler(web_server, loop=loop, **_HANDLER_ARGS)  # type: ignore[arg-type]

    factory: Callable[[], asyncio.BaseProtocol] = http_protocol
    if config.land_puts:
        hierarchy = runner.app[STATE].hierarchy
        buffers = BodyBuffers(BufferPool(), None if hierarchy is None else hierarchy.reserve)
        factory = protocol_factory(http_protocol, buffers=buffers, max_body=config.max_block_bytes)
    return await loop.create_server(
        factory,
        config.host if host is None else host,
        config.port if port is None else port,
        backlog=128,
        reuse_address=True,
    )


def abort_landed_bodies(protocols: list[LandingProtocol]) -> None:
    """At the drain's deadline, a PUT whose body is still landing gets a 503.

    aiohttp ends a request it stops waiting for by failing its body stream; a landed body is
    not in that stream, so its handler would wait out a second timeout and the connection be
    cut without an answer.
    """
    for protocol in protocols:
        if protocol.abort_body(Unavailable("the gateway shut down before the body was complete")):
            log.warning("a PUT body was still arriving at the shutdown deadline: answered 503")


def urls_of(server: asyncio.Server) -> list[str]:
    return [_url(sock.getsockname()) for sock in server.sockets]


async def serve(
    config: GatewayConfig,
    *,
    clock: Clock = SYSTEM_CLOCK,
    hierarchy_factory: HierarchyFactory | None = None,
    on_ready: Callable[[list[str]], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until ``stop`` is set or SIGTERM/SIGINT arrives; cleanup always runs."""
    app = create_app(config, clock=clock, hierarchy_factory=hierarchy_factory)
    runner = make_runner(app, config)

    async def announce_drain(_app: web.Application) -> None:
        # on_shutdown runs once every connection has stopped taking new requests.
        connections = [] if runner.server is None else runner.server.connections
        log.info(
            "draining %d open connection(s): up to %s s for the requests in flight",
            len(connections),
            f"{config.shutdown_timeout_s:g}",
        )
        landings = [
            protocol
            for conn in connections
            if conn.transport is not None
            and isinstance(protocol := conn.transport.get_protocol(), LandingProtocol)
        ]
        if landings:
            loop.call_later(config.shutdown_timeout_s, abort_landed_bodies, landings)

    app.on_shutdown.append(announce_drain)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - not on the main thread
            pass
    try:
        await runner.setup()  # builds and opens the hierarchy (cleanup_ctx)
        listener: asyncio.Server | None = None
        try:
            listener = await listen(runner, config)
            urls = urls_of(listener)
            log.info("kvgate serving on %s -- tiers: %s", " ".join(urls), describe_tiers(app))
            durable = _has_durable_tier(app)
            if not durable:
                log.info("no disk tier (disk_bytes = 0): blocks do not survive a restart")
            if on_ready is not None:
                on_ready(urls)
            await stop.wait()
            log.info(
                "shutting down: finishing requests%s",
                ", spilling volatile tiers to disk" if durable else "",
            )
        finally:
            if listener is not None:
                listener.close()  # no new connections; the runner finishes the open ones
            await runner.cleanup()
        log.info("stopped cleanly")
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
