"""``kvgate replay``: replay a Mooncake-format trace through the policies or against a server.

``--simulate`` runs the real policy objects (``tiers.policy``) over the trace with a FakeClock
and no server; ``--server URL`` drives a live gateway over its REST API. Either way the LAST
line of stdout is one JSON object holding at least ``prefix_hit_ratio`` and ``policy``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import TextIO

from loadtest.simulate import TierSpec, TraceRequest, distinct_blocks, read_trace, simulate
from tiers.policy import DEFAULT_POLICY, policy_names


def _progress_bar(stream: TextIO) -> Callable[[int, int], None] | None:
    """A one-line bar on a TTY, nothing otherwise (logs stay clean)."""
    if not stream.isatty():
        return None
    state = {"shown": -1}

    def show(done: int, total: int) -> None:
        pct = 100 * done // max(total, 1)
        if pct == state["shown"] and done != total:
            return
        state["shown"] = pct
        filled = pct * 30 // 100
        stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {pct:3d}% {done}/{total}")
        if done == total:
            stream.write("\n")
        stream.flush()

    return show


def parse_tiers(spec: str) -> list[TierSpec]:
    """``hbm=1000,dram=4000,disk=20000`` -> tier specs, hottest first."""
    out: list[TierSpec] = []
    for part in spec.split(","):
        name, sep, cap = part.strip().partition("=")
        if not sep or not name:
            raise ValueError(f"bad tier {part!r}: expected NAME=BLOCKS")
        blocks = int(cap)
        if blocks < 0:
            raise ValueError(f"tier {name!r}: capacity must be >= 0")
        out.append(TierSpec(name, blocks))
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvgate replay", description=__doc__)
    p.add_argument("--trace", required=True, help="Mooncake-format JSONL trace")
    p.add_argument("--simulate", action="store_true", help="no server: simulate the policies")
    p.add_argument(
        "--policy",
        default=None,
        help=f"policy name (default {DEFAULT_POLICY}); "
        f"one of {', '.join([*policy_names(), 'belady'])}",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--capacity-blocks", type=int, help="one tier of N blocks")
    size.add_argument(
        "--capacity-fraction",
        type=float,
        help="one tier holding this fraction of the trace's distinct blocks",
    )
    size.add_argument("--tiers", help="several tiers: hbm=1000,dram=4000,disk=20000 (blocks)")
    p.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    p.add_argument("--server", help="live gateway base URL (without --simulate)")
    p.add_argument("--block-bytes", type=int, default=4096, help="synthesized block size")
    p.add_argument("--speedup", type=float, default=1.0, help="compress trace time by this")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight at most")
    p.add_argument("--read-hits", action="store_true", help="also GET the hit blocks")
    p.add_argument("--token", default=None, help="bearer token for a gateway with tenants")
    return p


def _specs(args: argparse.Namespace, trace: list[TraceRequest]) -> list[TierSpec]:
    if args.tiers:
        return parse_tiers(args.tiers)
    if args.capacity_fraction is not None:
        if not 0 <= args.capacity_fraction <= 1:
            raise ValueError("--capacity-fraction must be within [0, 1]")
        return [TierSpec("cache", int(args.capacity_fraction * distinct_blocks(trace)))]
    if args.capacity_blocks is not None:
        if args.capacity_blocks < 0:
            raise ValueError("--capacity-blocks must be >= 0")
        return [TierSpec("cache", args.capacity_blocks)]
    raise ValueError("--simulate needs --capacity-blocks, --capacity-fraction or --tiers")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        trace = read_trace(args.trace)
    except (OSError, ValueError) as exc:
        print(f"kvgate replay: {exc}", file=sys.stderr)
        return 2
    if args.limit is not None:
        trace = trace[: args.limit]
    policy = args.policy or DEFAULT_POLICY
    if policy != "belady" and policy not in policy_names():
        print(
            f"kvgate replay: unknown policy {policy!r}; choose one of "
            f"{', '.join([*policy_names(), 'belady'])}",
            file=sys.stderr,
        )
        return 2
    started = time.perf_counter()
    if args.simulate:
        try:
            specs = _specs(args, trace)
        except ValueError as exc:
            print(f"kvgate replay: {exc}", file=sys.stderr)
            return 2
        result = simulate(trace, specs, policy, progress=_progress_bar(sys.stderr))
        result["mode"] = "simulate"
    else:
        if not args.server:
            print("kvgate replay: give --simulate or --server URL", file=sys.stderr)
            return 2
        result = asyncio.run(replay_http(trace, args, progress=_progress_bar(sys.stderr)))
        result["policy"] = "server"
    result["elapsed_s"] = round(time.perf_counter() - started, 3)
    result["trace"] = str(args.trace)
    print(json.dumps(result, sort_keys=True))
    return 0


def _block_bytes(key: str, size: int) -> bytes:
    seed = hashlib.blake2b(key.encode(), digest_size=32).digest()
    reps = size // len(seed) + 1
    return (seed * reps)[:size]


async def replay_http(
    trace: Sequence[TraceRequest],
    args: argparse.Namespace,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, object]:
    """Replay against a live gateway: lookup, PUT the missing blocks, optionally GET the hits."""
    import aiohttp

    base = args.server.rstrip("/")
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    speedup = max(args.speedup, 1e-9)
    sem = asyncio.Semaphore(max(1, args.concurrency))
    latencies: dict[str, list[float]] = defaultdict(list)
    stats = {"requested": 0, "prefix_hits": 0, "puts": 0, "errors": 0, "done": 0}
    tier_hits: dict[str, int] = defaultdict(int)
    t0_trace = trace[0].timestamp_ms if trace else 0.0

    async def one(session: aiohttp.ClientSession, req: TraceRequest) -> None:
        async with sem:
            try:
                t = time.perf_counter()
                async with session.post(f"{base}/v1/lookup", json={"keys": list(req.keys)}) as r:
                    body = await r.json() if r.status == 200 else {}
                latencies["lookup"].append(time.perf_counter() - t)
                n = int(body.get("prefix_hits", 0)) if isinstance(body, dict) else 0
                tiers = body.get("tiers", []) if isinstance(body, dict) else []
                stats["requested"] += len(req.keys)
                stats["prefix_hits"] += n
                for tier in tiers[:n]:
                    tier_hits[str(tier)] += 1
                if args.read_hits:
                    for key in req.keys[:n]:
                        t = time.perf_counter()
                        async with session.get(f"{base}/v1/blocks/{key}") as r:
                            await r.read()
                            tier = r.headers.get("X-KV-Tier", "miss" if r.status == 404 else "?")
                        latencies[f"get:{tier}"].append(time.perf_counter() - t)
                for key in req.keys[n:]:
                    t = time.perf_counter()
                    data = _block_bytes(key, args.block_bytes)
                    async with session.put(f"{base}/v1/blocks/{key}", data=data) as r:
                        await r.read()
                        if r.status >= 400:
                            stats["errors"] += 1
                    latencies["put"].append(time.perf_counter() - t)
                    stats["puts"] += 1
            except (TimeoutError, aiohttp.ClientError, ValueError):
                stats["errors"] += 1
            stats["done"] += 1
            if progress is not None:
                progress(stats["done"], len(trace))

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
        start = time.perf_counter()
        tasks: list[asyncio.Task[None]] = []
        for req in trace:
            due = (req.timestamp_ms - t0_trace) / 1000.0 / speedup
            delay = due - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(session, req)))
        await asyncio.gather(*tasks)

    def summary(xs: list[float]) -> dict[str, float]:
        xs = sorted(xs)
        return {
            "count": len(xs),
            "p50_ms": 1000 * xs[len(xs) // 2],
            "p99_ms": 1000 * xs[min(len(xs) - 1, int(len(xs) * 0.99))],
        }

    requested = stats["requested"]
    return {
        "mode": "server",
        "server": base,
        "prefix_hit_ratio": stats["prefix_hits"] / requested if requested else 0.0,
        "hits": stats["prefix_hits"],
        "requested_blocks": requested,
        "requests": len(trace),
        "puts": stats["puts"],
        "errors": stats["errors"],
        "tier_hits": dict(tier_hits),
        "latency": {name: summary(xs) for name, xs in latencies.items() if xs},
    }


if __name__ == "__main__":
    raise SystemExit(main())
