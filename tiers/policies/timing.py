"""Opt-in timing of policy calls in a live process (issue 5: policy overhead in the live tier).

Set ``TIERS_POLICY_TIMING=/path/report.json`` in a server's environment and every policy that
:func:`tiers.policy.make_policy` builds is wrapped in a :class:`TimedPolicy`, which counts calls
and the nanoseconds spent inside each of them; the report is written when the process exits
(``kvgate serve`` exits cleanly on SIGTERM). Unset (the default), ``make_policy`` returns the
bare policy: nothing is wrapped and nothing is paid.

The report names each policy by creation order (``#0`` hbm, ``#1`` dram, ``#2`` disk for the
standard hierarchy) and gives ``clock_floor_ns``, the median cost of an empty timed interval on
this machine, so per-call figures can be read net of the measurement itself.
"""

from __future__ import annotations

import atexit
import json
import os
import statistics
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from time import perf_counter_ns
from typing import Any

from tiers.policy import TIMING_ENV_VAR, Access, EvictionPolicy, TierGroupPolicy

ENV_VAR = TIMING_ENV_VAR
METHODS = ("admit", "on_insert", "on_hit", "on_miss", "on_remove", "victim")
_ADMIT, _INSERT, _HIT, _MISS, _REMOVE, _VICTIM = range(len(METHODS))
SAMPLE_CAP = 100_000

_live: list[TimedPolicy] = []
_lock = threading.Lock()
_atexit_paths: set[str] = set()


class TimedPolicy:
    """Delegates every call to ``inner`` and adds up calls and time per method."""

    def __init__(self, inner: EvictionPolicy, *, label: str) -> None:
        self.inner = inner
        self.name = inner.name
        self.label = label
        self.calls = [0] * len(METHODS)
        self.ns = [0] * len(METHODS)
        # The mean alone hides preemption on a shared machine: keep the first calls for
        # percentiles (bounded, a few MB at most).
        self.samples: list[list[int]] = [[] for _ in METHODS]

    def join_tiers(self, below: Sequence[EvictionPolicy]) -> int:
        # Grouping is set up once, not per access: forwarded untimed, so measuring a policy
        # does not change how it decides.
        inner = self.inner
        return inner.join_tiers(below) if isinstance(inner, TierGroupPolicy) else 0

    def follow(self, leader: object) -> bool:
        inner = self.inner
        return inner.follow(leader) if isinstance(inner, TierGroupPolicy) else False

    def _add(self, method: int, ns: int) -> None:
        self.ns[method] += ns
        self.calls[method] += 1
        samples = self.samples[method]
        if len(samples) < SAMPLE_CAP:
            samples.append(ns)

    def admit(self, access: Access) -> bool:
        t0 = perf_counter_ns()
        out = self.inner.admit(access)
        self._add(_ADMIT, perf_counter_ns() - t0)
        return out

    def on_insert(self, access: Access) -> None:
        t0 = perf_counter_ns()
        self.inner.on_insert(access)
        self._add(_INSERT, perf_counter_ns() - t0)

    def on_hit(self, access: Access) -> None:
        t0 = perf_counter_ns()
        self.inner.on_hit(access)
        self._add(_HIT, perf_counter_ns() - t0)

    def on_miss(self, access: Access) -> None:
        t0 = perf_counter_ns()
        self.inner.on_miss(access)
        self._add(_MISS, perf_counter_ns() - t0)

    def on_remove(self, key: str) -> None:
        t0 = perf_counter_ns()
        self.inner.on_remove(key)
        self._add(_REMOVE, perf_counter_ns() - t0)

    def victim(self, exclude: Callable[[str], bool] | None = None) -> str | None:
        t0 = perf_counter_ns()
        out = self.inner.victim(exclude)
        self._add(_VICTIM, perf_counter_ns() - t0)
        return out

    def __len__(self) -> int:
        return len(self.inner)

    def snapshot(self) -> dict[str, Any]:
        per = {}
        for i, m in enumerate(METHODS):
            samples = sorted(self.samples[i])
            per[m] = {
                "calls": self.calls[i],
                "ns": self.ns[i],
                "ns_per_call": self.ns[i] / self.calls[i] if self.calls[i] else None,
                "p50_ns": samples[len(samples) // 2] if samples else None,
                "p90_ns": samples[len(samples) * 9 // 10] if samples else None,
            }
        return {
            "label": self.label,
            "policy": self.name,
            "calls": sum(self.calls),
            "ns": sum(self.ns),
            "methods": per,
        }


def clock_floor_ns(samples: int = 2001) -> float:
    """Median length of an empty timed interval: what each recorded call carries on top."""
    spans = []
    for _ in range(samples):
        t0 = perf_counter_ns()
        spans.append(perf_counter_ns() - t0)
    return float(statistics.median(spans))


def wrap(policy: EvictionPolicy) -> TimedPolicy:
    """Wrap ``policy`` and register it for the report (labels follow creation order)."""
    with _lock:
        timed = TimedPolicy(policy, label=f"#{len(_live)}")
        _live.append(timed)
    return timed


def report() -> dict[str, Any]:
    with _lock:
        policies = [p.snapshot() for p in _live]
    return {"clock_floor_ns": clock_floor_ns(), "policies": policies}


def write_report(path: str | Path) -> None:
    Path(path).write_text(json.dumps(report(), indent=1) + "\n")


def maybe_wrap(policy: EvictionPolicy) -> EvictionPolicy:
    """``policy`` itself unless ``TIERS_POLICY_TIMING`` names a report file."""
    path = os.environ.get(ENV_VAR)
    if not path:
        return policy
    with _lock:
        if path not in _atexit_paths:
            _atexit_paths.add(path)
            atexit.register(write_report, path)
    return wrap(policy)


def reset() -> None:
    """Forget every wrapped policy (tests)."""
    with _lock:
        _live.clear()
