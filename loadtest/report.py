"""Results on disk: results.json, summary.md and PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import contextlib
import json
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest.recorder import CDF_POINTS, RunResult

RATIO_PAIRS: tuple[tuple[str, str], ...] = (
    ("kvgate", "redis"),
    ("kvgate", "dict"),
    ("kvgate", "mooncake"),
    ("kvgate-shm", "mooncake"),
    ("kvgate-shed", "redis"),
    ("kvgate-shed", "dict"),
    ("kvgate-ram", "redis"),
    ("kvgate-ram", "dict"),
)
"""(kvgate variant, peer) pairs whose ratios the summary prints when both ran."""


def _byte_scenario(results: Sequence[RunResult]) -> bool:
    return any(r.bytes > 0 for r in results)


def _hit_ratio(runs: Sequence[RunResult]) -> float | None:
    hits = sum(r.outcomes.get("get:hit", 0) for r in runs)
    misses = sum(r.outcomes.get("get:miss", 0) for r in runs)
    return round(hits / (hits + misses), 4) if hits + misses else None


def aggregate(results: Sequence[RunResult]) -> dict[str, dict[str, dict[str, Any]]]:
    """scenario -> target -> medians over its rounds."""
    grouped: dict[str, dict[str, list[RunResult]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        grouped[r.scenario][r.target].append(r)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for scenario, by_target in grouped.items():
        out[scenario] = {}
        for target, runs in by_target.items():
            out[scenario][target] = {
                "rounds": len(runs),
                "gbps": statistics.median(r.throughput_gbps for r in runs),
                "gbps_rounds": [r.throughput_gbps for r in runs],
                "ops_per_s": statistics.median(r.ops_per_s for r in runs),
                "p50_ms": statistics.median(r.latency_ms.get("p50", 0.0) for r in runs),
                "p99_ms": statistics.median(r.latency_ms.get("p99", 0.0) for r in runs),
                "errors": sum(r.errors for r in runs),
                "get_hit_ratio": _hit_ratio(runs),
                "tiers": sorted({t for r in runs for t in r.by_tier}),
            }
    return out


def ratios(agg: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """scenario -> "a/b" -> throughput ratio (GB/s, or ops/s where nothing moves bytes)."""
    out: dict[str, dict[str, float]] = {}
    for scenario, by_target in agg.items():
        metric = "gbps" if any(v["gbps"] > 0 for v in by_target.values()) else "ops_per_s"
        for a, b in RATIO_PAIRS:
            if a in by_target and b in by_target and by_target[b][metric] > 0:
                out.setdefault(scenario, {})[f"{a}/{b}"] = round(
                    by_target[a][metric] / by_target[b][metric], 3
                )
    return out


def markdown(results: Sequence[RunResult], meta: dict[str, Any]) -> str:
    agg = aggregate(results)
    rat = ratios(agg)
    lines = ["# kvgate load test", ""]
    for key, value in meta.items():
        lines.append(f"- {key}: `{value}`")
    lines.append("")
    for scenario, by_target in agg.items():
        lines += [
            f"## {scenario}",
            "",
            "| target | rounds | GB/s (median) | GB/s per round | ops/s | p50 ms | p99 ms "
            "| GET hits | errors | tiers |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for target, v in by_target.items():
            per_round = ", ".join(f"{x:.3f}" for x in v["gbps_rounds"])
            hits = "" if v["get_hit_ratio"] is None else f"{100 * v['get_hit_ratio']:.1f}%"
            lines.append(
                f"| {target} | {v['rounds']} | {v['gbps']:.3f} | {per_round} | "
                f"{v['ops_per_s']:.0f} | {v['p50_ms']:.3f} | {v['p99_ms']:.3f} | {hits} | "
                f"{v['errors']} | "
                f"{', '.join(v['tiers'])} |"
            )
        if scenario in rat:
            lines += [
                "",
                "Ratios: " + ", ".join(f"{k} = {x:.2f}" for k, x in rat[scenario].items()),
            ]
        lines.append("")
    return "\n".join(lines)


def ratio_lines(results: Sequence[RunResult]) -> list[str]:
    agg = aggregate(results)
    rat = ratios(agg)
    out = []
    for scenario, by_target in agg.items():
        cells = "  ".join(
            f"{t}={v['gbps']:.3f}GB/s,{v['ops_per_s']:.0f}op/s,p50={v['p50_ms']:.2f}ms"
            for t, v in by_target.items()
        )
        ratio = "  ".join(f"{k}={x:.2f}" for k, x in rat.get(scenario, {}).items())
        out.append(f"{scenario:8s} {cells}" + (f"   | {ratio}" if ratio else ""))
    return out


def plot(results: Sequence[RunResult], outdir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    by_scenario: dict[str, list[RunResult]] = defaultdict(list)
    for r in results:
        by_scenario[r.scenario].append(r)
    for scenario, runs in by_scenario.items():
        colors: dict[str, Any] = {}
        cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        use_bytes = _byte_scenario(runs)

        fig, ax = plt.subplots(figsize=(8, 4.5))
        for r in runs:
            color = colors.setdefault(r.target, cycle[len(colors) % len(cycle)])
            xs = [p["t"] for p in r.timeline]
            ys = [p["gbps"] if use_bytes else p["ops"] for p in r.timeline]
            label = (
                r.target if r.round == min(x.round for x in runs if x.target == r.target) else None
            )
            ax.plot(xs, ys, color=color, alpha=0.8, marker=".", label=label)
        ax.set_xlabel("seconds into the run (one line per round)")
        ax.set_ylabel("GB/s" if use_bytes else "ops/s")
        ax.set_title(f"{scenario}: throughput over time")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
        path = outdir / f"throughput_{scenario}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

        fig, ax = plt.subplots(figsize=(8, 4.5))
        seen: set[str] = set()
        fractions = [p / 100.0 for p in CDF_POINTS]
        for r in runs:
            for op_tier, points in r.cdf_ms.items():
                op, _, tier = op_tier.partition("@")
                name = f"{r.target} {op}" if tier == r.target else f"{r.target} {op}@{tier}"
                color = colors.setdefault(name, cycle[len(colors) % len(cycle)])
                ax.plot(
                    points, fractions, color=color, alpha=0.8, label=None if name in seen else name
                )
                seen.add(name)
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms, log scale)")
        ax.set_ylabel("fraction of operations")
        ax.set_title(f"{scenario}: latency CDF per target/tier")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
        path = outdir / f"latency_cdf_{scenario}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def write(
    results: Sequence[RunResult], outdir: Path, *, meta: dict[str, Any], plots: bool = True
) -> list[Path]:
    outdir.mkdir(parents=True, exist_ok=True)
    agg = aggregate(results)
    doc = {
        "meta": meta,
        "summary": agg,
        "ratios": ratios(agg),
        "runs": [r.as_json() for r in results],
    }
    paths = [outdir / "results.json", outdir / "summary.md"]
    paths[0].write_text(json.dumps(doc, indent=1))
    paths[1].write_text(markdown(results, meta))
    if plots:
        # matplotlib is a benchmark extra; JSON and markdown stand on their own.
        with contextlib.suppress(ImportError):
            paths += plot(results, outdir)
    return paths


def problems(results: Sequence[RunResult]) -> list[str]:
    """Runs that measured nothing, or whose workers stopped on errors: the numbers are void."""
    out = []
    for r in results:
        label = f"{r.scenario}@{r.target} round {r.round + 1}"
        if r.ops == 0:
            out.append(f"{label}: no operation completed ({r.errors} errors)")
        elif r.extra.get("workers_gave_up"):
            out.append(f"{label}: {r.extra['workers_gave_up']} workers stopped on errors")
        for sample, count in r.error_samples.items():
            out.append(f"{label}: {count} x {sample}")
    return out
