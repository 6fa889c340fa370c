"""The one exception tree of the ``coherence`` package.

Every error names the HTTP answer it stands for (``http_status``) and a short machine-readable
``code`` for the ``{"error": ..., "detail": ...}`` body, so the gateway translates them in one
place without a table of its own. Outcomes that are not errors (a lease held by someone else on
``acquire``, a waiter timing out) are values, not exceptions.
"""

from __future__ import annotations

from typing import ClassVar


class CoherenceError(Exception):
    """Base of every error raised by ``coherence``."""

    http_status: ClassVar[int] = 500
    code: ClassVar[str] = "coherence_error"

    @property
    def detail(self) -> str:
        return str(self)


class CoherenceConfigError(CoherenceError):
    """Impossible configuration (misuse: raised at construction, never per request)."""

    code = "config_error"


class BadRequest(CoherenceError):
    """A lease request or header the client got wrong (bad ``ttl_ms``, malformed token)."""

    http_status = 400
    code = "bad_request"


class LeaseError(CoherenceError):
    """Base of the write-lease errors."""

    http_status = 409
    code = "lease_error"


class LeaseNotFound(LeaseError):
    """No lease with this id is known (never granted, superseded, or long forgotten)."""

    http_status = 404
    code = "lease_not_found"


class LeaseLost(LeaseError):
    """The lease existed but is no longer live: it expired, was released or was committed."""

    http_status = 409
    code = "lease_lost"


class LeaseConflict(LeaseError):
    """Someone else holds the write lease on the key (a PUT without the current token)."""

    http_status = 409
    code = "lease_conflict"

    def __init__(self, message: str, *, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class StaleToken(LeaseError):
    """The fencing token is not the newest one granted for the key: refused, whatever the time."""

    http_status = 409
    code = "stale_token"


class Unauthorized(CoherenceError):
    """No credentials, or credentials that are not a well-formed bearer token."""

    http_status = 401
    code = "unauthorized"


class Forbidden(CoherenceError):
    """A well-formed bearer token that belongs to no configured tenant."""

    http_status = 403
    code = "forbidden"


class QuotaExceeded(CoherenceError):
    """The tenant's quota can never hold this block, even after evicting all its own data."""

    http_status = 507
    code = "quota_exceeded"


class LeaseStoreUnavailable(CoherenceError):
    """The shared lease store (Redis, with ``--remote``) did not answer: try again later."""

    http_status = 503
    code = "unavailable"
