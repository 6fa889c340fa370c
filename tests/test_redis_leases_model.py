"""The Redis lease table against the in-process one, driven by hypothesis (differential test).

Both tables implement one protocol (``docs/coherence.md``); the in-process ``LeaseTable`` is
checked against a reference model in ``test_coherence_lease_machine.py``. Here random sequences
of acquire / check_write / commit / renew / release / clock steps run on the in-process table
and on two ``RedisLeaseTable`` s (two gateways) sharing a real redis-server, and every answer
must agree: the same grants and conflicts, the same retry times, the same fencing refusals.
Tokens differ in value between the implementations, so a lease is named by its grant number.
"""

from __future__ import annotations

import asyncio
import itertools
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coherence.errors import LeaseConflict, LeaseLost, LeaseNotFound, StaleToken
from coherence.leases import Granted, Held, LeaseTable, MemoryTokenStore
from coherence.redis_leases import RedisLeaseTable
from coherence.sched import FakeScheduler
from loadtest.procs import free_port, redis_server_binary
from tiers.block import scoped_key
from tiers.clock import FakeClock

pytestmark = pytest.mark.skipif(
    redis_server_binary() is None,
    reason="redis-server not installed (scripts/system-deps.sh installs it; CI always has it)",
)

KEYS = [scoped_key("a", "k0"), scoped_key("a", "k1"), scoped_key("b", "k0")]
TTLS = [125, 250, 500, 1000]
_prefixes = itertools.count()


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    binary = redis_server_binary()
    assert binary is not None
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        ping = ["redis-cli", "-p", str(port), "ping"]
        for _ in range(100):
            done = subprocess.run(ping, capture_output=True, text=True, check=False)
            if done.stdout.strip() == "PONG":
                break
            subprocess.run(["sleep", "0.05"], check=True)  # server start-up, not test timing
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@dataclass(frozen=True)
class Op:
    kind: str
    key: int = 0
    ttl: int = 125
    lease: int = 0  # which earlier grant (by number) the op is about
    gateway: int = 0  # which Redis-backed gateway runs it
    steps: int = 1


OPS = st.one_of(
    st.builds(
        Op,
        kind=st.just("acquire"),
        key=st.integers(0, 2),
        ttl=st.sampled_from(TTLS),
        gateway=st.integers(0, 1),
    ),
    st.builds(
        Op,
        kind=st.sampled_from(["commit", "renew", "release", "write_token"]),
        lease=st.integers(0, 7),
        gateway=st.integers(0, 1),
        ttl=st.sampled_from(TTLS),
    ),
    st.builds(Op, kind=st.just("write_free"), key=st.integers(0, 2), gateway=st.integers(0, 1)),
    st.builds(Op, kind=st.just("advance"), steps=st.integers(1, 12)),
)


def _outcome(call: object) -> str:
    return type(call).__name__


async def _local_answer(table: LeaseTable, op: Op, leases: list[tuple[str, int, str]]) -> object:
    if op.kind == "acquire":
        return await table.acquire(KEYS[op.key], op.ttl)
    if op.kind == "write_free":
        return table.check_write(KEYS[op.key], None).lease_id is not None
    key, token, lease_id = leases[op.lease]
    if op.kind == "write_token":
        return table.check_write(key, token).lease_id == lease_id
    if op.kind == "commit":
        return table.commit(lease_id, token)
    if op.kind == "renew":
        return table.renew(lease_id, op.ttl)
    return table.release(lease_id)


async def _redis_answer(
    table: RedisLeaseTable, op: Op, leases: list[tuple[str, int, str]]
) -> object:
    if op.kind == "acquire":
        return await table.acquire(KEYS[op.key], op.ttl)
    if op.kind == "write_free":
        return (await table.check_write(KEYS[op.key], None)).lease_id is not None
    key, token, lease_id = leases[op.lease]
    if op.kind == "write_token":
        return (await table.check_write(key, token)).lease_id == lease_id
    if op.kind == "commit":
        return await table.commit(lease_id, token, key=key)
    if op.kind == "renew":
        return await table.renew(lease_id, op.ttl)
    return await table.release(lease_id)


async def _run(url: str, ops: list[Op]) -> None:
    clock = FakeClock(start=1_700_000_000.0)  # multiples of 1/8 s: exact in ms
    scheduler = FakeScheduler(clock)
    local = LeaseTable(MemoryTokenStore(), clock=clock, scheduler=scheduler)
    await local.open()
    client = aioredis.Redis.from_url(url)
    prefix = f"model{next(_prefixes)}"
    gateways = [
        RedisLeaseTable(client, prefix=prefix, clock=clock, scheduler=scheduler) for _ in range(2)
    ]
    local_leases: list[tuple[str, int, str]] = []
    redis_leases: list[tuple[str, int, str]] = []
    try:
        for op in ops:
            if op.kind == "advance":
                scheduler.advance(op.steps / 8)
                continue
            if op.kind not in ("acquire", "write_free") and op.lease >= len(local_leases):
                continue
            answers: list[object] = []
            for run in (
                _local_answer(local, op, local_leases),
                _redis_answer(gateways[op.gateway], op, redis_leases),
            ):
                try:
                    answers.append(await run)
                except (LeaseConflict, StaleToken, LeaseLost, LeaseNotFound) as exc:
                    retry = getattr(exc, "retry_after_ms", None)
                    answers.append((type(exc).__name__, retry))
            mine, theirs = answers
            if isinstance(mine, Granted) and isinstance(theirs, Granted):
                local_leases.append((KEYS[op.key], mine.token, mine.lease_id))
                redis_leases.append((KEYS[op.key], theirs.token, theirs.lease_id))
                assert mine.expires_at_ms == theirs.expires_at_ms, op
                continue
            if isinstance(mine, Held) or isinstance(theirs, Held):
                assert mine == theirs, (op, mine, theirs)
                continue
            assert _outcome(mine) == _outcome(theirs) and mine == theirs, (op, mine, theirs)
    finally:
        await client.aclose()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(OPS, min_size=1, max_size=30))
def test_redis_table_answers_as_the_in_process_table(redis_url: str, ops: list[Op]) -> None:
    asyncio.run(_run(redis_url, ops))
