"""The trace replay CLI (loadtest.replay) and its simulator."""

from __future__ import annotations

import argparse
import json
import random
from collections import OrderedDict
from pathlib import Path

import aiohttp
import pytest

from loadtest import replay
from loadtest.simulate import Simulator, TierSpec, TraceRequest, build_policies, read_trace
from tests.conftest import RunningGateway
from tiers.block import Block
from tiers.hierarchy import Hierarchy
from tiers.memory import ArenaTier
from tiers.policies import AdaptivePrefixPolicy
from tiers.policy import Access, LRUPolicy

# CI clones the repo with shared/ beside it.
REAL_TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "synthetic_trace.jsonl"


def write_trace(path: Path, *, requests: int = 300, seed: int = 7) -> Path:
    """Sessions that come back with longer prompts, over a few shared system prompts."""
    rng = random.Random(seed)
    next_id = 1000
    sessions: list[list[int]] = []
    lines = []
    for i in range(requests):
        if sessions and rng.random() < 0.6:
            chain = rng.choice(sessions)
        else:
            chain = [rng.randrange(5) * 100 + j for j in range(rng.randrange(1, 4))]
            sessions.append(chain)
        for _ in range(rng.randrange(1, 6)):
            chain.append(next_id)
            next_id += 1
        lines.append(
            json.dumps(
                {
                    "timestamp": i * 50,
                    "input_length": 512 * len(chain),
                    "output_length": 8,
                    "hash_ids": list(chain),
                }
            )
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def reference_lru(path: Path, capacity: int) -> float:
    """A plain LRU prefix cache, independent of tiers.policy."""
    cache: OrderedDict[str, None] = OrderedDict()
    hits = total = 0
    for line in path.read_text().splitlines():
        keys = [str(h) for h in json.loads(line)["hash_ids"]]
        total += len(keys)
        prefix = True
        for key in keys:
            if key in cache:
                cache.move_to_end(key)
                hits += prefix
            else:
                prefix = False
                if capacity == 0:
                    continue
                if len(cache) >= capacity:
                    cache.popitem(last=False)
                cache[key] = None
    return hits / total


def run(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    assert replay.main(list(args)) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert isinstance(result, dict)
    return result


def test_last_line_is_json_with_fields(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = write_trace(tmp_path / "t.jsonl")
    r = run(capsys, "--trace", str(trace), "--simulate", "--capacity-blocks", "64")
    for field in (
        "prefix_hit_ratio",
        "policy",
        "hits",
        "requested_blocks",
        "capacity_blocks",
        "elapsed_s",
    ):
        assert field in r
    assert r["capacity_blocks"] == 64
    assert 0 < float(r["prefix_hit_ratio"]) < 1  # type: ignore[arg-type]


@pytest.mark.parametrize("capacity", [0, 16, 64, 256])
def test_lru_agrees_with_reference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], capacity: int
) -> None:
    trace = write_trace(tmp_path / "t.jsonl")
    r = run(
        capsys,
        "--trace",
        str(trace),
        "--simulate",
        "--capacity-blocks",
        str(capacity),
        "--policy",
        "lru",
    )
    assert r["policy"] == "lru"
    assert round(float(r["prefix_hit_ratio"]), 3) == round(  # type: ignore[arg-type]
        reference_lru(trace, capacity), 3
    )


@pytest.mark.skipif(not REAL_TRACE.exists(), reason="shared trace not present")
def test_lru_agrees_with_reference_on_mooncake_trace(capsys: pytest.CaptureFixture[str]) -> None:
    r = run(
        capsys,
        "--trace",
        str(REAL_TRACE),
        "--simulate",
        "--capacity-blocks",
        "878",
        "--policy",
        "lru",
    )
    assert round(float(r["prefix_hit_ratio"]), 3) == round(  # type: ignore[arg-type]
        reference_lru(REAL_TRACE, 878), 3
    )


def test_belady_bounds_online_block_hits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = write_trace(tmp_path / "t.jsonl")
    base = ["--trace", str(trace), "--simulate", "--capacity-blocks", "48"]
    opt = run(capsys, *base, "--policy", "belady")
    assert opt["policy"] == "belady"
    for name in ("lru", "prefix-lru2", "w-tinylfu"):
        r = run(capsys, *base, "--policy", name)
        assert float(opt["block_hit_ratio"]) >= float(r["block_hit_ratio"])  # type: ignore[arg-type]


def test_tiers_and_fraction(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = write_trace(tmp_path / "t.jsonl")
    r = run(capsys, "--trace", str(trace), "--simulate", "--tiers", "hbm=8,dram=32,disk=128")
    tiers = r["tiers"]
    assert isinstance(tiers, list)
    assert [t["name"] for t in tiers] == ["hbm", "dram", "disk"]
    assert sum(t["prefix_hits"] for t in tiers) == r["hits"]
    assert all(t["blocks"] <= t["capacity_blocks"] for t in tiers)
    assert tiers[1]["inserts"] > 0  # evictions from hbm were demoted, not dropped
    distinct = len({k for req in read_trace(trace) for k in req.keys})
    r = run(capsys, "--trace", str(trace), "--simulate", "--capacity-fraction", "0.1")
    assert r["capacity_blocks"] == int(0.1 * distinct)


def test_bad_arguments_exit_nonzero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = write_trace(tmp_path / "t.jsonl", requests=5)
    assert replay.main(["--trace", str(trace), "--simulate"]) == 2
    assert (
        replay.main(
            ["--trace", str(trace), "--simulate", "--capacity-blocks", "4", "--policy", "nope"]
        )
        == 2
    )
    assert (
        replay.main(
            ["--trace", str(tmp_path / "missing.jsonl"), "--simulate", "--capacity-blocks", "4"]
        )
        == 2
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0}\n')
    assert replay.main(["--trace", str(bad), "--simulate", "--capacity-blocks", "4"]) == 2


async def test_live_replay_against_a_real_gateway_matches_the_simulation(
    tmp_path: Path, gateway: RunningGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    trace_path = write_trace(tmp_path / "t.jsonl", requests=60)
    expected = run(capsys, "--trace", str(trace_path), "--simulate", "--capacity-blocks", "100000")
    args = argparse.Namespace(
        server=gateway.url,
        token=None,
        speedup=1e9,
        concurrency=1,  # one request at a time, in trace order: the same as the simulation
        read_hits=True,
        block_bytes=4096,
    )
    result = await replay.replay_http(read_trace(trace_path), args)
    assert result["errors"] == 0
    assert result["requested_blocks"] == expected["requested_blocks"]
    assert result["prefix_hit_ratio"] == pytest.approx(expected["prefix_hit_ratio"])
    assert result["hits"] == expected["hits"] and int(result["hits"]) > 0  # type: ignore[call-overload]
    latency = result["latency"]
    assert isinstance(latency, dict) and "lookup" in latency and "get:hbm" in latency


class _Recording(LRUPolicy):
    """LRU that records which keys it was told missed."""

    def __init__(self) -> None:
        super().__init__()
        self.missed: list[str] = []

    def on_miss(self, access: Access) -> None:
        self.missed.append(access.key)
        super().on_miss(access)


async def test_a_hit_below_is_a_miss_above_in_the_simulator_as_in_the_live_hierarchy() -> None:
    # What is tuned offline is what runs: a hit in dram tells hbm's policy it missed there too
    # (history-keeping policies such as prefix-lru2 rank the promoted block by it).
    keys = ["a", "b", "a"]  # "b" pushes "a" down to dram; then "a" is read from there
    sim_top, sim_below = _Recording(), _Recording()
    sim = Simulator([(TierSpec("hbm", 1), sim_top), (TierSpec("dram", 4), sim_below)])
    for i, key in enumerate(keys):
        sim.request(TraceRequest(float(i), (key,)))
    live_top, live_below = _Recording(), _Recording()
    h = Hierarchy(
        [ArenaTier("hbm", 4096, page_bytes=4096), ArenaTier("dram", 4 * 4096, page_bytes=4096)],
        policies=[live_top, live_below],
    )
    for key in keys:
        if await h.get(key) is None:
            await h.put(key, Block.of(key.encode() * 4096))
        await h.quiesce()
    assert h.locate("a") == "hbm"
    assert live_top.missed == ["a", "b", "a"]
    assert sim_top.missed == live_top.missed


def test_the_live_hierarchy_and_the_simulator_group_tier_policies_alike() -> None:
    # prefix-adaptive decides for the run of tiers below it (tiers.policy.link_tiers); if only
    # the simulator grouped them, offline results would not carry over to the live tiers.
    specs = [TierSpec("hbm", 2), TierSpec("dram", 4), TierSpec("disk", 8)]
    sim_policies = [p for _, p in build_policies("prefix-adaptive", specs, [])[0]]
    live_policies = [AdaptivePrefixPolicy() for _ in specs]
    Hierarchy(
        [ArenaTier(s.name, s.capacity_blocks * 4096, page_bytes=4096) for s in specs],
        policies=live_policies,
    )
    assert [p.decides_for for p in live_policies] == [2, 0, 0]
    assert [getattr(p, "decides_for", None) for p in sim_policies] == [2, 0, 0]


class _Events(LRUPolicy):
    """LRU that records every event it is told, with the access's chain hints."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str, int | None, str | None]] = []

    def on_miss(self, access: Access) -> None:
        self.events.append(("miss", access.key, access.depth, access.prev))
        super().on_miss(access)

    def on_hit(self, access: Access) -> None:
        self.events.append(("hit", access.key, access.depth, access.prev))
        super().on_hit(access)

    def on_insert(self, access: Access) -> None:
        self.events.append(("insert", access.key, access.depth, access.prev))
        super().on_insert(access)

    def reads(self) -> list[tuple[str, str, int | None, str | None]]:
        return [e for e in self.events if e[0] != "insert"]


async def test_the_live_request_flow_tells_the_policy_what_the_simulator_does() -> None:
    # A frontend looks a prompt's chain up, reads the present prefix and stores the rest.
    # The live policy must see the same reads, in the same order and with the same chain
    # hints, as the simulator's: that is what makes offline tuning carry over.
    # One known difference is left out: a block present *after* its request's first miss is
    # a hit for the live lookup but may be evicted by an earlier block of the same request in
    # the simulator, which inserts each missing block as it goes. Prefix hits never differ.
    requests = [("a", "b", "c"), ("a", "b", "d"), ("a", "e"), ("a", "e", "f"), ("a", "b", "g")]
    sim_policy = _Events()
    sim = Simulator([(TierSpec("hbm", 3), sim_policy)])
    for i, keys in enumerate(requests):
        sim.request(TraceRequest(float(i), keys))
    live_policy = _Events()
    h = Hierarchy([ArenaTier("hbm", 3 * 4096, page_bytes=4096)], policies=[live_policy])
    for keys in requests:
        h.note_request(keys)
        present = len(h.lookup(keys))
        for key in keys[:present]:
            assert await h.get(key) is not None
        for key in keys[present:]:
            await h.put(key, Block.of(key.encode() * 4096))
    assert live_policy.reads() == sim_policy.reads()
    assert sorted(e for e in live_policy.events if e[0] == "insert") == sorted(
        e for e in sim_policy.events if e[0] == "insert"
    )
    assert ("hit", "e", 1, "a") in live_policy.reads()  # a hit carries its chain position


async def test_a_looked_up_read_counts_once_and_carries_its_chain(gateway: RunningGateway) -> None:
    policy = _Events()
    gateway.hierarchy._policies[0] = policy  # the hbm tier's, where these blocks live
    keys = ["r0", "r1", "r2"]
    async with aiohttp.ClientSession() as http:
        for key in keys[:2]:
            async with http.put(gateway.block_url(key), data=key.encode() * 100) as resp:
                assert resp.status == 201
        policy.events.clear()
        async with http.post(f"{gateway.url}/v1/lookup", json={"keys": keys}) as resp:
            assert (await resp.json())["prefix_hits"] == 2
        for key in keys[:2]:
            async with http.get(gateway.block_url(key)) as resp:
                assert resp.status == 200
    assert policy.reads() == [
        ("hit", "default/r0", 0, None),
        ("hit", "default/r1", 1, "default/r0"),
        ("miss", "default/r2", 2, "default/r1"),
    ]
