"""How the tiers report what they do: OpenTelemetry spans (API only) and a metrics hook.

Library code never configures the SDK. Spans come from :func:`tracer`: the tracer the embedding
application selected for the current context with :func:`use_tracer` (the gateway does so per
request, so several apps in one process never share a pipeline), else the global
``trace.get_tracer("kvgate.tiers")``. Tier operations open spans with :func:`child_span`, which
does nothing unless the enclosing span is recording: an unsampled request costs one context
lookup per operation, and attributes are computed only under ``span.is_recording()``.

Metrics go through a :class:`TierObserver` the application attaches to the hierarchy
(``hierarchy.observer = ...``); the default discards everything. Counts the hierarchy already
keeps (evictions, promotions, demotions, bytes, blocks) are read at scrape time instead.

Attributes never carry raw keys, only :func:`key_hash` (a hash prefix), so a trace viewer does not
read one tenant's keys off another tenant's requests.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from types import TracebackType
from typing import Protocol

import xxhash
from opentelemetry import context, trace
from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN, Span, Status, StatusCode, Tracer
from opentelemetry.util.types import AttributeValue

from tiers.block import split_key

TRACER_NAME = "kvgate.tiers"

# Attribute names, shared with the gateway and the tests.
ATTR_TIER = "kvgate.tier"
ATTR_TARGET = "kvgate.tier.target"
ATTR_HIT = "kvgate.hit"
ATTR_BYTES = "kvgate.bytes"
ATTR_TENANT = "kvgate.tenant"
ATTR_KEY_HASH = "kvgate.key_hash"
ATTR_OUTCOME = "kvgate.outcome"
ATTR_SOURCE = "kvgate.lookup"  # "index": answered from the hierarchy's index, no tier I/O

_GLOBAL_TRACER = trace.get_tracer(TRACER_NAME)
_CURRENT_TRACER: ContextVar[Tracer | None] = ContextVar("kvgate_tiers_tracer", default=None)


def tracer() -> Tracer:
    chosen = _CURRENT_TRACER.get()
    return chosen if chosen is not None else _GLOBAL_TRACER


def use_tracer(chosen: Tracer | None) -> Token[Tracer | None]:
    """Make ``chosen`` the tiers' tracer for this context (and tasks started from it)."""
    return _CURRENT_TRACER.set(chosen)


def reset_tracer(token: Token[Tracer | None]) -> None:
    _CURRENT_TRACER.reset(token)


class _NoSpan:
    """The context manager :func:`child_span` hands out when nothing is being recorded."""

    __slots__ = ()

    def __enter__(self) -> Span:
        return INVALID_SPAN

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


_NO_SPAN = _NoSpan()


class _SpanCM(Protocol):
    def __enter__(self) -> Span: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None: ...


def recording() -> bool:
    return trace.get_current_span().is_recording()


class _LiveSpan:
    """Starts a span and makes it current, like ``start_as_current_span`` without its two
    generator-based context managers (a few microseconds per span on the hot path)."""

    __slots__ = ("_span", "_token")

    def __init__(self, span: Span) -> None:
        self._span = span
        self._token: Token[Context] | None = None

    def __enter__(self) -> Span:
        self._token = context.attach(trace.set_span_in_context(self._span))
        return self._span

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._token is not None:
            context.detach(self._token)
        span = self._span
        if exc is not None and isinstance(exc, Exception) and span.is_recording():
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        span.end()


def child_span(name: str) -> _SpanCM:
    """A span under the current one, or a shared no-op when the current one is not recording.

    Tier operations only ever happen on behalf of a request (or a background move it started),
    so a span with no recording parent would be an orphan nobody asked for.
    """
    if not trace.get_current_span().is_recording():
        return _NO_SPAN
    return _LiveSpan(tracer().start_span(name))


def key_hash(scoped_key: str) -> str:
    """A short, stable stand-in for a key in telemetry: never the key itself."""
    return xxhash.xxh64_hexdigest(scoped_key.encode())[:12]


def key_attrs(scoped_key: str, tier: str) -> dict[str, AttributeValue]:
    tenant, _ = split_key(scoped_key)
    return {ATTR_TIER: tier, ATTR_TENANT: tenant, ATTR_KEY_HASH: key_hash(scoped_key)}


def note_failure(span: Span, exc: BaseException, *, what: str) -> None:
    """A tier fault answered as a miss: an event on the span, never an error status."""
    if span.is_recording():
        span.record_exception(exc, attributes={"kvgate.fault": what})
        span.set_attribute(ATTR_OUTCOME, "error")


class TierObserver(Protocol):
    """Per-operation measurements from the hierarchy. Called on the event loop; must be cheap."""

    def tier_get(self, tier: str, seconds: float | None, hit: bool, *, tenant: str) -> None:
        """A tier was consulted for a read of ``tenant``'s block; ``seconds`` is ``None`` when
        the hierarchy's index answered a miss for it without touching it."""
        ...

    def tier_put(self, tier: str, seconds: float, outcome: str, *, tenant: str) -> None:
        """A tier stored (or refused) ``tenant``'s block; ``outcome`` is a ``PutOutcome`` value."""
        ...

    def block_read(self, tenant: str, tier: str | None) -> None:
        """A hierarchy read ended: served from ``tier``, or missed everywhere (``None``)."""
        ...


class NullObserver:
    def tier_get(self, tier: str, seconds: float | None, hit: bool, *, tenant: str) -> None:
        return None

    def tier_put(self, tier: str, seconds: float, outcome: str, *, tenant: str) -> None:
        return None

    def block_read(self, tenant: str, tier: str | None) -> None:
        return None


NULL_OBSERVER = NullObserver()
