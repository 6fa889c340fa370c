"""Runs one scenario against one open target: N workers, a deadline or a request budget,
a progress line per second on stderr, and a RunResult at the end."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sys
from dataclasses import asdict, dataclass
from typing import TextIO

import aiohttp
import numpy as np

from loadtest.recorder import Recorder, RunResult, summarize
from loadtest.scenarios import Params, Scenario
from loadtest.targets import Target, TargetError

# A worker that fails this many times in a row stops: the target is down, not slow.
_MAX_CONSECUTIVE_ERRORS = 50
_EXPECTED_ERRORS = (TargetError, aiohttp.ClientError, OSError, TimeoutError, RuntimeError)


@dataclass(frozen=True)
class Load:
    concurrency: int = 16
    duration_s: float = 10.0
    requests: int | None = None
    """Stop after this many operations (all workers together), or at the deadline."""
    warmup_s: float = 0.5


async def run_scenario(
    target: Target,
    scenario: Scenario,
    params: Params,
    load: Load,
    *,
    progress: TextIO | None = sys.stderr,
    round_no: int = 0,
    label: str | None = None,
) -> RunResult:
    await scenario.prepare(target)
    rec = Recorder()
    loop = asyncio.get_running_loop()
    rec.start_at = rec.clock() + load.warmup_s
    deadline = rec.start_at + load.duration_s
    tickets = itertools.count() if load.requests is not None else None
    stop = asyncio.Event()
    gave_up = 0

    async def worker(index: int) -> None:
        nonlocal gave_up
        failures = 0
        while not stop.is_set() and rec.clock() < deadline:
            # Warm-up operations are not counted against the request budget.
            if tickets is not None and rec.clock() >= rec.start_at:
                assert load.requests is not None
                if next(tickets) >= load.requests:
                    stop.set()
                    return
            try:
                await scenario.op(target, index, rec)
                failures = 0
            except _EXPECTED_ERRORS as exc:
                rec.error(scenario.name, exc)
                failures += 1
                if failures >= _MAX_CONSECUTIVE_ERRORS:
                    gave_up += 1
                    return

    name = label or f"{scenario.name}@{target.name}"
    reporter = loop.create_task(_report(rec, name, progress)) if progress else None
    try:
        await asyncio.gather(*(worker(i) for i in range(load.concurrency)))
    finally:
        if reporter is not None:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
    # Operations in flight at the deadline still count, so the span runs until they finish.
    stopped = rec.clock()
    run_params = {**asdict(params), **asdict(load)}
    result = summarize(
        rec,
        scenario=scenario.name,
        target=target.name,
        params=run_params,
        stopped_at=stopped,
        round_no=round_no,
    )
    result.extra["workers_gave_up"] = gave_up
    return result


async def _report(rec: Recorder, name: str, out: TextIO) -> None:
    # Ticks line up with the end of the warm-up, so every line covers one measured second.
    await asyncio.sleep(max(0.0, rec.start_at - rec.clock()))
    seen = 0
    second = 0
    while True:
        await asyncio.sleep(1.0)
        ops, nbytes, lat = rec.window(seen)
        seen += ops
        second += 1
        if lat:
            p50, p99 = np.percentile(np.asarray(lat) * 1000.0, [50, 99])
            latency = f"p50 {p50:7.3f} ms  p99 {p99:7.3f} ms"
        else:
            latency = "no completions"
        errors = sum(rec.errors.values())
        print(
            f"[{name}] t={second:3d}s  {ops:6d} ops/s  {nbytes / 1e9:6.3f} GB/s  {latency}"
            + (f"  errors {errors}" if errors else ""),
            file=out,
            flush=True,
        )
