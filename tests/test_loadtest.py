"""The load-test harness against real servers on loopback: tiny runs, sane results."""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import pytest

from loadtest import report
from loadtest.driver import Load, run_scenario
from loadtest.procs import redis_server_binary
from loadtest.recorder import Recorder, RunResult, summarize
from loadtest.run import main as run_main
from loadtest.scenarios import Params, make_scenario
from loadtest.sizes import format_size, parse_size
from loadtest.targets import (
    GetResult,
    Lease,
    LeaseRefusal,
    PutStatus,
    SupportsLeases,
    TargetOptions,
    open_target,
)
from loadtest.targets.mooncake_target import mooncake_available

BLOCK = 64 << 10
TINY = Load(concurrency=4, duration_s=1.0, warmup_s=0.1)
SHORT = Load(concurrency=4, duration_s=0.5, warmup_s=0.05)
PARAMS = Params(block_size=BLOCK, key_count=8, lookup_keys=8, verify=True)
OPTIONS = TargetOptions(concurrency=4, block_size=BLOCK, peer_bytes=64 << 20)

needs_redis = pytest.mark.skipif(
    redis_server_binary() is None,
    reason="redis-server not installed (scripts/peers.sh install, or apt-get install redis-server)",
)
needs_mooncake = pytest.mark.skipif(
    not mooncake_available(),
    reason="mooncake.store not importable: a benchmark-only peer (scripts/peers.sh install)",
)


def assert_sane(result: RunResult, *, op: str, moves_bytes: bool) -> None:
    assert result.errors == 0, result.error_samples
    assert result.ops > 0
    assert 0.45 < result.duration_s < 3.0
    assert result.latency_ms["p50"] <= result.latency_ms["p99"] <= result.latency_ms["max"]
    assert op in result.by_op
    assert result.timeline and sum(p["ops"] for p in result.timeline) == result.ops
    if moves_bytes:
        assert result.bytes == result.ops * BLOCK
        # The result is rounded to 4 decimals: a slow run's rounding error exceeds 1%.
        assert result.throughput_gbps == pytest.approx(
            result.bytes / result.duration_s / 1e9, rel=1e-2, abs=1e-4
        )
    # The whole result survives a JSON round trip (what results.json holds).
    assert RunResult.from_json(json.loads(json.dumps(result.as_json()))) == result


@pytest.mark.parametrize(
    "target", ["dict", pytest.param("redis", marks=needs_redis)], ids=["dict", "redis"]
)
async def test_hot_get_put_and_lookup(target: str) -> None:
    async with open_target(target, OPTIONS) as t:
        hot = await run_scenario(t, make_scenario("hot-get", PARAMS), PARAMS, TINY, progress=None)
        assert_sane(hot, op="get", moves_bytes=True)
        assert hot.outcomes == {"get:hit": hot.ops}  # verify=True compared every byte
        assert set(hot.by_tier) == {target}

        put = await run_scenario(t, make_scenario("put", PARAMS), PARAMS, SHORT, progress=None)
        assert_sane(put, op="put", moves_bytes=True)
        assert put.outcomes == {"put:stored": put.ops}

        look = await run_scenario(t, make_scenario("lookup", PARAMS), PARAMS, SHORT, progress=None)
        assert_sane(look, op="lookup", moves_bytes=False)
        assert look.outcomes == {"lookup:ok": look.ops}  # every prefix count was right


@needs_mooncake
async def test_mooncake_smoke() -> None:
    async with open_target("mooncake", OPTIONS) as t:
        mixed = await run_scenario(t, make_scenario("mixed", PARAMS), PARAMS, TINY, progress=None)
        assert_sane(mixed, op="get", moves_bytes=True)
        assert {"get", "put"} <= set(mixed.by_op)
        assert mixed.outcomes["get:hit"] + mixed.outcomes["put:stored"] == mixed.ops


async def test_missing_peer_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from loadtest import procs
    from loadtest.procs import ServerStartError

    monkeypatch.setattr(procs, "redis_server_binary", lambda: None)
    with pytest.raises(ServerStartError, match="redis-server not found"):
        async with open_target("redis", OPTIONS):
            pass


def test_run_cli_writes_json_markdown_and_last_json_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["put", "--target", "dict", "--block-size", "64KiB", "--concurrency", "4"]
    argv += ["--duration", "0.5", "--warmup", "0.05", "--quiet", "--out", str(tmp_path)]
    argv += ["--peer-memory", "64MiB"]
    assert run_main(argv) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    doc = json.loads((tmp_path / "results.json").read_text())
    assert last["results"] == str(tmp_path / "results.json")
    (run,) = doc["runs"]
    assert run["target"] == "dict" and run["scenario"] == "put"
    assert run["ops"] > 0 and run["bytes"] == run["ops"] * BLOCK
    assert doc["summary"]["put"]["dict"]["gbps"] == run["throughput_gbps"]
    assert "| dict |" in (tmp_path / "summary.md").read_text()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "throughput_put.png").stat().st_size > 0
    assert (tmp_path / "latency_cdf_put.png").stat().st_size > 0


class FakeLeaseStore:
    """An in-process model of kvgate's lease rules, enough to drive the lease scenario."""

    name = "fake"

    def __init__(self) -> None:
        self.blocks: dict[str, bytes] = {}
        self.holders: dict[str, str] = {}
        self.tokens = 0
        self.committed: dict[str, asyncio.Event] = {}

    async def put(self, key: str, value: bytes) -> PutStatus:
        return await self.put_leased(key, value, token="")

    async def get(self, key: str) -> GetResult:
        return GetResult(self.blocks.get(key), "dram")

    async def close(self) -> None:
        return None

    async def acquire_lease(self, key: str, *, ttl_ms: int) -> Lease | LeaseRefusal:
        await asyncio.sleep(0)
        if key in self.blocks:
            return LeaseRefusal.EXISTS
        if key in self.holders:
            return LeaseRefusal.HELD
        self.tokens += 1
        self.holders[key] = str(self.tokens)
        self.committed.setdefault(key, asyncio.Event())
        return Lease(lease_id=key, token=str(self.tokens))

    async def put_leased(self, key: str, value: bytes, *, token: str) -> PutStatus:
        # Yield first, so other workers race the holder while the write is in flight.
        await asyncio.sleep(0)
        if key in self.blocks:
            return PutStatus.EXISTS
        if self.holders.get(key) != token:
            return PutStatus.CONFLICT
        self.blocks[key] = value
        del self.holders[key]
        self.committed[key].set()
        return PutStatus.STORED

    async def get_waiting(self, key: str, *, wait_ms: int) -> GetResult:
        if key not in self.blocks and key in self.committed:
            await asyncio.wait_for(self.committed[key].wait(), wait_ms / 1000)
        return await self.get(key)

    async def release_lease(self, lease_id: str) -> None:
        self.holders.pop(lease_id, None)


async def test_lease_scenario_races_writes_once_and_serves_waiters() -> None:
    store = FakeLeaseStore()
    assert isinstance(store, SupportsLeases)
    params = Params(block_size=BLOCK, key_count=2, lease_ttl_ms=1000)
    load = Load(concurrency=8, duration_s=10.0, requests=400, warmup_s=0.0)
    result = await run_scenario(store, make_scenario("lease", params), params, load, progress=None)
    assert result.errors == 0
    granted = result.outcomes.get("lease:granted", 0)
    # Every granted lease ended in exactly one stored write; the losers were held off or read.
    assert granted > 0 and result.outcomes["leased-put:stored"] == granted
    assert len(store.blocks) == granted
    assert result.outcomes.get("lease:held", 0) > 0
    assert result.outcomes.get("wait-get:served", 0) == result.outcomes.get("lease:held", 0)
    assert result.bytes == (granted + result.outcomes["wait-get:served"]) * BLOCK


def test_summary_timeline_and_report_from_a_fake_clock() -> None:
    now = [100.0]
    rec = Recorder(clock=lambda: now[0])
    rec.start_at = 100.0
    for i in range(30):  # 30 ops over 3 s, 10 ms each, 1 KiB each
        now[0] = 100.0 + 0.1 * i + 0.01
        rec.record("get", "hbm" if i % 2 else "dram", now[0] - 0.01, 1024, "hit")
    result = summarize(rec, scenario="hot-get", target="kvgate", params={}, stopped_at=103.0)
    assert result.ops == 30 and result.bytes == 30 * 1024
    assert [p["ops"] for p in result.timeline] == [10, 10, 10]
    assert result.latency_ms["p50"] == pytest.approx(10.0, abs=1e-6)
    assert set(result.cdf_ms) == {"get@hbm", "get@dram"}
    peer = summarize(rec, scenario="hot-get", target="redis", params={}, stopped_at=106.0)
    assert report.ratios(report.aggregate([result, peer])) == {
        "hot-get": {"kvgate/redis": pytest.approx(2.0, rel=1e-2)}
    }


@pytest.mark.parametrize(
    ("text", "n"), [("4096", 4096), ("64KiB", 65536), ("1MiB", 1 << 20), ("2GiB", 2 << 30)]
)
def test_sizes_round_trip(text: str, n: int) -> None:
    assert parse_size(text) == n
    assert parse_size(format_size(n)) == n


def test_bad_size_is_refused() -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size("12 parsecs")


def test_a_dead_target_fails_the_run_loudly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from loadtest.procs import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    argv = ["put", "--target", "kvgate", "--url", url, "--duration", "0.3", "--warmup", "0.2"]
    argv += ["--quiet", "--no-plots", "--out", str(tmp_path)]
    assert run_main(argv) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["ok"] is False
    assert "no operation completed" in captured.err
    (run,) = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert run["ops"] == 0 and run["errors"] > 0


def test_client_malloc_setting_is_reported() -> None:
    from loadtest import alloc

    assert alloc.apply("default") == "default"
    applied = alloc.apply("keep")
    # On glibc the thresholds are set; elsewhere nothing changes and the run says so.
    assert applied.startswith("keep") == alloc.keep_freed_memory()


async def test_a_target_limited_to_some_scenarios_only_runs_those() -> None:
    from loadtest.matrix import Entry, run_rounds

    class Limited:
        name = "limited"
        only_scenarios = frozenset({"put"})

        def __init__(self) -> None:
            self.store: dict[str, bytes] = {}

        async def put(self, key: str, value: bytes) -> PutStatus:
            self.store.setdefault(key, value)
            return PutStatus.STORED

        async def get(self, key: str) -> GetResult:
            return GetResult(self.store.get(key), self.name)

        async def close(self) -> None:
            return None

    async with open_target("dict", OPTIONS) as full:
        limited = Limited()
        entries = [Entry("hot-get", PARAMS, SHORT), Entry("put", PARAMS, SHORT)]
        results = await run_rounds(entries, [full, limited], rounds=1, progress=None)
    ran = sorted((r.scenario, r.target) for r in results)
    assert ran == [("hot-get", "dict"), ("put", "dict"), ("put", "limited")]
    assert limited.store  # it did run the put scenario


async def test_kvgate_shed_target_starts_a_shedding_gateway() -> None:
    from loadtest.targets import SHED_SETTINGS

    assert SHED_SETTINGS == {"KVGATE_DISK_SHED": "true"}
    async with open_target("kvgate-shed", OPTIONS) as t:
        assert t.name == "kvgate-shed"
        assert getattr(t, "only_scenarios", None) == frozenset({"put", "mixed"})
        put = await run_scenario(t, make_scenario("put", PARAMS), PARAMS, SHORT, progress=None)
        assert_sane(put, op="put", moves_bytes=True)
        assert put.outcomes == {"put:stored": put.ops}


async def test_kvgate_ram_target_starts_a_gateway_without_a_disk_tier() -> None:
    async with open_target("kvgate-ram", OPTIONS) as t:
        assert t.name == "kvgate-ram"
        assert getattr(t, "only_scenarios", None) == frozenset({"put", "mixed"})
        url = t._base
        async with aiohttp.ClientSession() as http, http.get(f"{url}/v1/stats") as resp:
            tiers = [tier["name"] for tier in (await resp.json())["tiers"]]
        assert tiers == ["hbm", "dram"]
        put = await run_scenario(t, make_scenario("put", PARAMS), PARAMS, SHORT, progress=None)
        assert_sane(put, op="put", moves_bytes=True)
        assert put.outcomes == {"put:stored": put.ops}


async def test_shm_target_sends_waiting_calls_in_concurrent_batches_of_shm_batch(
    tmp_path: Path,
) -> None:
    from loadtest.cli_common import add_target_options, target_options
    from loadtest.targets.shm_target import KvgateShmTarget
    from tests.conftest import running_gateway

    parser = argparse.ArgumentParser()
    add_target_options(parser)
    options = target_options(parser.parse_args(["--shm-batch", "4"]), block_size=1, concurrency=6)
    assert options.shm_batch == 4
    async with running_gateway(tmp_path) as gw:
        target = KvgateShmTarget(gw.url, concurrency=6, max_batch=options.shm_batch)
        try:
            await target.check()
            for i in range(6):
                await target.put(f"b{i}", bytes([i]) * 1000)
            calls: list[list[str]] = []
            in_flight = 0
            most = 0
            get_many = target._kv.get_many

            async def watched(keys: Sequence[str]) -> list[bytes | None]:
                nonlocal in_flight, most
                calls.append(list(keys))
                in_flight += 1
                most = max(most, in_flight)
                try:
                    return await get_many(keys)
                finally:
                    in_flight -= 1

            target._kv.get_many = watched  # type: ignore[method-assign]
            got = await asyncio.gather(*(target.get(f"b{i}") for i in range(6)))
            assert [r.value for r in got] == [bytes([i]) * 1000 for i in range(6)]
            assert [len(c) for c in calls] == [4, 2]
            assert most == 2  # the two batches were in flight together
        finally:
            await target.close()


async def test_a_started_kvgate_is_measured_only_once_its_arenas_are_paged_in() -> None:
    from loadtest.procs import KvgateSizes, kvgate_server
    from tiers.arena import PREFAULT_ENDED

    def serve_dirs() -> set[Path]:  # the harness's scratch dirs (a listing, no waiting)
        return set(Path(tempfile.gettempdir()).glob("kvgate-serve-*"))

    before = serve_dirs()
    # 1.25 GiB of arena: paging it in takes longer than the gateway takes to answer /readyz.
    sizes = KvgateSizes(hbm_bytes="256MiB", dram_bytes="1GiB", disk_bytes="256MiB")
    async with kvgate_server(sizes=sizes, extra_args=["--no-shm"]) as url:
        async with aiohttp.ClientSession() as http, http.get(f"{url}/readyz") as resp:
            assert resp.status == 200
        (mine,) = serve_dirs() - before
        # The line of a finished paging in, not of a refused one.
        assert f"MiB {PREFAULT_ENDED} in" in (mine / "kvgate.log").read_text(errors="replace")
