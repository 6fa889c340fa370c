"""The cost of watching: hot-tier GET throughput with tracing off, sampled at 10% and at 100%.

Three gateway apps run in this process on loopback, identical except for tracing: ``off`` (no
tracer provider: the middleware and the tiers skip span work entirely), ``10%`` and ``100%``
(``parentbased_traceidratio``, spans batched and exported over OTLP/HTTP to a sink in a child
process, as they would go to a collector). Each is loaded with the same blocks, all resident in
the hot tier, then an aiohttp client runs closed-loop GETs against one app at a time, in
alternating rounds (the order rotates each round) so drift hits every mode alike. The result is
the median requests/s per mode and each mode's cost relative to ``off``.

    python -m loadtest.obs_bench [--block-bytes 262144] [--blocks 64] [--rounds 6]
        [--seconds 3] [--concurrency 8] [--json out.json]

Progress goes to stderr; the JSON result is the last line of stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.telemetry import Telemetry, TelemetryConfig
from tiers.hierarchy import Hierarchy
from tiers.memory import ArenaTier

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Mode:
    name: str
    ratio: float | None  # None: tracing off


MODES = (Mode("off", None), Mode("10%", 0.1), Mode("100%", 1.0))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sink_main(port: int, ready: multiprocessing.synchronize.Event) -> None:
    """An OTLP/HTTP sink: accepts and drops span batches (a collector's receive side)."""

    async def accept(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def main() -> None:
        app = web.Application(client_max_size=64 * MiB)
        app.router.add_post("/v1/traces", accept)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


def _telemetry(mode: Mode, sink: str) -> Telemetry:
    if mode.ratio is None:
        return Telemetry(TelemetryConfig())
    exporter = OTLPSpanExporter(endpoint=f"{sink}/v1/traces")
    return Telemetry(
        TelemetryConfig(),
        span_processors=[BatchSpanProcessor(exporter)],
        sampler=ParentBased(TraceIdRatioBased(mode.ratio)),
    )


@asynccontextmanager
async def _serve(mode: Mode, sink: str, args: argparse.Namespace, data: Path) -> AsyncIterator[str]:
    hot = args.blocks * args.block_bytes * 2

    async def hierarchy_factory(config: GatewayConfig) -> Hierarchy:
        # Arena tiers only: the benchmark measures the hot path, not the disk.
        return Hierarchy([ArenaTier.hbm(hot), ArenaTier.dram(hot)])

    config = GatewayConfig(
        host="127.0.0.1",
        port=0,
        data_dir=data / mode.name.strip("%"),
        max_block_bytes=max(args.block_bytes, MiB),
    )
    app = create_app(config, hierarchy_factory=hierarchy_factory, telemetry=_telemetry(mode, sink))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def _load(session: aiohttp.ClientSession, url: str, keys: Sequence[str], size: int) -> None:
    for key in keys:
        body = random.Random(key).randbytes(size)
        async with session.put(f"{url}/v1/blocks/{key}", data=body) as resp:
            if resp.status not in (200, 201):
                raise SystemExit(f"PUT {key}: HTTP {resp.status}: {await resp.text()}")


async def _round(
    session: aiohttp.ClientSession, url: str, keys: Sequence[str], seconds: float, workers: int
) -> tuple[int, int, float]:
    """Requests, bytes, and CPU seconds this process spent (server, client, exporter thread)."""
    cpu = time.process_time()
    deadline = time.perf_counter() + seconds
    done = [0, 0]

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        while time.perf_counter() < deadline:
            async with session.get(f"{url}/v1/blocks/{rng.choice(keys)}") as resp:
                body = await resp.read()
                if resp.status != 200 or resp.headers.get("X-KV-Tier") != "hbm":
                    raise SystemExit(
                        f"GET: HTTP {resp.status} from {resp.headers.get('X-KV-Tier')}"
                    )
            done[0] += 1
            done[1] += len(body)

    await asyncio.gather(*(worker(i) for i in range(workers)))
    return done[0], done[1], time.process_time() - cpu


async def run(args: argparse.Namespace) -> dict[str, object]:
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    sink_port = _free_port()
    sink = ctx.Process(target=_sink_main, args=(sink_port, ready), daemon=True)
    sink.start()
    try:
        if not ready.wait(30):
            raise SystemExit("the OTLP sink did not start")
        sink_url = f"http://127.0.0.1:{sink_port}"
        keys = [f"obs-bench-{i}" for i in range(args.blocks)]
        per_mode: dict[str, list[float]] = {m.name: [] for m in MODES}
        cpu_us: dict[str, list[float]] = {m.name: [] for m in MODES}
        with tempfile.TemporaryDirectory(prefix="kvgate-obs-bench-") as tmp:
            async with AsyncExitStack() as stack:
                connector = aiohttp.TCPConnector(limit=args.concurrency * 2)
                session = await stack.enter_async_context(
                    aiohttp.ClientSession(connector=connector)
                )
                urls: dict[str, str] = {}
                for mode in MODES:
                    urls[mode.name] = await stack.enter_async_context(
                        _serve(mode, sink_url, args, Path(tmp))
                    )
                    await _load(session, urls[mode.name], keys, args.block_bytes)
                for mode in MODES:  # warm-up, not counted
                    await _round(session, urls[mode.name], keys, min(1.0, args.seconds), 4)
                for r in range(args.rounds):
                    order = MODES[r % len(MODES) :] + MODES[: r % len(MODES)]
                    for mode in order:
                        n, nbytes, cpu = await _round(
                            session, urls[mode.name], keys, args.seconds, args.concurrency
                        )
                        rps = n / args.seconds
                        per_mode[mode.name].append(rps)
                        cpu_us[mode.name].append(1e6 * cpu / max(n, 1))
                        print(
                            f"round {r + 1}/{args.rounds} {mode.name:>4}: {rps:8.0f} req/s "
                            f"{nbytes / args.seconds / MiB:8.1f} MiB/s "
                            f"{cpu_us[mode.name][-1]:7.1f} CPU us/req",
                            file=sys.stderr,
                            flush=True,
                        )
    finally:
        sink.kill()
        sink.join(5)
    base = statistics.median(per_mode["off"])
    base_cpu = statistics.median(cpu_us["off"])
    results = {
        name: {
            "median_cpu_us_per_req": round(statistics.median(cpu_us[name]), 1),
            "cpu_cost_vs_off_pct": round(
                100.0 * (statistics.median(cpu_us[name]) / base_cpu - 1), 2
            ),
            "median_rps": round(statistics.median(v), 1),
            "min_rps": round(min(v), 1),
            "max_rps": round(max(v), 1),
            "median_mib_s": round(statistics.median(v) * args.block_bytes / MiB, 1),
            "cost_vs_off_pct": round(100.0 * (1 - statistics.median(v) / base), 2),
            "rounds_rps": [round(x, 1) for x in v],
        }
        for name, v in per_mode.items()
    }
    return {
        "benchmark": "obs_bench",
        "block_bytes": args.block_bytes,
        "blocks": args.blocks,
        "rounds": args.rounds,
        "seconds_per_round": args.seconds,
        "concurrency": args.concurrency,
        "modes": results,
        "goal": "10% sampling costs under 5% throughput",
        "goal_met": results["10%"]["cost_vs_off_pct"] < 5.0,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.obs_bench",
        description="Hot-tier GET throughput with tracing off, sampled at 10%% and at 100%%.",
    )
    parser.add_argument("--block-bytes", type=int, default=256 * 1024, help="block size (bytes)")
    parser.add_argument("--blocks", type=int, default=64, help="distinct blocks read")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per mode (alternating)")
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each round")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent client requests")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args(argv)
    if args.block_bytes <= 0 or args.block_bytes > MiB:
        parser.error("--block-bytes must be in 1..1048576")
    result = asyncio.run(run(args))
    text = json.dumps(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
