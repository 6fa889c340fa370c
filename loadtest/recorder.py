"""Per-operation measurements and the summary a run reports (JSON-ready).

Recording is append-only into flat lists (a few hundred ns per op) so the load generator's
share of the CPU stays small; everything else (percentiles, timelines, CDFs) is computed after
the run, or once a second for the progress line.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

CDF_POINTS = (*range(0, 100), 99.5, 99.9, 100)
"""Percentiles kept per tier in the JSON, enough to draw a latency CDF without raw samples."""


def _percentiles_ms(latencies: list[float] | np.ndarray[Any, Any]) -> dict[str, float]:
    arr = np.asarray(latencies, dtype=np.float64) * 1000.0
    if arr.size == 0:
        return {}
    p50, p90, p99, p999 = np.percentile(arr, [50, 90, 99, 99.9])
    return {
        "count": int(arr.size),
        "mean": round(float(arr.mean()), 4),
        "p50": round(float(p50), 4),
        "p90": round(float(p90), 4),
        "p99": round(float(p99), 4),
        "p99.9": round(float(p999), 4),
        "max": round(float(arr.max()), 4),
    }


class Recorder:
    def __init__(self, *, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.start_at = clock()
        """Ops that finish before this instant are warm-up and not kept."""
        self.ends: list[float] = []
        self.latencies: list[float] = []
        self.nbytes: list[int] = []
        self.by_key: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()

    def record(self, op: str, tier: str, started: float, nbytes: int, outcome: str) -> None:
        end = self.clock()
        if end < self.start_at:
            return
        latency = end - started
        self.ends.append(end)
        self.latencies.append(latency)
        self.nbytes.append(nbytes)
        self.by_key[(op, tier)].append(latency)
        self.outcomes[f"{op}:{outcome}"] += 1

    def error(self, op: str, exc: BaseException) -> None:
        # Counted during warm-up too: a target that fails from the start must not look idle.
        self.errors[f"{op}:{type(exc).__name__}: {exc}"[:200]] += 1

    def window(self, since: int) -> tuple[int, int, list[float]]:
        """(ops, bytes, latencies) recorded from index ``since`` on, for the progress line."""
        lat = self.latencies[since:]
        return len(lat), sum(self.nbytes[since:]), lat


@dataclass
class RunResult:
    scenario: str
    target: str
    params: dict[str, Any]
    duration_s: float
    ops: int
    bytes: int
    errors: int
    throughput_gbps: float
    ops_per_s: float
    latency_ms: dict[str, float]
    by_op: dict[str, dict[str, float]]
    by_tier: dict[str, dict[str, float]]
    cdf_ms: dict[str, list[float]]
    """"op@tier" -> latency (ms) at each of CDF_POINTS percentiles."""
    outcomes: dict[str, int]
    error_samples: dict[str, int]
    timeline: list[dict[str, float]]
    round: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunResult:
        return cls(**data)


def summarize(
    rec: Recorder,
    *,
    scenario: str,
    target: str,
    params: dict[str, Any],
    stopped_at: float,
    round_no: int = 0,
) -> RunResult:
    duration = max(stopped_at - rec.start_at, 1e-9)
    ends = np.asarray(rec.ends, dtype=np.float64) - rec.start_at
    nbytes = np.asarray(rec.nbytes, dtype=np.int64)
    lat = np.asarray(rec.latencies, dtype=np.float64)
    total_bytes = int(nbytes.sum()) if nbytes.size else 0

    timeline: list[dict[str, float]] = []
    if ends.size:
        # Whole seconds only: the tail of in-flight operations joins the last one.
        buckets = max(int(duration), 1)
        seconds = np.minimum(ends.astype(np.int64), buckets - 1)
        for sec in range(buckets):
            mask = seconds == sec
            span = 1.0 if sec < buckets - 1 else max(duration - sec, 1e-9)
            chosen = lat[mask] * 1000.0
            timeline.append(
                {
                    "t": float(sec + 1),
                    "ops": int(mask.sum()),
                    "gbps": round(float(nbytes[mask].sum()) / span / 1e9, 4),
                    "p50_ms": round(float(np.percentile(chosen, 50)), 4) if chosen.size else 0.0,
                    "p99_ms": round(float(np.percentile(chosen, 99)), 4) if chosen.size else 0.0,
                }
            )

    by_op: dict[str, list[float]] = collections.defaultdict(list)
    by_tier: dict[str, list[float]] = collections.defaultdict(list)
    by_op_tier: dict[str, list[float]] = {}
    for (op, tier), values in rec.by_key.items():
        by_op[op].extend(values)
        by_tier[tier].extend(values)
        by_op_tier[f"{op}@{tier}"] = values

    return RunResult(
        scenario=scenario,
        target=target,
        params=params,
        duration_s=round(duration, 4),
        ops=int(lat.size),
        bytes=total_bytes,
        errors=sum(rec.errors.values()),
        throughput_gbps=round(total_bytes / duration / 1e9, 4),
        ops_per_s=round(lat.size / duration, 2),
        latency_ms=_percentiles_ms(lat),
        by_op={op: _percentiles_ms(v) for op, v in sorted(by_op.items())},
        by_tier={tier: _percentiles_ms(v) for tier, v in sorted(by_tier.items())},
        cdf_ms={
            key: [round(float(x), 4) for x in np.percentile(np.asarray(v) * 1000.0, CDF_POINTS)]
            for key, v in sorted(by_op_tier.items())
        },
        outcomes=dict(sorted(rec.outcomes.items())),
        error_samples=dict(rec.errors.most_common(5)),
        timeline=timeline,
        round=round_no,
    )
