"""How much of Belady's lead an online policy could learn: oracle-labelled bounds on a trace.

``python -m loadtest.policy_bounds --trace T --capacity-fraction 0.02 --capacity-fraction 0.05``

A replacement policy that *predicts* reuse (Hawkeye, Mockingjay, LRB and the rest) can at best
predict perfectly. This replays the trace through the simulator with a policy given the perfect
answer to the question such a predictor learns: will this block be used again within H accesses?
Blocks with a "yes" are kept in LRU order; blocks with a "no" go first (the newest first, so a
request's deep blocks leave before its head), or, with ``admission`` only, are never inserted.
H is searched over multiples of the capacity. If even the perfect label stays below a target,
no predictor trained on the trace's history can reach it, whatever its features; ranking
by the future itself (Belady) is the only way past. docs/policies.md has the numbers.

The last line of stdout is one JSON object; a table goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from collections.abc import Callable
from functools import partial

from loadtest.simulate import Simulator, TierSpec, TraceRequest, distinct_blocks, read_trace
from tiers.policies.belady import BeladyPolicy, FutureOracle
from tiers.policy import Access, EvictionPolicy, LRUPolicy


class _Features:
    """What a learned reuse predictor could know of an access: how often the block was seen,
    how long ago (log2 of the gap in accesses), and how deep in its chain it sits."""

    __slots__ = ("_state",)

    def __init__(self) -> None:
        self._state: dict[str, tuple[int, int]] = {}  # key -> (times seen, last position)

    def observe(self, key: str, depth: int | None, pos: int) -> tuple[int, int, int]:
        count, last = self._state.get(key, (0, pos))
        self._state[key] = (count + 1, pos)
        return (min(count, 6), (pos - last).bit_length(), min((depth or 0) // 8, 8))


def feature_table(trace: list[TraceRequest], horizon: float) -> dict[tuple[int, int, int], float]:
    """Per feature class, the fraction of accesses reused within ``horizon`` accesses, fitted on
    the whole trace: the best a predictor over these features could learn (an in-sample fit)."""
    oracle = FutureOracle(k for req in trace for k in req.keys)
    features = _Features()
    seen: dict[tuple[int, int, int], list[int]] = {}
    for req in trace:
        for depth, key in enumerate(req.keys):
            oracle.advance(key)
            cls = features.observe(key, depth, oracle.cursor)
            tally = seen.setdefault(cls, [0, 0])
            tally[0] += 1
            tally[1] += oracle.next_use(key) - oracle.cursor < horizon
    return {cls: reused / n for cls, (n, reused) in seen.items()}


class OracleLabelPolicy:
    """LRU over blocks labelled "reused within ``horizon`` accesses"; the others go first,
    newest first (``admission=False``) or are not admitted at all (``admission=True``).

    The label is the oracle's (the truth), or with ``table`` a prediction: the feature class's
    reuse rate in that table is at least ``threshold``."""

    name = "oracle-label"

    def __init__(
        self,
        oracle: FutureOracle,
        *,
        horizon: float,
        admission: bool,
        table: dict[tuple[int, int, int], float] | None = None,
        threshold: float = 0.5,
    ) -> None:
        self._oracle = oracle
        self._horizon = horizon
        self._admission = admission
        self._table = table
        self._threshold = threshold
        self._features = _Features()
        self._labels: dict[str, bool] = {}
        self._keep: OrderedDict[str, None] = OrderedDict()
        self._doomed: OrderedDict[str, None] = OrderedDict()

    def _label(self, access: Access) -> None:
        """Label the access now happening (every access is a hit or a miss first)."""
        key = access.key
        if self._table is None:
            soon = self._oracle.next_use(key) - self._oracle.cursor < self._horizon
        else:
            cls = self._features.observe(key, access.depth, self._oracle.cursor)
            soon = self._table.get(cls, 0.0) >= self._threshold
        self._labels[key] = soon

    def _soon(self, key: str) -> bool:
        return self._labels.get(key, False)

    def _place(self, key: str) -> None:
        self._keep.pop(key, None)
        self._doomed.pop(key, None)
        (self._keep if self._soon(key) else self._doomed)[key] = None

    def admit(self, access: Access) -> bool:
        return not self._admission or self._soon(access.key)

    def on_insert(self, access: Access) -> None:
        self._place(access.key)

    def on_hit(self, access: Access) -> None:
        self._label(access)
        if self._admission:
            # Admission alone: once in, a block ages out in LRU order like any other.
            self._doomed.pop(access.key, None)
            self._keep[access.key] = None
            self._keep.move_to_end(access.key)
        else:
            self._place(access.key)

    def on_miss(self, access: Access) -> None:
        self._label(access)

    def on_remove(self, key: str) -> None:
        self._keep.pop(key, None)
        self._doomed.pop(key, None)
        self._labels.pop(key, None)

    def victim(self, exclude: Callable[[str], bool] | None = None) -> str | None:
        for key in reversed(self._doomed):
            if exclude is None or not exclude(key):
                return key
        for key in self._keep:
            if exclude is None or not exclude(key):
                return key
        return None

    def __len__(self) -> int:
        return len(self._keep) + len(self._doomed)


def prefix_hit_ratio(
    trace: list[TraceRequest], capacity: int, make: Callable[[FutureOracle], EvictionPolicy]
) -> float:
    """One tier of ``capacity`` blocks under ``make(oracle)``'s policy (the oracle follows
    the replay, for policies that read the future)."""
    oracle = FutureOracle(k for req in trace for k in req.keys)
    policy = make(oracle)
    sim = Simulator([(TierSpec("t", capacity), policy)], oracle=oracle)
    for req in trace:
        sim.request(req)
    ratio = sim.result()["prefix_hit_ratio"]
    assert isinstance(ratio, float)
    return ratio


def bounds(
    trace: list[TraceRequest],
    capacity: int,
    horizons: list[float],
    thresholds: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6),
) -> dict[str, object]:
    """At one capacity: LRU, Belady, the best oracle-label and oracle-admission results over
    ``horizons`` (multiples of ``capacity``, in accesses), and the label predicted from
    features fitted on the trace, best over ``thresholds``."""
    out: dict[str, object] = {
        "capacity_blocks": capacity,
        "lru": prefix_hit_ratio(trace, capacity, lambda _o: LRUPolicy()),
        "belady": prefix_hit_ratio(trace, capacity, lambda o: BeladyPolicy(o, capacity=capacity)),
    }
    best_label = horizons[0]
    for kind, admission in (("label", False), ("admission", True)):
        per = {
            h: prefix_hit_ratio(
                trace,
                capacity,
                partial(OracleLabelPolicy, horizon=h * capacity, admission=admission),
            )
            for h in horizons
        }
        best = max(per, key=lambda h: per[h])
        out[f"oracle_{kind}"] = per[best]
        out[f"oracle_{kind}_horizon"] = best
        out[f"oracle_{kind}_by_horizon"] = {str(h): r for h, r in per.items()}
        if not admission:
            best_label = best
    # The same labelling, predicted from the access's features at the perfect label's best
    # horizon, with the table fitted on this very trace (so an upper bound for learning them).
    horizon = best_label * capacity
    table = feature_table(trace, horizon)
    learned = {
        t: prefix_hit_ratio(
            trace,
            capacity,
            partial(OracleLabelPolicy, horizon=horizon, admission=False, table=table, threshold=t),
        )
        for t in thresholds
    }
    best_t = max(learned, key=lambda t: learned[t])
    out["fitted_features"] = learned[best_t]
    out["fitted_features_threshold"] = best_t
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.policy_bounds", description=__doc__)
    p.add_argument("--trace", required=True, help="Mooncake-format JSONL trace")
    p.add_argument(
        "--capacity-fraction",
        type=float,
        action="append",
        help="capacity as a fraction of the distinct blocks; repeatable (default 0.02 and 0.05)",
    )
    p.add_argument(
        "--horizons",
        default="1,2,4,8,16",
        help="label horizons H to search, as multiples of the capacity in accesses",
    )
    args = p.parse_args(argv)
    trace = read_trace(args.trace)
    distinct = distinct_blocks(trace)
    horizons = [float(h) for h in args.horizons.split(",")]
    results = []
    print(
        "fraction  blocks  lru    belady  oracle-label  oracle-admission  fitted-features",
        file=sys.stderr,
    )
    for fraction in args.capacity_fraction or [0.02, 0.05]:
        capacity = max(1, int(distinct * fraction))
        r = bounds(trace, capacity, horizons)
        r["capacity_fraction"] = fraction
        belady = float(r["belady"])  # type: ignore[arg-type]
        cells = [
            f"{x:.3f} ({x / belady:.2f}x)"
            for x in (float(r[k]) for k in ("oracle_label", "oracle_admission", "fitted_features"))  # type: ignore[arg-type]
        ]
        print(
            f"{fraction:<9} {capacity:<7} {r['lru']:.3f}  {belady:.3f}   " + "  ".join(cells),
            file=sys.stderr,
            flush=True,
        )
        results.append(r)
    print(json.dumps({"trace": args.trace, "distinct_blocks": distinct, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
