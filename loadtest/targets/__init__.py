"""Load-test targets: kvgate and its peers behind one small async interface (see base.py).

``open_target(name, options)`` starts whatever server the target needs (unless ``options.url``
points at a running one), connects a client, and stops both on exit. New targets (for example
kvgate's shared-memory client) register one opener in ``OPENERS``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace
from typing import Literal

from loadtest import procs
from loadtest.targets.base import (
    GetResult,
    Lease,
    LeaseRefusal,
    PutStatus,
    SupportsLeases,
    SupportsLookup,
    Target,
    TargetError,
)
from loadtest.targets.http import HttpTarget, KvgateTarget

__all__ = [
    "OPENERS",
    "GetResult",
    "HttpTarget",
    "KvgateTarget",
    "Lease",
    "LeaseRefusal",
    "PutStatus",
    "SupportsLeases",
    "SupportsLookup",
    "Target",
    "TargetError",
    "TargetOptions",
    "open_target",
]


@dataclass(frozen=True)
class TargetOptions:
    concurrency: int = 16
    block_size: int = 1 << 20
    url: str | None = None
    """A running server to use instead of starting one (kvgate, dict: http://...; redis: redis://...)."""
    peer_bytes: int = 1 << 30
    """Memory bound given to the peers (dict server cap, redis maxmemory, Mooncake segment)."""
    kvgate_sizes: procs.KvgateSizes = field(default_factory=procs.KvgateSizes)
    kvgate_args: tuple[str, ...] = ()
    mooncake_mode: Literal["local", "remote"] = "local"
    """local: the benchmark client contributes the segment itself (the usual single-node setup);
    remote: a separate mooncake_client process holds it and every byte crosses TCP."""
    shm_batch: int = 4
    """The most blocks one shared-memory call of the kvgate-shm targets carries: the calls
    waiting at one moment are gathered into batches of at most this many."""


Opener = Callable[[TargetOptions], AbstractAsyncContextManager[Target]]


@contextlib.asynccontextmanager
async def _http(
    cls: type[HttpTarget], name: str, url: str, options: TargetOptions
) -> AsyncIterator[Target]:
    target = cls(name, url, concurrency=options.concurrency)
    try:
        yield target
    finally:
        await target.close()


async def _kvgate_url(
    stack: contextlib.AsyncExitStack, options: TargetOptions, settings: dict[str, str] | None = None
) -> str:
    """The given server's URL, or a kvgate started for this target (stopped with ``stack``)."""
    if options.url is not None:
        return options.url
    server = procs.kvgate_server(
        sizes=options.kvgate_sizes, extra_args=options.kvgate_args, settings=settings
    )
    return await stack.enter_async_context(server)


@contextlib.asynccontextmanager
async def _open_kvgate(options: TargetOptions) -> AsyncIterator[Target]:
    async with contextlib.AsyncExitStack() as stack:
        url = await _kvgate_url(stack, options)
        yield await stack.enter_async_context(_http(KvgateTarget, "kvgate", url, options))


# A RAM cache that sheds under write overload, as the redis peer (no persistence, allkeys-lru)
# does: kvgate with disk_shed on, for the write scenarios only (reads are the same server code).
SHED_SETTINGS = {"KVGATE_DISK_SHED": "true"}
SHED_SCENARIOS = frozenset({"put", "mixed"})


@contextlib.asynccontextmanager
async def _write_variant(
    name: str, options: TargetOptions, settings: dict[str, str] | None = None
) -> AsyncIterator[Target]:
    """A kvgate started (or given) for the write scenarios only."""
    async with contextlib.AsyncExitStack() as stack:
        url = await _kvgate_url(stack, options, settings)
        target = KvgateTarget(
            name, url, concurrency=options.concurrency, only_scenarios=SHED_SCENARIOS
        )
        stack.push_async_callback(target.close)
        yield target


def _open_kvgate_shed(options: TargetOptions) -> AbstractAsyncContextManager[Target]:
    return _write_variant("kvgate-shed", options, SHED_SETTINGS)


def _open_kvgate_ram(options: TargetOptions) -> AbstractAsyncContextManager[Target]:
    # What the redis peer is (no persistence, allkeys-lru): a RAM-only kvgate, no disk tier.
    ram = replace(options, kvgate_sizes=replace(options.kvgate_sizes, disk_bytes="0"))
    return _write_variant("kvgate-ram", ram)


@contextlib.asynccontextmanager
async def _open_kvgate_shm(options: TargetOptions) -> AsyncIterator[Target]:
    async with _shm_target(options, "kvgate-shm", None) as target:
        yield target


# What a multi-tenant gateway runs by default (shm_isolation auto -> private): no arena is
# mapped, every read is one copy into the session's own segment.
PRIVATE_SHM_SETTINGS = {"KVGATE_SHM_ISOLATION": "private"}


@contextlib.asynccontextmanager
async def _open_kvgate_shm_private(options: TargetOptions) -> AsyncIterator[Target]:
    async with _shm_target(options, "kvgate-shm-private", PRIVATE_SHM_SETTINGS) as target:
        yield target


@contextlib.asynccontextmanager
async def _shm_target(
    options: TargetOptions, name: str, settings: dict[str, str] | None
) -> AsyncIterator[Target]:
    from loadtest.targets.shm_target import KvgateShmTarget

    async with contextlib.AsyncExitStack() as stack:
        url = await _kvgate_url(stack, options, settings)
        target = KvgateShmTarget(
            url, concurrency=options.concurrency, max_batch=options.shm_batch, name=name
        )
        stack.push_async_callback(target.close)
        await target.check()
        yield target


@contextlib.asynccontextmanager
async def _open_dict(options: TargetOptions) -> AsyncIterator[Target]:
    async with contextlib.AsyncExitStack() as stack:
        url = options.url
        if url is None:
            url = await stack.enter_async_context(procs.dict_server(max_bytes=options.peer_bytes))
        yield await stack.enter_async_context(_http(HttpTarget, "dict", url, options))


@contextlib.asynccontextmanager
async def _open_redis(options: TargetOptions) -> AsyncIterator[Target]:
    from loadtest.targets.redis_target import RedisTarget

    async with contextlib.AsyncExitStack() as stack:
        url = options.url
        if url is None:
            url = await stack.enter_async_context(procs.redis_server(max_bytes=options.peer_bytes))
        target = RedisTarget(url, concurrency=options.concurrency)
        stack.push_async_callback(target.close)
        yield target


@contextlib.asynccontextmanager
async def _open_mooncake(options: TargetOptions) -> AsyncIterator[Target]:
    from loadtest.targets.mooncake_target import MooncakeTarget, mooncake_available

    if not mooncake_available():
        raise TargetError(
            "mooncake.store is not importable: scripts/peers.sh install "
            "(pip mooncake-transfer-engine-non-cuda + libibverbs1 librdmacm1 libnuma1 liburing2)"
        )
    async with contextlib.AsyncExitStack() as stack:
        endpoints = await stack.enter_async_context(procs.mooncake_master())
        segment = options.peer_bytes
        if options.mooncake_mode == "remote":
            await stack.enter_async_context(
                procs.mooncake_segment_holder(endpoints, segment_bytes=segment)
            )
            segment = 0
        target = await MooncakeTarget.connect(
            master_addr=endpoints.master_addr,
            metadata_url=endpoints.metadata_url,
            concurrency=options.concurrency,
            segment_bytes=segment,
            # The transfer buffer must hold every in-flight block at once.
            buffer_bytes=max(64 << 20, 2 * options.block_size * options.concurrency),
            name="mooncake" if options.mooncake_mode == "local" else "mooncake-remote",
        )
        stack.push_async_callback(target.close)
        yield target


OPENERS: dict[str, Opener] = {
    "kvgate": _open_kvgate,
    "kvgate-shm": _open_kvgate_shm,
    "kvgate-shm-private": _open_kvgate_shm_private,
    "kvgate-shed": _open_kvgate_shed,
    "kvgate-ram": _open_kvgate_ram,
    "dict": _open_dict,
    "redis": _open_redis,
    "mooncake": _open_mooncake,
}


def open_target(name: str, options: TargetOptions) -> AbstractAsyncContextManager[Target]:
    try:
        opener = OPENERS[name]
    except KeyError:
        raise ValueError(f"unknown target {name!r}; known: {', '.join(OPENERS)}") from None
    return opener(options)
