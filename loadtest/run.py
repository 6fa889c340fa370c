"""Run one load-test scenario against kvgate or a peer.

    python -m loadtest.run hot-get --target kvgate --url http://127.0.0.1:8080
    python -m loadtest.run put --target dict --target redis --rounds 3 --duration 5
    python -m loadtest.run lease --target kvgate --keys 8 --concurrency 32
    python -m loadtest.run replay -- --trace /work/shared/traces/synthetic_trace.jsonl ...

Without --url the harness starts the server itself on a free loopback port and stops it at the
end (kvgate: `python -m gateway.cli serve`; dict: loadtest.dict_server; redis: redis-server;
mooncake: mooncake_master). Progress goes to stderr once a second; results (results.json,
summary.md, PNG plots) go under loadtest/results/<timestamp>/; stdout ends with one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import json
import sys
from typing import Any

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
from loadtest.sizes import parse_size


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")
    for name, cls in SCENARIOS.items():
        p = sub.add_parser(name, help=cls.summary, description=cls.summary)
        g = p.add_argument_group("load")
        g.add_argument(
            "--target",
            action="append",
            choices=known_targets(),
            help="target to load (repeatable: several run in alternating rounds; default kvgate)",
        )
        g.add_argument("--url", help="use this running server (one target only)")
        g.add_argument("--block-size", type=parse_size, default=parse_size("1MiB"), metavar="SIZE")
        g.add_argument("--concurrency", type=_positive_int, default=16)
        g.add_argument("--duration", type=float, default=10.0, metavar="S")
        g.add_argument("--requests", type=_positive_int, help="stop after N operations")
        g.add_argument("--warmup", type=float, default=0.5, metavar="S")
        g.add_argument("--keys", type=_positive_int, default=64, help="working-set keys (64)")
        g.add_argument("--rounds", type=_positive_int, default=1)
        g.add_argument("--read-ratio", type=float, default=0.8, help="mixed: share of GETs")
        g.add_argument("--lookup-keys", type=_positive_int, default=32, help="lookup chain")
        g.add_argument("--lease-ttl-ms", type=_positive_int, default=2000)
        g.add_argument("--verify", action="store_true", help="compare every GET's bytes")
        g.add_argument("--seed", type=int, default=1)
        add_target_options(p)
        add_output_options(p)
    rp = sub.add_parser(
        "replay",
        help="trace replay (delegates to loadtest.replay; arguments after -- go to it)",
        add_help=False,
    )
    rp.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def replay(argv: list[str]) -> int:
    if argv and argv[0] == "--":
        argv = argv[1:]
    if importlib.util.find_spec("loadtest.replay") is None:
        print("loadtest.replay is not available in this checkout", file=sys.stderr)
        return 2
    module: Any = importlib.import_module("loadtest.replay")
    rc = module.main(argv)
    return int(rc or 0)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    targets = args.target or ["kvgate"]
    if args.url and len(targets) != 1:
        raise SystemExit("--url needs exactly one --target")
    params = Params(
        block_size=args.block_size,
        key_count=args.keys,
        read_ratio=args.read_ratio,
        lookup_keys=args.lookup_keys,
        lease_ttl_ms=args.lease_ttl_ms,
        verify=args.verify,
        seed=args.seed,
    )
    load = Load(
        concurrency=args.concurrency,
        duration_s=args.duration,
        requests=args.requests,
        warmup_s=args.warmup,
    )
    options = target_options(args, block_size=args.block_size, concurrency=args.concurrency)
    client_malloc = apply_client_malloc(args)
    async with contextlib.AsyncExitStack() as stack:
        opened, _ = await open_targets(stack, targets, options, skip_unavailable=False)
        results = await run_rounds(
            [Entry(args.scenario, params, load)],
            opened,
            rounds=args.rounds,
            progress=None if args.quiet else sys.stderr,
        )
    if not results:
        raise SystemExit(f"no target supports scenario {args.scenario}")
    outdir = results_dir(args, args.scenario)
    meta = {
        "command": " ".join(["python -m loadtest.run", *sys.argv[1:]]),
        "client_malloc": client_malloc,
        **environment(),
    }
    paths = report.write(results, outdir, meta=meta, plots=not args.no_plots)
    for line in report.ratio_lines(results):
        print(line)
    issues = report.problems(results)
    for issue in issues:
        print(f"warning: {issue}", file=sys.stderr)
    return {
        "results": str(paths[0]),
        "summary": report.aggregate(results),
        "ok": not any(r.ops == 0 for r in results),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "replay":
        return replay(argv[1:])
    args = build_parser().parse_args(argv)
    out = asyncio.run(run(args))
    print(json.dumps(out))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
