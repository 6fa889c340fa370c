"""Cross-gateway reads through the shared remote tier, side by side with plain Redis.

Two ``kvgate serve --remote`` gateways share one redis-server. Gateway A stores N blocks
(timed: every PUT is written through to Redis); then 16 concurrent aiohttp clients read each
block once through gateway B, so every read is a remote hit (Redis -> frame check -> HTTP
body). In the same run, redis-py asyncio SETs and then GETs the same number of raw values of the
same size in the same redis-server, with the same concurrency: what a frontend would get using
Redis as its plain remote store (no checksums, no tiers, no fencing). Alternating rounds with
fresh keys each; medians.

    python -m loadtest.remote_bench [--blocks 256] [--block-size 1MiB] [--concurrency 16]
        [--rounds 3]

Prints progress on stderr and one JSON object as the last line of stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from functools import partial

import aiohttp
import redis.asyncio as aioredis

from loadtest.procs import KvgateSizes, kvgate_server, redis_server
from loadtest.sizes import parse_size


async def _gather_limited(jobs: Sequence[Callable[[], Awaitable[int]]], limit: int) -> int:
    queue = list(jobs)
    total = 0

    async def worker() -> None:
        nonlocal total
        while queue:
            job = queue.pop()
            # Not `total += await job()`: that reads `total` before the await, so the workers
            # would overwrite each other's counts.
            done = await job()
            total += done

    await asyncio.gather(*(worker() for _ in range(limit)))
    return total


async def _gbps(job: Callable[[str], Awaitable[int]], keys: Sequence[str], limit: int) -> float:
    """Run ``job`` once per key, ``limit`` at a time; the bytes it moved per second, in GB/s."""
    started = time.perf_counter()
    nbytes = await _gather_limited([partial(job, k) for k in keys], limit)
    return nbytes / (time.perf_counter() - started) / 1e9


async def _kvgate_round(
    http: aiohttp.ClientSession, a: str, b: str, *, tag: str, blocks: int, body: bytes, limit: int
) -> tuple[float, float]:
    """(write-through PUT GB/s through A, remote-hit GET GB/s through B)."""
    keys = [f"r{tag}.{i}" for i in range(blocks)]

    async def put(key: str) -> int:
        async with http.put(f"{a}/v1/blocks/{key}", data=body) as resp:
            assert resp.status == 201, resp.status
        return len(body)

    put_gbps = await _gbps(put, keys, limit)

    async def get(key: str) -> int:
        async with http.get(f"{b}/v1/blocks/{key}") as resp:
            data = await resp.read()
            assert resp.status == 200 and resp.headers["X-KV-Tier"] == "remote"
        return len(data)

    return put_gbps, await _gbps(get, keys, limit)


async def _redis_round(
    client: aioredis.Redis, *, tag: str, blocks: int, body: bytes, limit: int
) -> tuple[float, float]:
    """(SET GB/s, GET GB/s) of raw values."""
    keys = [f"plain{tag}.{i}" for i in range(blocks)]

    async def put(key: str) -> int:
        await client.set(key, body)
        return len(body)

    put_gbps = await _gbps(put, keys, limit)

    async def get(key: str) -> int:
        data = await client.get(key)
        assert data is not None
        return len(data)

    get_gbps = await _gbps(get, keys, limit)
    await client.delete(*keys)
    return put_gbps, get_gbps


async def run(*, blocks: int, block_size: int, concurrency: int, rounds: int) -> dict[str, object]:
    # Random bytes: neither side gets a compression advantage.
    body = os.urandom(block_size)
    budget = 4 * blocks * block_size * rounds
    async with AsyncExitStack() as stack:
        # Headroom over the tier's budget: Redis's LRU must never evict the plain keys mid-round.
        url = await stack.enter_async_context(redis_server(max_bytes=2 * budget + (256 << 20)))
        args = ["--remote", url, "--remote-bytes", str(budget), "--no-shm"]
        a = await stack.enter_async_context(kvgate_server(sizes=KvgateSizes(), extra_args=args))
        b = await stack.enter_async_context(kvgate_server(sizes=KvgateSizes(), extra_args=args))
        http = await stack.enter_async_context(
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency))
        )
        client = aioredis.Redis.from_url(url, max_connections=concurrency)
        stack.push_async_callback(client.aclose)
        kv: list[float] = []
        plain: list[float] = []
        kv_put: list[float] = []
        plain_put: list[float] = []
        for r in range(rounds):
            wrote, read = await _kvgate_round(
                http, a, b, tag=str(r), blocks=blocks, body=body, limit=concurrency
            )
            kv_put.append(wrote)
            kv.append(read)
            wrote, read = await _redis_round(
                client, tag=str(r), blocks=blocks, body=body, limit=concurrency
            )
            plain_put.append(wrote)
            plain.append(read)
            print(
                f"round {r + 1}/{rounds}: kvgate remote hit {kv[-1]:.3f} GB/s, "
                f"redis-py GET {plain[-1]:.3f} GB/s; kvgate write-through PUT "
                f"{kv_put[-1]:.3f} GB/s, redis-py SET {plain_put[-1]:.3f} GB/s",
                file=sys.stderr,
            )
    kv_med, plain_med = statistics.median(kv), statistics.median(plain)
    put_med, set_med = statistics.median(kv_put), statistics.median(plain_put)
    return {
        "scenario": "remote-get",
        "blocks": blocks,
        "block_size": block_size,
        "concurrency": concurrency,
        "rounds": rounds,
        "kvgate_remote_gbps": kv,
        "redis_get_gbps": plain,
        "kvgate_remote_gbps_median": kv_med,
        "redis_get_gbps_median": plain_med,
        "ratio": kv_med / plain_med if plain_med else None,
        "kvgate_put_gbps": kv_put,
        "redis_set_gbps": plain_put,
        "put_ratio": put_med / set_med if set_med else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.remote_bench",
        description="Reads through the shared remote tier (gateway B reading what gateway A "
        "stored) against plain redis-py GETs from the same redis-server.",
    )
    parser.add_argument("--blocks", type=int, default=256, help="blocks per round (256)")
    parser.add_argument("--block-size", default="1MiB", help="block size (1MiB)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent clients (16)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (3)")
    args = parser.parse_args(argv)
    result = asyncio.run(
        run(
            blocks=args.blocks,
            block_size=parse_size(args.block_size),
            concurrency=args.concurrency,
            rounds=args.rounds,
        )
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
