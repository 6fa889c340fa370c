"""Command-line options shared by ``loadtest.run`` and ``loadtest.bench``."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from loadtest import alloc
from loadtest.procs import KvgateSizes
from loadtest.sizes import parse_size
from loadtest.targets import OPENERS, TargetOptions

RESULTS_ROOT = Path(__file__).resolve().parent / "results"


def add_target_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("servers")
    g.add_argument(
        "--peer-memory",
        type=parse_size,
        default=parse_size("1GiB"),
        metavar="SIZE",
        help="memory bound for the peers: dict cap, redis maxmemory, Mooncake segment (1GiB)",
    )
    g.add_argument("--hbm-bytes", default="256MiB", help="kvgate serve --hbm-bytes (256MiB)")
    g.add_argument("--dram-bytes", default="512MiB", help="kvgate serve --dram-bytes (512MiB)")
    g.add_argument("--disk-bytes", default="2GiB", help="kvgate serve --disk-bytes (2GiB)")
    g.add_argument(
        "--kvgate-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `gateway.cli serve` (repeatable; use --kvgate-arg=--flag)",
    )
    g.add_argument(
        "--mooncake-mode",
        choices=("local", "remote"),
        default="local",
        help="local: the client holds the segment itself; remote: a separate mooncake_client "
        "process holds it and bytes cross TCP (local)",
    )
    g.add_argument(
        "--shm-batch",
        type=_positive_int,
        default=4,
        metavar="N",
        help="kvgate-shm targets: the calls waiting at one moment go out in batches of at most "
        "N blocks, one /v1/shm/get (or reserve + commit) each, sent concurrently (4: the 16 "
        "default clients as four callers loading 4 blocks each; 16 or more: one batch, every "
        "client waiting for all)",
    )
    parser.add_argument(
        "--client-malloc",
        choices=alloc.CHOICES,
        default="keep",
        help="the load generator's glibc allocator, the same for every target's client: keep "
        "freed 1 MiB buffers for reuse instead of faulting fresh pages in for each block read "
        "(keep), or glibc's defaults (see loadtest/alloc.py)",
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def add_output_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("output")
    g.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default loadtest/results/<timestamp>/)",
    )
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g.add_argument("--quiet", action="store_true", help="no per-second progress on stderr")


def target_options(args: argparse.Namespace, *, block_size: int, concurrency: int) -> TargetOptions:
    return TargetOptions(
        concurrency=concurrency,
        block_size=block_size,
        url=getattr(args, "url", None),
        peer_bytes=args.peer_memory,
        kvgate_sizes=KvgateSizes(
            hbm_bytes=args.hbm_bytes, dram_bytes=args.dram_bytes, disk_bytes=args.disk_bytes
        ),
        kvgate_args=tuple(args.kvgate_arg),
        mooncake_mode=args.mooncake_mode,
        shm_batch=args.shm_batch,
    )


def results_dir(args: argparse.Namespace, suffix: str = "") -> Path:
    if args.out is not None:
        out: Path = args.out
        return out
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return RESULTS_ROOT / (stamp + (f"-{suffix}" if suffix else ""))


def known_targets() -> list[str]:
    return list(OPENERS)


def apply_client_malloc(args: argparse.Namespace) -> str:
    return alloc.apply(args.client_malloc)


def environment() -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for dist in ("aiohttp", "redis", "numpy", "matplotlib", "mooncake-transfer-engine-non-cuda"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "packages": versions,
    }
