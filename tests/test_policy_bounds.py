"""loadtest.policy_bounds: the oracle-labelled bounds behind docs/policies.md."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest

from loadtest import policy_bounds
from loadtest.policy_bounds import OracleLabelPolicy, bounds, feature_table
from loadtest.simulate import TraceRequest
from tiers.policy import LRUPolicy


def cyclic(chains: int, depth: int, rounds: int) -> list[TraceRequest]:
    """The same ``chains`` prompts asked in turn: a scan LRU cannot hold when it is too small."""
    return [
        TraceRequest(float(r * chains + c), tuple(f"c{c}:{d}" for d in range(depth)))
        for r in range(rounds)
        for c in range(chains)
    ]


def test_the_perfect_label_keeps_what_lru_scans_away() -> None:
    trace = cyclic(chains=8, depth=4, rounds=10)
    capacity = 16  # half the 32 blocks: LRU always evicts the chain asked for next
    lru = policy_bounds.prefix_hit_ratio(trace, capacity, lambda _o: LRUPolicy())
    assert lru == 0.0
    # Every block comes back 32 accesses later: with a shorter horizon none is "soon", so the
    # newest go first and the cache keeps what it holds, which the scan then hits.
    label = policy_bounds.prefix_hit_ratio(
        trace, capacity, partial(OracleLabelPolicy, horizon=16.0, admission=False)
    )
    assert label >= 0.4
    # With a horizon past the cycle every block is "soon" (but those of the last round): LRU
    # order, which the scan defeats.
    label_all = policy_bounds.prefix_hit_ratio(
        trace, capacity, partial(OracleLabelPolicy, horizon=64.0, admission=False)
    )
    assert label_all < 0.1


def test_a_fitted_table_that_labels_everything_soon_is_lru() -> None:
    trace = cyclic(chains=5, depth=3, rounds=6) + cyclic(chains=3, depth=5, rounds=4)
    table = feature_table(trace, horizon=10.0)
    assert all(0.0 <= rate <= 1.0 for rate in table.values())
    for capacity in (4, 9, 20):
        lru = policy_bounds.prefix_hit_ratio(trace, capacity, lambda _o: LRUPolicy())
        everything = policy_bounds.prefix_hit_ratio(
            trace,
            capacity,
            partial(OracleLabelPolicy, horizon=10.0, admission=False, table=table, threshold=0.0),
        )
        assert everything == lru


def test_bounds_and_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = cyclic(chains=8, depth=4, rounds=10)
    r = bounds(trace, 16, [1.0, 2.0], thresholds=(0.0, 0.5))
    assert float(r["belady"]) >= float(r["oracle_admission"]) > float(r["lru"])  # type: ignore[arg-type]
    assert r["oracle_label_horizon"] in (1.0, 2.0)
    path = tmp_path / "t.jsonl"
    path.write_text(
        "".join(
            json.dumps({"timestamp": req.timestamp_ms, "hash_ids": list(req.keys)}) + "\n"
            for req in trace
        )
    )
    assert policy_bounds.main(["--trace", str(path), "--capacity-fraction", "0.5"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["distinct_blocks"] == 32 and out["results"][0]["capacity_blocks"] == 16
