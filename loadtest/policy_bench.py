"""Per-access cost of each eviction policy: offline (ns/op) and in the live tier.

Offline (default): each op is one access as the hierarchy drives it: ``on_hit`` for a resident
block, otherwise ``on_miss`` + ``admit`` + (when full) ``victim`` + ``on_remove`` +
``on_insert``. Keys follow a skewed chain workload so hits, misses and evictions all happen.

    python -m loadtest.policy_bench [--ops 200000] [--capacity 10000]

Live (``--live``): one real gateway per policy (``gateway.cli serve --hbm-policy P
--dram-policy P --disk-policy P``), all loaded with the hot-GET scenario in alternating rounds
(loadtest.matrix), so throughput ratios between policies come from one noisy run. With
``--timing`` every server also runs with ``TIERS_POLICY_TIMING`` set (tiers/policies/timing.py)
and the time spent inside policy calls is reported per GET.

    python -m loadtest.policy_bench --live [--timing] [--rounds 5] [--duration 3]
        [--block-size 1MiB] [--policy lru --policy prefix-lru2 ...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from loadtest import procs
from loadtest.driver import Load
from loadtest.matrix import Entry, run_rounds
from loadtest.recorder import RunResult
from loadtest.scenarios import Params
from loadtest.sizes import parse_size
from loadtest.targets import KvgateTarget, Target
from tiers.policy import TIMING_ENV_VAR, Access, make_policy, policy_names


def workload(ops: int, seed: int = 1) -> list[Access]:
    rng = random.Random(seed)
    out: list[Access] = []
    now = 0.0
    chains = max(100, ops // 10)  # enough distinct chains that misses and evictions happen
    while len(out) < ops:
        # half from a skewed hot set that returns, half spread over many chains (mostly cold)
        hot = rng.random() < 0.5
        chain = int(rng.paretovariate(1.0)) % 1000 if hot else rng.randrange(chains)
        length = 4 + chain % 29
        now += 0.01
        prev = None
        for depth in range(length):
            key = f"c{chain}:{depth}"
            out.append(Access(key, 1, now, depth, prev))
            prev = key
    return out[:ops]


def bench(name: str, accesses: list[Access], capacity: int) -> dict[str, float]:
    policy = make_policy(name)
    resident: set[str] = set()
    hits = 0
    start = time.perf_counter_ns()
    for a in accesses:
        if a.key in resident:
            hits += 1
            policy.on_hit(a)
            continue
        policy.on_miss(a)
        if not policy.admit(a):
            continue
        if len(resident) >= capacity:
            victim = policy.victim(None)
            if victim is None:
                continue
            resident.discard(victim)
            policy.on_remove(victim)
        resident.add(a.key)
        policy.on_insert(a)
    elapsed = time.perf_counter_ns() - start
    return {"ns_per_op": elapsed / len(accesses), "hit_ratio": hits / len(accesses)}


LIVE_DEFAULT = ("lru", "chain-lru", "prefix-lru2", "prefix-adaptive", "w-tinylfu", "ttl")


def _policy_args(policy: str) -> list[str]:
    return [f"--{tier}-policy={policy}" for tier in ("hbm", "dram", "disk")]


def timing_summary(report: dict[str, Any]) -> dict[str, Any]:
    """What a hot GET pays in policy code, from one server's timing report
    (tiers/policies/timing.py). Every hot GET hits the hot tier: one ``on_hit`` there, nothing
    in the other tiers. Net figures subtract the clock floor (an empty timed interval)."""
    floor = float(report["clock_floor_ns"])
    hot = report["policies"][0]["methods"]["on_hit"]
    others = sum(p["ns"] for p in report["policies"]) - hot["ns"]
    return {
        "on_hit_calls": hot["calls"],
        "on_hit_mean_ns": hot["ns_per_call"] - floor,
        "on_hit_p50_ns": hot["p50_ns"] - floor,
        "on_hit_p90_ns": hot["p90_ns"] - floor,
        "other_calls_ns": others,
        "clock_floor_ns": floor,
    }


async def live(args: argparse.Namespace) -> dict[str, Any]:
    policies = args.policy or list(LIVE_DEFAULT)
    params = Params(block_size=args.block_size, key_count=args.keys)
    load = Load(concurrency=args.concurrency, duration_s=args.duration, warmup_s=0.5)
    sizes = procs.KvgateSizes(hbm_bytes="256MiB", dram_bytes="256MiB", disk_bytes="1GiB")
    with tempfile.TemporaryDirectory(prefix="kvgate-policy-timing-") as tmp:
        reports = Path(tmp)
        results: list[RunResult] = []
        async with contextlib.AsyncExitStack() as stack:
            targets: list[Target] = []
            for policy in policies:
                # The child copies os.environ when it starts: set the report path for this one only.
                if args.timing:
                    os.environ[TIMING_ENV_VAR] = str(reports / f"{policy}.json")
                try:
                    url = await stack.enter_async_context(
                        procs.kvgate_server(sizes=sizes, extra_args=_policy_args(policy))
                    )
                finally:
                    os.environ.pop(TIMING_ENV_VAR, None)
                target = KvgateTarget(policy, url, concurrency=args.concurrency)
                stack.push_async_callback(target.close)
                targets.append(target)
            results = await run_rounds(
                [Entry("hot-get", params, load)], targets, rounds=args.rounds, progress=None
            )
        # The servers have exited (SIGTERM, clean shutdown): their timing reports are written.
        out: dict[str, Any] = {}
        for policy in policies:
            runs = [r for r in results if r.target == policy]
            row: dict[str, Any] = {
                "ops_per_s_rounds": [round(r.ops_per_s) for r in runs],
                "ops_per_s": statistics.median(r.ops_per_s for r in runs),
                "p50_ms": statistics.median(r.latency_ms.get("p50", 0.0) for r in runs),
                "gets": sum(r.ops for r in runs),
            }
            path = reports / f"{policy}.json"
            if args.timing and path.exists():
                row["timing"] = timing_summary(json.loads(path.read_text()))
            out[policy] = row
    # Paired ratios: each round's throughput over the baseline's in the same round (the
    # rounds rotate the order, so a pair ran back to back), then the median over rounds. On a
    # shared machine the load of other processes moves whole rounds by 2-3x; pairing cancels it.
    base = "lru" if "lru" in out else policies[0]
    by_round = {(r.target, r.round): r.ops_per_s for r in results}
    for policy, row in out.items():
        pairs = [
            by_round[(policy, n)] / by_round[(base, n)]
            for n in range(args.rounds)
            if by_round.get((base, n)) and (policy, n) in by_round
        ]
        row["vs_lru_rounds"] = [round(x, 3) for x in pairs]
        row["vs_lru"] = statistics.median(pairs) if pairs else None
    return out


def print_live(out: dict[str, Any]) -> None:
    print(f"{'policy':12s} {'GET/s':>8s} {'x lru':>6s} {'p50 ms':>7s}  on_hit ns: p50 p90 mean")
    for name, row in out.items():
        t = row.get("timing")
        cost = (
            f"{t['on_hit_p50_ns']:.0f} {t['on_hit_p90_ns']:.0f} {t['on_hit_mean_ns']:.0f}"
            if t
            else "-"
        )
        print(
            f"{name:12s} {row['ops_per_s']:8.0f} {row['vs_lru']:6.3f} {row['p50_ms']:7.3f}  {cost}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="policy_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ops", type=int, default=200_000)
    p.add_argument("--capacity", type=int, default=10_000)
    p.add_argument("--policy", action="append", help="policy to run (default: all)")
    g = p.add_argument_group("live (hot-GET against one real gateway per policy)")
    g.add_argument("--live", action="store_true", help="measure in live gateways")
    g.add_argument("--timing", action="store_true", help=f"set {TIMING_ENV_VAR} in the servers")
    g.add_argument("--rounds", type=int, default=5)
    g.add_argument("--duration", type=float, default=3.0, metavar="S", help="seconds per round")
    g.add_argument("--block-size", type=parse_size, default=parse_size("1MiB"))
    g.add_argument("--keys", type=int, default=64, help="hot working set (64)")
    g.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args(argv)
    if args.live:
        out = asyncio.run(live(args))
        print_live(out)
        print(json.dumps({"live": True, "timing": args.timing, "results": out}))
        return 0
    accesses = workload(args.ops)
    results = {}
    for name in args.policy or policy_names():
        r = bench(name, accesses, args.capacity)
        results[name] = r
        print(f"{name:12s} {r['ns_per_op']:8.0f} ns/op  hit ratio {r['hit_ratio']:.3f}")
    print(json.dumps({"ops": args.ops, "capacity": args.capacity, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
