"""The ``kvgate`` console script: ``kvgate serve ...`` and ``kvgate replay ...``."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway.config import ConfigError, GatewayConfig, load_config
from tiers.errors import TierConfigError

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_USAGE = 2

# flag dest -> config field; every flag defaults to None so an unset flag overrides nothing.
_FLAG_FIELDS = (
    "shm",
    "shm_isolation",
    "host",
    "port",
    "data_dir",
    "hbm_bytes",
    "dram_bytes",
    "disk_bytes",
    "max_block_bytes",
    "max_batch_bytes",
    "max_batch_keys",
    "page_bytes",
    "hbm_policy",
    "dram_policy",
    "disk_policy",
    "write_through",
    "disk_compression_level",
    "shutdown_timeout_s",
    "log_level",
    "remote",
    "remote_bytes",
    "remote_prefix",
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvgate", description="KV-cache gateway for LLM serving.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="serve the REST API",
        description="Serve the REST API. Settings: defaults < --config TOML < KVGATE_* < flags. "
        "Sizes accept 64MiB, 2GiB, 512KiB, 1GB or plain bytes.",
    )
    serve.add_argument("--config", type=Path, metavar="FILE", help="TOML config file")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", help="TCP port (default 8080; 0 picks a free one)")
    serve.add_argument("--data-dir", metavar="DIR", help="where the disk tier lives (./data)")
    serve.add_argument("--hbm-bytes", metavar="N", help="HBM tier budget (512MiB)")
    serve.add_argument("--dram-bytes", metavar="N", help="pinned DRAM tier budget (2GiB)")
    serve.add_argument(
        "--disk-bytes", metavar="N", help="disk tier budget (8GiB; 0: no disk tier, RAM only)"
    )
    serve.add_argument("--max-block-bytes", metavar="N", help="largest block a PUT may store")
    serve.add_argument("--max-batch-bytes", metavar="N", help="largest /v1/batch/put body")
    serve.add_argument("--max-batch-keys", metavar="N", help="most items in one batch call")
    serve.add_argument("--page-bytes", metavar="N", help="arena page size (64KiB)")
    serve.add_argument("--hbm-policy", metavar="NAME", help="eviction policy of the HBM tier")
    serve.add_argument("--dram-policy", metavar="NAME", help="eviction policy of the DRAM tier")
    serve.add_argument("--disk-policy", metavar="NAME", help="eviction policy of the disk tier")
    serve.add_argument(
        "--write-through",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also write every block to disk at PUT time",
    )
    serve.add_argument(
        "--shm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="same-host shared-memory data plane (on by default)",
    )
    serve.add_argument(
        "--shm-isolation",
        choices=("auto", "shared", "private"),
        default=None,
        help="shared: sessions map the arenas (one trust domain); private: each gets only its "
        "own segment, by descriptor; auto (default): private when tenants are configured",
    )
    serve.add_argument("--disk-compression-level", metavar="N", help="zstd level (1)")
    serve.add_argument("--shutdown-timeout-s", metavar="S", help="graceful shutdown budget")
    serve.add_argument("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING, ...")
    serve.add_argument(
        "--remote",
        metavar="URL",
        help="redis://HOST:PORT: add the shared remote tier and keep the leases in that Redis, "
        "so several gateways act as one cache",
    )
    serve.add_argument("--remote-bytes", metavar="N", help="shared remote tier budget (4GiB)")
    serve.add_argument(
        "--remote-prefix", metavar="P", help="Redis key prefix; one cache per prefix (kvgate)"
    )
    sub.add_parser(
        "replay",
        help="replay a Mooncake-format trace (see `kvgate replay --help`)",
        add_help=False,
    )
    return parser


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    print(f"kvgate: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "replay":
        return _replay(args_list[1:])
    parser = _parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # argparse already printed the usage error or --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command != "serve":
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    flags = {name: getattr(args, name) for name in _FLAG_FIELDS}
    try:
        config = load_config(config_file=args.config, environ=os.environ, flags=flags)
    except ConfigError as exc:
        return _fail(f"bad configuration: {exc}")
    return _serve(config)


def _serve(config: GatewayConfig) -> int:
    from gateway.server import serve, setup_logging

    setup_logging(config.log_level)
    try:
        config.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return _fail(f"cannot create data dir {config.data_dir}: {exc.strerror or exc}")
    try:
        asyncio.run(serve(config))
    except OSError as exc:
        return _fail(f"cannot serve on {config.host}:{config.port}: {exc}", EXIT_RUNTIME)
    except TierConfigError as exc:  # geometry validate() could not foresee is still the config's
        return _fail(f"bad configuration: {exc}")
    except Exception as exc:  # startup failures (tiers that cannot open, ...) without a traceback
        return _fail(f"cannot start: {type(exc).__name__}: {exc}", EXIT_RUNTIME)
    return EXIT_OK


def _replay(argv: list[str]) -> int:
    try:
        replay = importlib.import_module("loadtest.replay")
    except ModuleNotFoundError as exc:
        if exc.name in ("loadtest", "loadtest.replay"):
            return _fail("replay is not available: the loadtest.replay module is missing")
        raise
    rc = replay.main(argv)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
