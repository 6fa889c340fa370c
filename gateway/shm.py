"""The same-host data plane: block bytes through shared memory, REST for control only.

A client on the gateway's host attaches (``POST /v1/shm/attach``) and gets the segments it may
map: the CPU arenas themselves (read-only to it) and a staging segment of its own (read-write).
``POST /v1/shm/get`` answers, per key, where the bytes lie -- ``(segment, [[offset, length],
...])`` -- under a read lease: the blocks' pages are pinned (never freed or reused) until the
client releases the lease (``POST /v1/shm/release``, or a ``release`` list piggybacked on its
next get) or the lease expires. A block outside the arenas (disk tier, or in flight between
tiers) is copied into the client's staging segment under the same lease; when staging is full
the item says ``307`` and the client reads that one over HTTP. A PUT reserves staging space
(``POST /v1/shm/reserve``), the client writes its bytes there, and ``POST /v1/shm/commit``
stores them (one copy into the tiers).

Isolation (``shm_isolation``): *shared* sessions map the CPU arenas themselves (and an HBM
arena by CUDA IPC handle), which hold every tenant's pages -- one trust domain, the fastest
read. *Private* sessions (the default once tenants are configured) never see an arena: every
read is copied into the session's own staging segment, a sealed memfd that has no name and
reaches the client only as a descriptor over a Unix socket (gateway.fdpass), redeemed with a
single-use ticket from the authenticated attach. Segments are created under the gateway's uid;
a tenant whose client runs under its own uid can then reach nothing but its own staging bytes.
Keys are scoped to the caller's tenant and sessions and leases belong to the tenant that made
them either way, so a client is only ever given descriptors for its own tenant's blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.errors import BadJSON, Conflict, NotFound, PayloadTooLarge, Unavailable
from gateway.fdpass import FdHandoff
from gateway.handlers import (
    check_key,
    json_response,
    keys_of,
    parse_dtype,
    parse_ttl,
    put_item,
    read_json,
)
from gateway.state import STATE, GatewayState
from tiers.allocator import PageAllocator, Run
from tiers.base import PinnedBlock, SharedTier
from tiers.block import Block
from tiers.clock import Clock
from tiers.hierarchy import Hierarchy
from tiers.shmseg import SegmentInfo, ShmSegment, sweep_stale

log = logging.getLogger("kvgate.shm")

STAGING_PAGE_BYTES = 64 * 1024
MAX_SESSIONS = 256
MAX_TENANT_SESSIONS = 64
"""With tenants configured, one tenant's share of :data:`MAX_SESSIONS`: it cannot take them all."""
SESSION_IDLE_S = 600.0


@dataclass(slots=True, eq=False)
class _Session:
    id: str
    tenant: str
    staging: ShmSegment
    alloc: PageAllocator
    last_used: float
    leases: set[str] = field(default_factory=set)


@dataclass(slots=True, eq=False)
class _Lease:
    id: str
    session: _Session
    deadline: float  # clock.monotonic() seconds
    pins: list[PinnedBlock] = field(default_factory=list)
    staged: list[list[Run]] = field(default_factory=list)
    reserved: list[tuple[int, list[Run]]] = field(default_factory=list)  # (size, runs), PUTs
    # A get is filling the lease or a commit is reading its regions: neither its deadline nor a
    # release or detach may free them (or close the segment) under it; whoever set it settles
    # the lease itself.
    busy: bool = False


@dataclass(frozen=True, slots=True)
class ShmSettings:
    directory: Path
    staging_bytes: int
    lease_ms: int
    max_block_bytes: int
    max_keys: int
    max_tenant_sessions: int = MAX_SESSIONS


class ShmExchange:
    """Sessions, read/write leases and staging space; the HTTP handlers below are thin.

    With a ``handoff`` sessions are private: no arena segments, a nameless staging segment
    handed over by descriptor, every read copied into it (see the module doc)."""

    def __init__(
        self, settings: ShmSettings, *, clock: Clock, handoff: FdHandoff | None = None
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._handoff = handoff
        self._sessions: dict[str, _Session] = {}
        self._leases: dict[str, _Lease] = {}
        self.arena_segments: list[SegmentInfo] = []

    @property
    def max_lease_ms(self) -> int:
        return 6 * self._settings.lease_ms

    def publish(self, hierarchy: Hierarchy) -> None:
        """Advertise the tiers whose storage clients can map."""
        # Stand-in hierarchies (tests, wrappers) may not expose tiers: then nothing is mapped.
        tiers: list[object] = list(getattr(hierarchy, "tiers", []))
        segments = {
            seg.name: seg
            for tier in tiers
            if isinstance(tier, SharedTier) and (seg := tier.shared_segment()) is not None
        }
        # Tiers sharing one arena (tiers.arena) share its segment: it is mapped once.
        self.arena_segments = list(segments.values())

    # -- sessions ------------------------------------------------------------------------------

    def attach(self, tenant: str) -> _Session:
        self.sweep()
        if len(self._sessions) >= MAX_SESSIONS:
            raise Unavailable(f"too many shared-memory sessions (at most {MAX_SESSIONS})")
        cap = self._settings.max_tenant_sessions
        if sum(1 for s in self._sessions.values() if s.tenant == tenant) >= cap:
            raise Unavailable(
                f"this tenant has {cap} shared-memory sessions open, its most; detach some"
            )
        size = self._settings.staging_bytes
        try:
            if self._handoff is not None:
                staging = ShmSegment.create_private("staging", size)
            else:
                staging = ShmSegment.create("staging", size, directory=self._settings.directory)
        except (OSError, ValueError) as exc:
            raise Unavailable(f"no shared memory for a staging segment: {exc}") from None
        npages = staging.size // STAGING_PAGE_BYTES
        session = _Session(
            id=secrets.token_urlsafe(16),
            tenant=tenant,
            staging=staging,
            alloc=PageAllocator(npages, STAGING_PAGE_BYTES),
            last_used=self._clock.monotonic(),
        )
        self._sessions[session.id] = session
        return session

    def session(self, session_id: object, tenant: str) -> _Session:
        session = self._sessions.get(session_id) if isinstance(session_id, str) else None
        # Another tenant's session is answered exactly like an unknown one.
        if session is None or session.tenant != tenant:
            raise NotFound("no such shared-memory session (attach again)")
        session.last_used = self._clock.monotonic()
        return session

    def detach(self, session: _Session) -> None:
        for lease_id in list(session.leases):
            if not self._leases[lease_id].busy:
                self._end(lease_id)
        self._sessions.pop(session.id, None)
        session.staging.close()  # a commit still reading keeps the mapping alive

    def segments_for(self, session: _Session) -> list[SegmentInfo]:
        """What an attach answers: in private mode a ticket for the staging descriptor only."""
        if self._handoff is None:
            return [*self.arena_segments, session.staging.info(writable=True)]
        staging = session.staging
        ticket = self._handoff.issue(lambda: staging.fd)  # -1 once the session is gone
        return [
            SegmentInfo(
                staging.name,
                str(self._handoff.path),
                staging.size,
                writable=True,
                kind="fd",
                ticket=ticket,
            )
        ]

    # -- reads ---------------------------------------------------------------------------------

    async def get(
        self,
        session: _Session,
        keys: Sequence[str],
        scoped: Sequence[str],
        store: Hierarchy,
        *,
        ttl_ms: int,
    ) -> tuple[_Lease, list[dict[str, object]]]:
        lease = self._new_lease(session, ttl_ms)
        lease.busy = True  # a sweep during the awaits below must not end it half filled
        try:
            items = await self._fill(lease, keys, scoped, store)
        except BaseException:
            lease.busy = False
            self._end(lease.id)
            raise
        lease.busy = False
        return lease, items

    async def _fill(
        self, lease: _Lease, keys: Sequence[str], scoped: Sequence[str], store: Hierarchy
    ) -> list[dict[str, object]]:
        session = lease.session
        items: list[dict[str, object]] = []
        staging = session.staging
        for key, skey in zip(keys, scoped, strict=True):
            hit = await store.get_pinned(skey)
            if hit is None:
                items.append({"key": key, "status": 404})
                continue
            block = hit.block
            meta = block.meta
            item: dict[str, object] = {
                "key": key,
                "status": 200,
                "tier": hit.tier,
                "size": meta.size,
                "etag": meta.etag,
            }
            place = None if self._handoff is not None else block.placement()
            if place is not None:
                lease.pins.append(block)
                item["segment"] = place.segment
                item["runs"] = [list(run) for run in place.runs]
            else:
                # Not in a mapped arena (or private): copy into the session's staging segment,
                # if there is room; HBM on a GPU is copied to the host first.
                runs = session.alloc.allocate(meta.size)
                try:
                    if runs is not None:
                        views = block.views()
                        if views is None:
                            views = [memoryview(await block.read())]
                        _scatter(staging.buffer, runs, views)
                        lease.staged.append(runs)
                        item["segment"] = staging.name
                        item["runs"] = [[a, b - a] for a, b in runs]
                        runs = None
                    else:
                        item["status"] = 307  # no room in staging: read this one over HTTP
                finally:
                    if runs is not None:  # the copy failed: the region is not the lease's
                        session.alloc.free(runs)
                    block.release()
            items.append(item)
        return items

    # -- writes --------------------------------------------------------------------------------

    def reserve(self, session: _Session, sizes: Sequence[int], *, ttl_ms: int) -> _Lease:
        lease = self._new_lease(session, ttl_ms)
        for size in sizes:
            runs = session.alloc.allocate(size)
            if runs is None:
                self._end(lease.id)
                raise PayloadTooLarge(
                    "the staging segment has no room for this batch; commit or release first"
                )
            lease.reserved.append((size, runs))
        return lease

    async def commit(
        self,
        lease: _Lease,
        keys: Sequence[str],
        put: Callable[[str, Block], Awaitable[dict[str, object]]],
        *,
        dtype: str | None,
        expires_at: float | None,
    ) -> list[dict[str, object]]:
        """Store each reserved region under its key with ``put`` (the gateway's write path, so
        leases, fencing and quotas hold as for any PUT); one result per key."""
        if len(keys) != len(lease.reserved):
            raise BadJSON(f"{len(lease.reserved)} regions were reserved, {len(keys)} keys sent")
        if lease.busy:
            raise Conflict("this shared-memory lease is in use (being committed already)")
        lease.busy = True
        buf = memoryview(lease.session.staging.buffer)
        results: list[dict[str, object]] = []
        try:
            for key, (size, runs) in zip(keys, lease.reserved, strict=True):
                if len(runs) == 1:
                    data: bytes | memoryview = buf[runs[0][0] : runs[0][0] + size]
                else:
                    data = b"".join(buf[a:b] for a, b in runs)
                # The tiers copy the bytes before put returns; the region is free after that.
                results.append(await put(key, Block.of(data, dtype=dtype, expires_at=expires_at)))
        finally:
            self._end(lease.id)
        return results

    # -- leases --------------------------------------------------------------------------------

    def lease(self, lease_id: object, session: _Session) -> _Lease:
        lease = self._leases.get(lease_id) if isinstance(lease_id, str) else None
        if lease is None or lease.session is not session:
            raise NotFound("no such shared-memory lease (expired or released)")
        return lease

    def release(self, session: _Session, lease_ids: Sequence[object]) -> int:
        released = 0
        for lease_id in lease_ids:
            lease = self._leases.get(lease_id) if isinstance(lease_id, str) else None
            if lease is not None and lease.session is session and not lease.busy:
                self._end(lease.id)
                released += 1
        return released

    def sweep(self) -> int:
        """End expired leases (their pages become reusable) and close idle sessions."""
        now = self._clock.monotonic()
        expired = [
            lid for lid, lease in self._leases.items() if now >= lease.deadline and not lease.busy
        ]
        for lease_id in expired:
            self._end(lease_id)
        for session in list(self._sessions.values()):
            if not session.leases and now - session.last_used > SESSION_IDLE_S:
                self.detach(session)
        return len(expired)

    def close(self) -> None:
        """End every session and unlink the arena files: new clients cannot attach any more,
        mapped ones keep working until the tiers close. Unlinking first means a gateway killed
        later in its shutdown (a long spill) leaves nothing behind in /dev/shm."""
        for session in list(self._sessions.values()):
            self.detach(session)
        for seg in self.arena_segments:
            if seg.kind == "file":
                with contextlib.suppress(OSError):
                    os.unlink(seg.path)
        self.arena_segments = []

    @property
    def active_leases(self) -> int:
        return len(self._leases)

    def _new_lease(self, session: _Session, ttl_ms: int) -> _Lease:
        ttl = min(max(ttl_ms, 1), self.max_lease_ms) / 1000.0
        lease = _Lease(secrets.token_urlsafe(12), session, self._clock.monotonic() + ttl)
        self._leases[lease.id] = lease
        session.leases.add(lease.id)
        return lease

    def _end(self, lease_id: str) -> None:
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return
        lease.session.leases.discard(lease_id)
        for pin in lease.pins:
            pin.release()
        for runs in lease.staged:
            lease.session.alloc.free(runs)
        for _, runs in lease.reserved:
            lease.session.alloc.free(runs)
        lease.pins.clear()
        lease.staged.clear()
        lease.reserved.clear()


def _scatter(dst: Any, runs: list[Run], views: list[memoryview]) -> None:
    """Copy ``views`` (the block, in order) into the byte runs ``runs`` of ``dst``."""
    target = memoryview(dst)
    src = views[0] if len(views) == 1 else memoryview(b"".join(views))
    src = src.cast("B") if src.format != "B" or src.ndim != 1 else src
    offset = 0
    for start, stop in runs:
        n = stop - start
        target[start:stop] = src[offset : offset + n]
        offset += n


# -- HTTP ------------------------------------------------------------------------------------

SHM = web.AppKey("kvgate_shm", ShmExchange)


def _ttl_of(payload: dict[str, Any], default_ms: int, max_ms: int) -> int:
    raw = payload.get("ttl_ms", default_ms)
    if not isinstance(raw, int) or isinstance(raw, bool) or not 1 <= raw <= max_ms:
        raise BadJSON(f'"ttl_ms" must be an integer in 1..{max_ms}')
    return raw


def _object(payload: Any) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise BadJSON("expected a JSON object")
    return payload


class ShmHandlers:
    def __init__(self, state: GatewayState, exchange: ShmExchange) -> None:
        self._state = state
        self._shm = exchange
        self._lease_ms = state.config.shm_lease_ms

    async def attach(self, request: web.Request) -> web.Response:
        ctx = await self._state.resolve(request)
        session = self._shm.attach(ctx.tenant)
        return json_response(
            {
                "session": session.id,
                "segments": [s.as_json() for s in self._shm.segments_for(session)],
                "lease_ms": self._lease_ms,
                "max_lease_ms": self._shm.max_lease_ms,
            },
            status=201,
        )

    async def detach(self, request: web.Request) -> web.Response:
        ctx = await self._state.resolve(request)
        payload = _object(await read_json(request))
        self._shm.detach(self._shm.session(payload.get("session"), ctx.tenant))
        return web.Response(status=204)

    async def get(self, request: web.Request) -> web.Response:
        ctx = await self._state.resolve(request)
        payload = _object(await read_json(request))
        shm = self._shm
        shm.sweep()
        session = shm.session(payload.get("session"), ctx.tenant)
        release = payload.get("release", [])
        if not isinstance(release, list):
            raise BadJSON('"release" must be a list of lease ids')
        shm.release(session, release)
        keys = keys_of(payload, limit=self._state.config.max_batch_keys)
        ttl_ms = _ttl_of(payload, self._lease_ms, shm.max_lease_ms)
        lease, items = await shm.get(
            session, keys, [ctx.scope(k) for k in keys], self._state.store, ttl_ms=ttl_ms
        )
        if not lease.pins and not lease.staged:
            shm.release(session, [lease.id])
            return json_response({"lease": None, "items": items})
        return json_response({"lease": lease.id, "ttl_ms": ttl_ms, "items": items})

    async def release(self, request: web.Request) -> web.Response:
        ctx = await self._state.resolve(request)
        payload = _object(await read_json(request))
        session = self._shm.session(payload.get("session"), ctx.tenant)
        leases = payload.get("leases")
        if not isinstance(leases, list):
            raise BadJSON('expected {"session": ..., "leases": [lease ids]}')
        return json_response({"released": self._shm.release(session, leases)})

    async def reserve(self, request: web.Request) -> web.Response:
        ctx = await self._state.resolve(request)
        payload = _object(await read_json(request))
        shm = self._shm
        shm.sweep()
        session = shm.session(payload.get("session"), ctx.tenant)
        sizes = payload.get("sizes")
        limit = self._state.config.max_block_bytes
        if not isinstance(sizes, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in sizes
        ):
            raise BadJSON('expected {"session": ..., "sizes": [byte counts]}')
        if len(sizes) > self._state.config.max_batch_keys:
            raise PayloadTooLarge(f"{len(sizes)} regions in one call; at most the batch limit")
        if any(n > limit for n in sizes):
            raise PayloadTooLarge(f"a block over the limit of {limit} bytes")
        ttl_ms = _ttl_of(payload, self._lease_ms, shm.max_lease_ms)
        lease = shm.reserve(session, sizes, ttl_ms=ttl_ms)
        regions = [
            {"segment": session.staging.name, "runs": [[a, b - a] for a, b in runs]}
            for _, runs in lease.reserved
        ]
        return json_response({"lease": lease.id, "ttl_ms": ttl_ms, "regions": regions}, status=201)

    async def commit(self, request: web.Request) -> web.Response:
        ctx = await self._state.resolve(request)
        payload = _object(await read_json(request))
        shm = self._shm
        session = shm.session(payload.get("session"), ctx.tenant)
        lease = shm.lease(payload.get("lease"), session)
        keys = payload.get("keys")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise BadJSON('expected {"session", "lease", "keys": [...]}')
        for key in keys:
            check_key(key)
        dtype_raw = payload.get("dtype")
        dtype = parse_dtype(dtype_raw if isinstance(dtype_raw, str) else None)
        ttl_raw = payload.get("ttl_s")
        ttl = parse_ttl(None if ttl_raw is None else str(ttl_raw))
        expires_at = None if ttl is None else self._state.clock.time() + ttl
        put = functools.partial(put_item, self._state.coherent, ctx)
        results = await shm.commit(lease, keys, put, dtype=dtype, expires_at=expires_at)
        return json_response({"results": results})


def install(app: web.Application) -> None:
    """Add the /v1/shm/* routes and the exchange's lifetime to the gateway app."""
    state = app[STATE]
    config = state.config
    handoff = FdHandoff(Path(config.shm_dir), clock=state.clock) if config.shm_private else None
    exchange = ShmExchange(
        ShmSettings(
            directory=Path(config.shm_dir),
            staging_bytes=config.shm_staging_bytes,
            lease_ms=config.shm_lease_ms,
            max_block_bytes=config.max_block_bytes,
            max_keys=config.max_batch_keys,
            max_tenant_sessions=MAX_TENANT_SESSIONS if config.auth_enabled else MAX_SESSIONS,
        ),
        clock=state.clock,
        handoff=handoff,
    )
    app[SHM] = exchange
    h = ShmHandlers(state, exchange)

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        removed = sweep_stale(Path(config.shm_dir))
        if removed:
            log.info("removed %d shared-memory segments left by dead gateways", removed)
        if state.hierarchy is not None:
            exchange.publish(state.hierarchy)
        if handoff is not None:
            await handoff.start()
        elif config.auth_enabled:
            log.warning(
                "shm_isolation = shared with tenants configured: every shared-memory client "
                "maps the arenas, which hold all tenants' blocks"
            )
        sweeper = asyncio.get_running_loop().create_task(_sweep_forever(exchange, config))
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            if handoff is not None:
                await handoff.close()
            exchange.close()

    # After the tiers' cleanup_ctx: the arenas exist when it starts, and it ends first.
    app.cleanup_ctx.append(lifetime)
    r = app.router
    r.add_post("/v1/shm/attach", h.attach)
    r.add_post("/v1/shm/detach", h.detach)
    r.add_post("/v1/shm/get", h.get)
    r.add_post("/v1/shm/release", h.release)
    r.add_post("/v1/shm/reserve", h.reserve)
    r.add_post("/v1/shm/commit", h.commit)


async def _sweep_forever(exchange: ShmExchange, config: Any) -> None:
    # Expired pins also end on every shm call; this bounds how long an idle gateway holds them.
    period = max(config.shm_lease_ms / 2000.0, 0.05)
    while True:
        await asyncio.sleep(period)
        exchange.sweep()
