"""The shared remote tier: one Redis that several gateways use as one cache.

Every gateway started with ``--remote redis://...`` writes each new block through to this tier
and reads it on a local miss, so a block stored through any gateway is served by all of them.
Blocks are stored as the same checked frames as on disk (:mod:`tiers.frame`: xxh3-128,
zstd with byte-grouping), so a corrupt or truncated value is a miss, never wrong bytes.

The budget and the eviction order live in Redis, not in any one gateway: a shared tier's
recency is the recency of all its readers. "Check the budget, evict the least recently used,
publish" is one Lua script, so it is atomic across gateways. The frame itself is staged with a
plain SET just before, in the same pipeline, and the script RENAMEs it into place:

* ``{prefix}:blk:{key}`` -- a block's frame;
* ``{prefix}:stage:{uuid}`` -- a frame on its way in (expires after ``STAGE_TTL_MS``);
* ``{prefix}:lru`` -- sorted set of keys scored by a shared access counter (the LRU order);
* ``{prefix}:meta`` -- hash of ``bytes``, ``blocks``, ``evictions`` and the counter ``seq``;
* ``{prefix}:exp`` -- hash of key -> wall-clock ms its TTL ends, for blocks stored with one.
  A block past it is absent to every gateway: ``present`` says no, and a put replaces it. Not
  Redis's own expiry: Redis would drop the frame without the budget and LRU order knowing.

A put can carry a :class:`Fence`, checked in the same atomic step that publishes the block;
the coherence layer uses it to make fencing tokens hold across gateways. Victim keys are
derived inside the scripts, so the tier needs one Redis instance (not Redis Cluster).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tiers.base import PutOutcome, TierStats
from tiers.block import Block
from tiers.clock import SYSTEM_CLOCK, Clock
from tiers.errors import CorruptBlock, TierConfigError, TierIOError
from tiers.frame import DEFAULT_LEVEL, decode_frame, encode_frame, frame_is_raw

log = logging.getLogger(__name__)

_A = TypeVar("_A")
_R = TypeVar("_R")

REMOTE_TIER = "remote"
POOL_CONNECTIONS = 256
"""Redis connections per gateway; more concurrent calls queue for one."""
POOL_WAIT_S = 5.0
"""How long a call waits for a free connection before it fails (a 503, or a local miss)."""
RETRIES = 2
"""Retries of a call whose connection Redis dropped, each on a fresh connection."""
DEFAULT_PREFIX = "kvgate"
_INLINE_CODEC_BYTES = 64 * 1024
"""Frames smaller than this are encoded and decoded on the loop: an executor hop costs more."""

# The frame never passes through Lua: a script that takes or returns a 1 MiB string costs Redis
# about 1.7 ms of CPU per call (the string is copied into Lua and back), five times a plain
# GET. A put therefore SETs the frame under a staging key with a short expiry and, in the same
# pipeline, runs the script that checks, makes room and RENAMEs the staging key into place
# (O(1)); a get pipelines a plain GET with a small script that refreshes the LRU order.
STAGE_TTL_MS = 60_000
"""A staging key left behind by a gateway that died between the two commands expires."""

# KEYS: block, lru, meta, fence record (the block key again when there is no fence), staged
# frame, expiry hash
# ARGV: fence mode ("" | "free" | "token"), token, fence now_ms, capacity, member, block prefix,
# the new block's expiry ms ("" for none), wall-clock now ms
_PUT = """
local gone = {}
local function refuse(answer)
  redis.call('DEL', KEYS[5])
  return {answer, #gone, gone}
end
local size = redis.call('STRLEN', KEYS[5])
if size == 0 then return {'lost', 0} end
local mode = ARGV[1]
if mode ~= '' then
  local rec = redis.call('HMGET', KEYS[4], 'token', 'live', 'deadline_ms')
  if mode == 'free' then
    if rec[2] == '1' and tonumber(rec[3] or '0') > tonumber(ARGV[3]) then
      return refuse('fenced')
    end
  elseif rec[1] ~= ARGV[2] then
    return refuse('fenced')
  end
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  local ends = redis.call('HGET', KEYS[6], ARGV[5])
  if ends and tonumber(ends) <= tonumber(ARGV[8]) then
    -- Past its TTL: gone for readers, so this put replaces it.
    local old = redis.call('STRLEN', KEYS[1])
    redis.call('DEL', KEYS[1])
    redis.call('ZREM', KEYS[2], ARGV[5])
    redis.call('HDEL', KEYS[6], ARGV[5])
    redis.call('HINCRBY', KEYS[3], 'bytes', -old)
    redis.call('HINCRBY', KEYS[3], 'blocks', -1)
  else
    redis.call('ZADD', KEYS[2], redis.call('HINCRBY', KEYS[3], 'seq', 1), ARGV[5])
    return refuse('exists')
  end
end
local cap = tonumber(ARGV[4])
if size > cap then return refuse('too_large') end
local used = tonumber(redis.call('HGET', KEYS[3], 'bytes') or '0')
while used + size > cap do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #oldest == 0 then break end
  local victim = ARGV[6] .. oldest[1]
  local vlen = redis.call('STRLEN', victim)
  redis.call('ZREM', KEYS[2], oldest[1])
  redis.call('HDEL', KEYS[6], oldest[1])
  if redis.call('DEL', victim) == 1 then
    used = used - vlen
    gone[#gone + 1] = oldest[1]
    redis.call('HINCRBY', KEYS[3], 'blocks', -1)
  end
end
if used + size > cap then
  redis.call('HSET', KEYS[3], 'bytes', used)
  return refuse('no_room')
end
redis.call('RENAME', KEYS[5], KEYS[1])
redis.call('PERSIST', KEYS[1])
if ARGV[7] ~= '' then
  redis.call('HSET', KEYS[6], ARGV[5], ARGV[7])
else
  redis.call('HDEL', KEYS[6], ARGV[5])
end
redis.call('ZADD', KEYS[2], redis.call('HINCRBY', KEYS[3], 'seq', 1), ARGV[5])
redis.call('HSET', KEYS[3], 'bytes', used + size)
redis.call('HINCRBY', KEYS[3], 'blocks', 1)
if #gone > 0 then redis.call('HINCRBY', KEYS[3], 'evictions', #gone) end
return {'stored', #gone, gone}
"""

# KEYS: lru, meta; ARGV: member. A read is an access: it refreshes the shared LRU order. XX: a
# block deleted between the GET and this script stays out of the order.
_TOUCH = """
return redis.call('ZADD', KEYS[1], 'XX', redis.call('HINCRBY', KEYS[2], 'seq', 1), ARGV[1])
"""

# KEYS: lru, meta; ARGV: members, oldest access first. Reads a gateway served from its own
# tiers, refreshed in one call; XX leaves out a block the shared tier no longer holds.
_TOUCH_MANY = """
local base = redis.call('HINCRBY', KEYS[2], 'seq', #ARGV) - #ARGV
for i, member in ipairs(ARGV) do redis.call('ZADD', KEYS[1], 'XX', base + i, member) end
return #ARGV
"""
TOUCH_BATCH = 512
"""Most local hits refreshed in one Redis call."""

# KEYS: block, lru, meta, expiry hash; ARGV: member
_DELETE = """
local size = redis.call('STRLEN', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
if redis.call('DEL', KEYS[1]) == 1 then
  redis.call('HINCRBY', KEYS[3], 'bytes', -size)
  redis.call('HINCRBY', KEYS[3], 'blocks', -1)
  return 1
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Fence:
    """A condition a put must meet in the same atomic step that publishes its block.

    ``record`` names a Redis hash with the fields ``token`` (decimal), ``live`` (``1`` while a
    writer holds the key) and ``deadline_ms`` (wall-clock ms when that hold ends). With
    ``token=None`` the put is admitted only while no live hold stands; with a token, only while
    the record's token is that token (the newest ever granted for the key).
    """

    record: str
    token: int | None
    now_ms: int


@dataclass(frozen=True, slots=True)
class RemoteSettings:
    url: str
    capacity_bytes: int
    prefix: str = DEFAULT_PREFIX
    level: int = DEFAULT_LEVEL


class RemoteTier:
    """A byte store in Redis with a shared budget and LRU order; see the module docstring.

    Not a :class:`~tiers.base.Tier`: it is shared, so whether it holds a key is a question to
    Redis (async), not to this process's index. The hierarchy consults it below its own tiers.
    """

    name = REMOTE_TIER
    volatile = False

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        capacity_bytes: int,
        device: str,
        prefix: str = DEFAULT_PREFIX,
        level: int = DEFAULT_LEVEL,
        clock: Clock = SYSTEM_CLOCK,
        executor: Executor | None = None,
    ) -> None:
        if capacity_bytes < 1:
            raise TierConfigError(f"remote capacity must be positive, got {capacity_bytes}")
        self._client = client
        self.capacity_bytes = capacity_bytes
        self.device = device
        self.prefix = prefix
        self._level = level
        self._clock = clock
        self._executor = executor
        self._block_prefix = f"{prefix}:blk:"
        self._lru = f"{prefix}:lru"
        self._meta = f"{prefix}:meta"
        self._exp = f"{prefix}:exp"
        self._put = client.register_script(_PUT)
        self._touch = client.register_script(_TOUCH)
        self._touch_many = client.register_script(_TOUCH_MANY)
        # Local hits not yet told to Redis, oldest first (a dict as an ordered set).
        self._accessed: dict[str, None] = {}
        self._toucher: asyncio.Task[None] | None = None
        self.touch_failures = 0
        self._stage_prefix = f"{prefix}:stage:"
        self._delete = client.register_script(_DELETE)
        self._hits = 0
        self._misses = 0
        self._used = 0
        self._blocks = 0
        self._evictions = 0
        self.on_evict: Callable[[list[str]], None] | None = None
        """Called with the keys a put of this gateway evicted from the shared tier, so the
        local copies go too (every gateway's: see ``gateway.coherent``). A key kept locally
        after Redis lost it would let another gateway store different bytes under it, and two
        versions of one block be served."""

    @classmethod
    async def connect(
        cls,
        settings: RemoteSettings,
        *,
        clock: Clock = SYSTEM_CLOCK,
        executor: Executor | None = None,
    ) -> RemoteTier:
        """Connect and check Redis answers; :class:`TierIOError` when it does not."""
        # A blocking pool: past its size a call waits for a connection (up to the timeout)
        # instead of failing with "Too many connections" under a burst of requests. A
        # connection Redis dropped (a restart, a network blip) is retried on a fresh one, so
        # the first call after the blip does not fail.
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.url,
            max_connections=POOL_CONNECTIONS,
            timeout=POOL_WAIT_S,
            decode_responses=False,
            retry=Retry(ExponentialBackoff(cap=0.25, base=0.01), RETRIES),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        client = aioredis.Redis.from_pool(pool)
        try:
            await client.ping()
        except (RedisError, OSError) as exc:
            await client.aclose()
            raise TierIOError(f"cannot reach the remote tier at {settings.url}: {exc}") from exc
        tier = cls(
            client,
            capacity_bytes=settings.capacity_bytes,
            device=_redacted(settings.url),
            prefix=settings.prefix,
            level=settings.level,
            clock=clock,
            executor=executor,
        )
        await tier.refresh()
        return tier

    @property
    def client(self) -> aioredis.Redis:
        return self._client

    def block_key(self, key: str) -> str:
        return self._block_prefix + key

    # -- the store ---------------------------------------------------------------------------

    async def get(self, key: str) -> Block | None:
        """The block, or ``None``; a corrupt or expired one is deleted and missed."""
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.get(self.block_key(key))
                await self._touch(keys=[self._lru, self._meta], args=[key], client=pipe)
                frame, _ = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise TierIOError(f"remote get failed: {exc}") from exc
        if frame is None:
            self._misses += 1
            return None
        try:
            if frame_is_raw(frame):
                # A checksum at memory speed costs less than the hop to a pool thread.
                block = decode_frame(frame, owned=True)
            else:
                block = await self._codec(partial(decode_frame, owned=True), frame, len(frame))
        except CorruptBlock:
            log.warning("remote block failed its integrity check; dropped")
            await self.delete(key)
            self._misses += 1
            raise
        if block.meta.expired(self._clock.time()):
            await self.delete(key)
            self._misses += 1
            return None
        self._hits += 1
        return block

    def note_access(self, key: str) -> None:
        """A read this gateway served from its own tiers is an access of the shared block too.

        Without it a block hot on one gateway looks cold in the shared order and leaves Redis
        first, so every other gateway misses it. Batched: one call in flight at a time carries
        every hit noted meanwhile, so under load the cost is a call per round trip, not per hit.
        """
        self._accessed.pop(key, None)
        self._accessed[key] = None
        if self._toucher is None or self._toucher.done():
            self._toucher = asyncio.get_running_loop().create_task(self._tell_accesses())

    async def flush_accesses(self) -> None:
        """Wait until every access noted so far has reached Redis (or failed to)."""
        while self._toucher is not None and not self._toucher.done():
            await asyncio.shield(self._toucher)

    async def _tell_accesses(self) -> None:
        while self._accessed:
            members = list(itertools.islice(self._accessed, TOUCH_BATCH))
            for member in members:
                del self._accessed[member]
            try:
                await self._touch_many(keys=[self._lru, self._meta], args=members)
            except (RedisError, OSError) as exc:
                # A recency hint: losing one only makes the order a little less exact.
                self.touch_failures += 1
                log.debug("remote tier failed refreshing %d accesses: %s", len(members), exc)

    async def put(self, key: str, block: Block, *, fence: Fence | None = None) -> PutOutcome:
        """Store unless present (first writer wins), evicting the shared LRU tail for room."""
        frame = await self._codec(self._encode, block, block.meta.size)
        mode, token, record, now_ms = "", "", self.block_key(key), 0
        if fence is not None:
            mode = "free" if fence.token is None else "token"
            token = "" if fence.token is None else str(fence.token)
            record, now_ms = fence.record, fence.now_ms
        stage = f"{self._stage_prefix}{uuid.uuid4().hex}"
        ends = block.meta.expires_at
        ends_ms = "" if ends is None else str(math.ceil(ends * 1000))
        wall_ms = int(self._clock.time() * 1000)
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.set(stage, frame, px=STAGE_TTL_MS)
                await self._put(
                    keys=[self.block_key(key), self._lru, self._meta, record, stage, self._exp],
                    args=[
                        mode,
                        token,
                        now_ms,
                        self.capacity_bytes,
                        key,
                        self._block_prefix,
                        ends_ms,
                        wall_ms,
                    ],
                    client=pipe,
                )
                _, answer = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise TierIOError(f"remote put failed: {exc}") from exc
        text = reply_text(answer[0])
        if text == "lost":
            # Only an eviction policy other than noeviction can drop the staged frame this fast.
            raise TierIOError("remote put failed: Redis dropped the staged frame (maxmemory?)")
        outcome = _OUTCOMES[text]
        self._evictions += int(answer[1])
        if answer[1] and self.on_evict is not None:
            self.on_evict([reply_text(member) for member in answer[2]])
        if outcome is PutOutcome.STORED:
            self._used += len(frame)
            self._blocks += 1
        return outcome

    async def delete(self, key: str) -> bool:
        try:
            removed = await self._delete(
                keys=[self.block_key(key), self._lru, self._meta, self._exp], args=[key]
            )
        except (RedisError, OSError) as exc:
            raise TierIOError(f"remote delete failed: {exc}") from exc
        return bool(removed)

    async def present(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key is stored and within its TTL, in one round trip."""
        if not keys:
            return []
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.exists(self.block_key(key))
                pipe.hmget(self._exp, list(keys))
                answers: list[Any] = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise TierIOError(f"remote lookup failed: {exc}") from exc
        now_ms = self._clock.time() * 1000
        ends: list[bytes | None] = answers[-1]
        return [
            bool(n) and (end is None or int(end) > now_ms)
            for n, end in zip(answers[:-1], ends, strict=True)
        ]

    # -- stats and lifecycle -----------------------------------------------------------------

    async def refresh(self) -> None:
        """Read the shared totals (bytes, blocks, evictions) for :meth:`stats`."""
        try:
            fields = await self._client.hmget(self._meta, ["bytes", "blocks", "evictions"])
        except (RedisError, OSError) as exc:
            raise TierIOError(f"remote stats failed: {exc}") from exc
        used, blocks, evictions = (int(v) if v is not None else 0 for v in fields)
        self._used, self._blocks, self._evictions = used, blocks, evictions

    def stats(self) -> TierStats:
        """Shared totals as last read (:meth:`refresh`); hits and misses are this gateway's."""
        return TierStats(
            name=self.name,
            device=self.device,
            capacity_bytes=self.capacity_bytes,
            used_bytes=self._used,
            blocks=self._blocks,
            hits=self._hits,
            misses=self._misses,
            evictions=self._evictions,
        )

    async def close(self) -> None:
        await self.flush_accesses()
        await self._client.aclose()

    # -- internals ---------------------------------------------------------------------------

    def _encode(self, block: Block) -> bytes:
        return encode_frame(block, level=self._level)

    async def _codec(self, fn: Callable[[_A], _R], arg: _A, size: int) -> _R:
        if size < _INLINE_CODEC_BYTES:
            return fn(arg)
        # zstd and xxh3 release the GIL: a pool thread keeps the loop serving meanwhile.
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, arg)


_OUTCOMES = {
    "stored": PutOutcome.STORED,
    "exists": PutOutcome.EXISTS,
    "no_room": PutOutcome.NO_ROOM,
    "too_large": PutOutcome.TOO_LARGE,
    "fenced": PutOutcome.FENCED,
}


def reply_text(value: object) -> str:
    """A Redis reply (bytes, or str with decode_responses) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _redacted(url: str) -> str:
    """The URL without a password, for ``/v1/stats``."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
