"""The standard benchmark: every scenario against kvgate and each peer, in alternating rounds.

    python -m loadtest.bench --standard                 # what `make bench` runs (~4-5 min)
    python -m loadtest.bench --standard --targets dict,redis,mooncake --rounds 1

Starts every server itself (kvgate via `python -m gateway.cli serve` on a free port with a
scratch --data-dir; redis-server; the dict server; mooncake_master) and stops them at the end.
A peer that cannot start is skipped with the reason; kvgate failing to start fails the run.
Prints throughput/latency per target and the ratios kvgate/redis, kvgate/dict, kvgate/mooncake;
writes results.json, summary.md and PNG plots under loadtest/results/<timestamp>/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from dataclasses import replace

from loadtest import report
from loadtest.cli_common import (
    add_output_options,
    add_target_options,
    apply_client_malloc,
    environment,
    known_targets,
    results_dir,
    target_options,
)
from loadtest.driver import Load
from loadtest.matrix import Entry, open_targets, run_rounds
from loadtest.scenarios import SCENARIOS, Params
from loadtest.sizes import format_size, parse_size

STANDARD_TARGETS = (
    "kvgate",
    "dict",
    "redis",
    "mooncake",
    "kvgate-shm",
    "kvgate-shed",
    "kvgate-ram",
)


def standard_entries(*, block_size: int, concurrency: int, duration_s: float) -> list[Entry]:
    """The standard set. The working set of mixed and lookup (256 blocks) holds hot-get's 64,
    so they reuse what hot-get loaded; lookups are short, so they run for half as long."""
    base = Params(block_size=block_size)
    load = Load(concurrency=concurrency, duration_s=duration_s, warmup_s=0.5)
    short = replace(load, duration_s=max(duration_s / 2, 1.0))
    return [
        Entry("hot-get", replace(base, key_count=64), load),
        Entry("put", base, load),
        Entry("mixed", replace(base, key_count=256, read_ratio=0.8), load),
        Entry("lookup", replace(base, key_count=256, lookup_keys=32), short),
        Entry("lease", replace(base, key_count=8, lease_ttl_ms=2000), load),
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--standard", action="store_true", help="run the standard set")
    parser.add_argument(
        "--targets",
        default=",".join(STANDARD_TARGETS),
        help=f"comma-separated, from {', '.join(known_targets())} (all)",
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {', '.join(SCENARIOS)} (all)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--duration", type=float, default=4.0, metavar="S", help="seconds per run (4)"
    )
    parser.add_argument("--block-size", type=parse_size, default=parse_size("1MiB"))
    parser.add_argument("--concurrency", type=int, default=16)
    add_target_options(parser)
    add_output_options(parser)
    return parser


async def bench(args: argparse.Namespace) -> int:
    names = [t for t in args.targets.split(",") if t]
    unknown = [t for t in names if t not in known_targets()]
    if unknown:
        raise SystemExit(f"unknown targets: {', '.join(unknown)}")
    wanted = {s for s in args.scenarios.split(",") if s}
    entries = [
        e
        for e in standard_entries(
            block_size=args.block_size, concurrency=args.concurrency, duration_s=args.duration
        )
        if e.scenario in wanted
    ]
    options = target_options(args, block_size=args.block_size, concurrency=args.concurrency)
    client_malloc = apply_client_malloc(args)
    started = time.monotonic()
    async with contextlib.AsyncExitStack() as stack:
        opened, skipped = await open_targets(stack, names, options, skip_unavailable=True)
        if "kvgate" in skipped:
            print(f"kvgate did not start: {skipped['kvgate']}", file=sys.stderr)
            return 1
        results = await run_rounds(
            entries, opened, rounds=args.rounds, progress=None if args.quiet else sys.stderr
        )
    outdir = results_dir(args)
    meta = {
        "command": " ".join(["python -m loadtest.bench", *sys.argv[1:]]),
        "block_size": format_size(args.block_size),
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "duration_s": args.duration,
        "kvgate_sizes": f"hbm {args.hbm_bytes}, dram {args.dram_bytes}, disk {args.disk_bytes}",
        "peer_memory": format_size(args.peer_memory),
        "mooncake_mode": args.mooncake_mode,
        "client_malloc": client_malloc,
        "skipped": skipped,
        "wall_s": round(time.monotonic() - started, 1),
        **environment(),
    }
    paths = report.write(results, outdir, meta=meta, plots=not args.no_plots)
    print(
        f"\n== standard benchmark: {format_size(args.block_size)} blocks, "
        f"{args.concurrency} clients, {args.rounds} rounds x {args.duration:g}s =="
    )
    for line in report.ratio_lines(results):
        print(line)
    for name, why in skipped.items():
        print(f"skipped {name}: {why.splitlines()[0]}")
    issues = report.problems(results)
    for issue in issues:
        print(f"warning: {issue}")
    print(f"results: {paths[0].parent}")
    return 1 if any(r.ops == 0 for r in results) else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.standard:
        build_parser().print_help()
        return 2
    return asyncio.run(bench(args))


if __name__ == "__main__":
    sys.exit(main())
