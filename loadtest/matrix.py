"""Runs scenarios against several targets in alternating rounds.

Round r visits the targets in an order rotated by r, so drift on the shared 2 cores (other
processes, thermal, page cache) spreads over every target instead of favouring one.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

from loadtest.driver import Load, run_scenario
from loadtest.procs import ServerStartError
from loadtest.recorder import RunResult
from loadtest.scenarios import Params, Scenario, make_scenario
from loadtest.targets import Target, TargetError, TargetOptions, open_target


@dataclass(frozen=True)
class Entry:
    scenario: str
    params: Params
    load: Load


async def open_targets(
    stack: contextlib.AsyncExitStack,
    names: Sequence[str],
    options: TargetOptions,
    *,
    skip_unavailable: bool,
    log: TextIO = sys.stderr,
) -> tuple[list[Target], dict[str, str]]:
    """Open every target on ``stack``; a peer that cannot start is skipped (with the reason)
    when ``skip_unavailable``, else the error propagates."""
    opened: list[Target] = []
    skipped: dict[str, str] = {}
    for name in names:
        try:
            opened.append(await stack.enter_async_context(open_target(name, options)))
        except (ServerStartError, TargetError, OSError) as exc:
            if not skip_unavailable:
                raise
            skipped[name] = str(exc) or type(exc).__name__
            print(f"skipping target {name}: {skipped[name]}", file=log, flush=True)
    return opened, skipped


async def run_rounds(
    entries: Sequence[Entry],
    targets: Sequence[Target],
    *,
    rounds: int,
    progress: TextIO | None = sys.stderr,
) -> list[RunResult]:
    results: list[RunResult] = []
    for entry in entries:
        # One scenario object per target: key counters continue across rounds, so a PUT
        # round never rewrites what an earlier round stored.
        scenarios: dict[str, Scenario] = {
            t.name: make_scenario(entry.scenario, entry.params) for t in targets
        }
        runnable = [
            t for t in targets if scenarios[t.name].supports(t) and _wants(t, entry.scenario)
        ]
        for r in range(rounds):
            shift = r % max(len(runnable), 1)
            for target in runnable[shift:] + runnable[:shift]:
                result = await run_scenario(
                    target,
                    scenarios[target.name],
                    entry.params,
                    entry.load,
                    progress=progress,
                    round_no=r,
                    label=f"{entry.scenario}@{target.name} r{r + 1}/{rounds}",
                )
                results.append(result)
    return results


def _wants(target: Target, scenario: str) -> bool:
    """A target may limit itself to some scenarios (``only_scenarios``; all when absent)."""
    only: frozenset[str] | None = getattr(target, "only_scenarios", None)
    return only is None or scenario in only
