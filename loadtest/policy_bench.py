"""Per-access cost of each eviction policy (ns/op), on the live call pattern.

Each op is one access as the hierarchy drives it: ``on_hit`` for a resident block, otherwise
``on_miss`` + ``admit`` + (when full) ``victim`` + ``on_remove`` + ``on_insert``. Keys follow a
skewed chain workload so hits, misses and evictions all happen.

    python -m loadtest.policy_bench [--ops 200000] [--capacity 10000]
"""

from __future__ import annotations

import argparse
import json
import random
import time

from tiers.policy import Access, make_policy, policy_names


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="policy_bench", description=__doc__)
    p.add_argument("--ops", type=int, default=200_000)
    p.add_argument("--capacity", type=int, default=10_000)
    p.add_argument("--policy", action="append", help="policy to run (default: all)")
    args = p.parse_args(argv)
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
