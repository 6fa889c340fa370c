"""redis-server through redis-py asyncio with a blocking connection pool."""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as aioredis

from loadtest.targets.base import GetResult, PutStatus


class RedisTarget:
    def __init__(self, url: str, *, concurrency: int, name: str = "redis") -> None:
        self.name = name
        # Blocking pool sized to the workers: a worker waits for a connection rather than
        # opening one more, the same discipline as the HTTP connector limit.
        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=concurrency)
        self._redis = aioredis.Redis(connection_pool=pool)

    async def put(self, key: str, value: bytes) -> PutStatus:
        # SET NX: first writer wins, the same contract as kvgate's content-addressed PUT.
        stored = await self._redis.set(key, value, nx=True)
        return PutStatus.STORED if stored else PutStatus.EXISTS

    async def get(self, key: str) -> GetResult:
        value = await self._redis.get(key)
        # The client is made without decode_responses, so values come back as bytes.
        assert value is None or isinstance(value, bytes)
        return GetResult(value, self.name)

    async def lookup(self, keys: Sequence[str]) -> int:
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            pipe.exists(key)
        present = await pipe.execute()
        hits = 0
        for found in present:
            if not found:
                break
            hits += 1
        return hits

    async def close(self) -> None:
        await self._redis.aclose()
        await self._redis.connection_pool.disconnect()
