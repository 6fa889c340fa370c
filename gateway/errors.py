"""The gateway's exception tree, and the one place other packages' errors become HTTP answers.

Server side: handlers raise :class:`GatewayError` subclasses; the error middleware turns every
one of them, every aiohttp ``HTTPException`` and every exception of ``tiers`` (and, from issue 3,
``coherence``) into the contract's JSON shape ``{"error": ..., "detail": ...}`` via
:func:`http_error_for`.

Client side: :class:`KVGateError` and its subclasses carry the status and the server's ``error``
code, so callers can catch what they care about.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from coherence.errors import (
    CoherenceError,
    LeaseConflict,
    LeaseStoreUnavailable,
    QuotaExceeded,
)
from tiers.errors import BlockTooLarge, CorruptBlock, TierClosed, TierIOError

# --------------------------------------------------------------------------- server side


class GatewayError(Exception):
    """An answer other than success, raised by a handler and rendered by the middleware."""

    status = 500
    error = "internal"

    def __init__(
        self,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        status: int | None = None,
        error: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = dict(headers or {})
        if status is not None:
            self.status = status
        if error is not None:
            self.error = error


class BadRequest(GatewayError):
    status = 400
    error = "bad_request"


class BadKey(BadRequest):
    error = "bad_key"


class BadHeader(BadRequest):
    error = "bad_header"


class BadJSON(BadRequest):
    error = "bad_json"


class BadBatch(BadRequest):
    error = "bad_batch"


class Unauthorized(GatewayError):
    status = 401
    error = "unauthorized"


class Forbidden(GatewayError):
    status = 403
    error = "forbidden"


class NotFound(GatewayError):
    status = 404
    error = "not_found"


class Conflict(GatewayError):
    status = 409
    error = "conflict"


class PayloadTooLarge(GatewayError):
    status = 413
    error = "too_large"


class UnsupportedMediaType(GatewayError):
    status = 415
    error = "unsupported_media_type"


class NotImplementedYet(GatewayError):
    status = 501
    error = "not_implemented"


class Unavailable(GatewayError):
    status = 503
    error = "unavailable"


class InsufficientStorage(GatewayError):
    status = 507
    error = "no_room"


# aiohttp's own answers (router 404/405, client_max_size 413, ...) get these codes.
_HTTP_ERROR_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    411: "length_required",
    413: "too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    417: "expectation_failed",
    431: "headers_too_large",
    500: "internal",
    501: "not_implemented",
    503: "unavailable",
    507: "no_room",
}


def error_code_for_status(status: int) -> str:
    return _HTTP_ERROR_CODES.get(status, "client_error" if status < 500 else "server_error")


def json_error(
    status: int, error: str, detail: str, *, headers: Mapping[str, str] | None = None
) -> web.Response:
    body = json.dumps({"error": error, "detail": detail}).encode()
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def parser_detail(message: str) -> str:
    """aiohttp's parser message without the quoted bytes and the line of carets under them."""
    lines = (line.strip() for line in message.splitlines())
    return " ".join(line for line in lines if line and set(line) != {"^"})


def unreadable_detail(exc: BaseException) -> str:
    """What was wrong with a body aiohttp could not read, in its parser's words."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, HttpProcessingError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None and cause.message:
        return parser_detail(cause.message)[:200]
    return parser_detail(str(exc)).removeprefix("400, message:").strip()[:200] or "malformed"


def http_error_for(exc: BaseException) -> GatewayError | None:
    """The HTTP answer for an exception from a lower package; ``None`` for a real bug.

    The whole mapping lives here. ``coherence`` errors carry their own status and code (lease
    held or stale token -> 409, unknown lease -> 404, quota -> 507, no/bad token -> 401/403).
    """
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, HttpProcessingError | RequestPayloadError):
        # A body aiohttp could not read: broken chunked framing, a Content-Encoding that does
        # not decode. The client's fault, whichever handler was reading.
        return BadRequest(f"unreadable body: {unreadable_detail(exc)}")
    if isinstance(exc, CoherenceError):
        if exc.http_status >= 500 and not isinstance(exc, QuotaExceeded | LeaseStoreUnavailable):
            return None  # misuse inside coherence: a bug, logged and answered 500
        headers: dict[str, str] = {}
        if exc.http_status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="kvgate"'
        if isinstance(exc, LeaseConflict):
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_ms / 1000)))
        return GatewayError(exc.detail, headers=headers, status=exc.http_status, error=exc.code)
    if isinstance(exc, BlockTooLarge):
        return PayloadTooLarge(str(exc) or "the block can never fit any tier")
    if isinstance(exc, CorruptBlock):
        return NotFound("the stored block failed its integrity check and was dropped")
    if isinstance(exc, TierClosed):
        return Unavailable("the store is shutting down")
    if isinstance(exc, TierIOError):
        return Unavailable(f"storage failure: {exc}")
    # TierConfigError and any other TierError is misuse, i.e. a bug: logged, answered 500.
    return None


# --------------------------------------------------------------------------- client side


class KVGateError(Exception):
    """The server answered an error (or an unexpected status)."""

    def __init__(self, status: int, error: str, detail: str = "") -> None:
        super().__init__(f"{status} {error}: {detail}" if detail else f"{status} {error}")
        self.status = status
        self.error = error
        self.detail = detail


class KVGateBadRequest(KVGateError):
    """400: a bad key, header or body."""


class KVGateAuthError(KVGateError):
    """401/403: missing, unknown or insufficient credentials."""


class KVGateNotFound(KVGateError):
    """404 where a miss is not a normal answer (e.g. deleting a lease)."""


class KVGateConflict(KVGateError):
    """409: a write lease is held by someone else, or the lease token is stale."""


class KVGateTooLarge(KVGateError):
    """413: the block is over the server's limit."""


class KVGateNoRoom(KVGateError):
    """507: no room (quota, or nothing evictable)."""


class KVGateServerError(KVGateError):
    """5xx."""


def client_error_for(status: int, error: str, detail: str) -> KVGateError:
    cls: type[KVGateError]
    if status == 400:
        cls = KVGateBadRequest
    elif status in (401, 403):
        cls = KVGateAuthError
    elif status == 404:
        cls = KVGateNotFound
    elif status == 409:
        cls = KVGateConflict
    elif status == 413:
        cls = KVGateTooLarge
    elif status == 507:
        cls = KVGateNoRoom
    elif status >= 500:
        cls = KVGateServerError
    else:
        cls = KVGateError
    return cls(status, error, detail)
