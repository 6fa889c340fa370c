"""The lease table against a plain reference model, driven by hypothesis.

Times are multiples of 1/8 s and TTLs dyadic, so the model's float arithmetic is exact and any
disagreement is the table's, not rounding's.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from coherence.errors import LeaseConflict, LeaseLost, LeaseNotFound, StaleToken
from coherence.leases import (
    Granted,
    Held,
    LeaseTable,
    MemoryTokenStore,
    WaitOutcome,
)
from coherence.sched import FakeScheduler
from tiers.block import scoped_key, tenant_of
from tiers.clock import FakeClock

KEYS = [scoped_key("a", "k0"), scoped_key("a", "k1"), scoped_key("b", "k0")]
TTLS = [125, 250, 500, 1000]
STEPS = st.integers(min_value=1, max_value=12)  # eighths of a second
MAX_WAIT_MS = 1000


@dataclass
class MLease:
    key: str
    lease_id: str
    token: int
    deadline: float
    ttl_s: float
    generation: int
    ended: str | None = None  # "committed" | "released" | "expired"


@dataclass
class MWaiter:
    task: asyncio.Task[WaitOutcome]
    lease: MLease | None
    deadline: float
    expected: set[WaitOutcome] | None = None


@dataclass
class Model:
    generation: int = 0
    leases: list[MLease] = field(default_factory=list)
    newest: dict[str, MLease] = field(default_factory=dict)  # current generation only


class LeaseMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        self.sched = FakeScheduler(self.clock)
        self.store = MemoryTokenStore()
        self.table = self._new_table()
        self.m = Model()
        self.last_token: dict[str, int] = {}  # per tenant: each has its own counter
        self.granted: set[int] = set()
        self.waiters: list[MWaiter] = []

    def _new_table(self) -> LeaseTable:
        return LeaseTable(
            self.store,
            clock=self.clock,
            scheduler=self.sched,
            token_span=3,
            max_wait_ms=MAX_WAIT_MS,
            max_remembered=10**6,
        )

    # -- model helpers --------------------------------------------------------------------------

    def now(self) -> float:
        return self.clock.monotonic()

    def live(self, key: str) -> MLease | None:
        lease = self.m.newest.get(key)
        if lease is None or lease.ended is not None:
            return None
        if self.now() >= lease.deadline:
            lease.ended = "expired"
            return None
        return lease

    def end(self, lease: MLease, how: str) -> None:
        lease.ended = how
        outcome = WaitOutcome.COMMITTED if how == "committed" else WaitOutcome.GONE
        for w in self.waiters:
            if w.lease is lease and w.expected is None:
                w.expected = {outcome}

    def settle(self) -> None:
        for _ in range(3):
            self.loop.run_until_complete(asyncio.sleep(0))

    def pending_waiters(self) -> bool:
        return any(w.expected is None for w in self.waiters)

    # -- rules --------------------------------------------------------------------------------

    @rule(key=st.sampled_from(KEYS), ttl=st.sampled_from(TTLS))
    def acquire(self, key: str, ttl: int) -> None:
        holder = self.live(key)
        got = self.loop.run_until_complete(self.table.acquire(key, ttl))
        if holder is not None:
            assert got == Held(math.ceil((holder.deadline - self.now()) * 1000))
            return
        assert isinstance(got, Granted)
        tenant = tenant_of(key)
        # Tokens grow per tenant (across restarts too), and no two grants share one.
        assert got.token > self.last_token.get(tenant, 0)
        assert got.token not in self.granted
        self.last_token[tenant] = got.token
        self.granted.add(got.token)
        ttl_s = ttl / 1000
        lease = MLease(key, got.lease_id, got.token, self.now() + ttl_s, ttl_s, self.m.generation)
        self.m.leases.append(lease)
        self.m.newest[key] = lease

    @precondition(lambda self: self.m.leases)
    @rule(data=st.data(), ttl=st.sampled_from([None, *TTLS]))
    def renew(self, data: st.DataObject, ttl: int | None) -> None:
        lease = data.draw(st.sampled_from(self.m.leases[-4:]))
        current = lease.generation == self.m.generation and self.m.newest.get(lease.key) is lease
        try:
            self.table.renew(lease.lease_id, ttl)
        except LeaseNotFound:
            assert not current
            return
        except LeaseLost:
            assert current and self.live(lease.key) is None
            return
        assert current and self.live(lease.key) is lease
        if ttl is not None:
            lease.ttl_s = ttl / 1000
        lease.deadline = self.now() + lease.ttl_s

    @precondition(lambda self: self.m.leases)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        lease = data.draw(st.sampled_from(self.m.leases[-4:]))
        mine = lease.generation == self.m.generation and self.live(lease.key) is lease
        assert self.table.release(lease.lease_id) is mine
        if mine:
            self.end(lease, "released")

    @rule(key=st.sampled_from(KEYS), data=st.data())
    def put(self, key: str, data: st.DataObject) -> None:
        choices: list[int | None] = [None, 0, max(self.granted, default=0) + 1]
        choices += [lease.token for lease in self.m.leases]
        token = data.draw(st.sampled_from(choices))
        holder = self.live(key)
        newest = self.m.newest.get(key)
        try:
            permit = self.table.check_write(key, token)
        except LeaseConflict as exc:
            assert holder is not None and token is None
            assert exc.retry_after_ms == math.ceil((holder.deadline - self.now()) * 1000)
            return
        except StaleToken:
            if holder is not None:
                assert token is not None and token != holder.token
            else:
                assert token is not None and (newest is None or newest.token != token)
            return
        if holder is not None:
            assert token == holder.token and permit.lease_id == holder.lease_id
            assert permit.token is not None
            assert self.table.commit(permit.lease_id, permit.token)
            self.end(holder, "committed")
        else:
            assert permit.lease_id is None
            assert token is None or (newest is not None and newest.token == token)

    @precondition(lambda self: self.m.leases)
    @rule(data=st.data())
    def commit_any(self, data: st.DataObject) -> None:
        lease = data.draw(st.sampled_from(self.m.leases[-4:]))
        token = data.draw(st.sampled_from([lease.token, lease.token + 1]))
        ok = (
            lease.generation == self.m.generation
            and self.live(lease.key) is lease
            and token == lease.token
        )
        assert self.table.commit(lease.lease_id, token) is ok
        if ok:
            self.end(lease, "committed")

    @rule(key=st.sampled_from(KEYS), timeout=st.sampled_from([0, 125, 375, 1000, 5000]))
    def wait(self, key: str, timeout: int) -> None:
        holder = self.live(key)
        task = self.loop.create_task(self.table.wait(key, timeout))
        deadline = self.now() + min(timeout, MAX_WAIT_MS) / 1000
        w = MWaiter(task, holder, deadline)
        if holder is None:
            w.expected = {WaitOutcome.NO_LEASE}
        elif timeout == 0:
            w.expected = {WaitOutcome.TIMEOUT}
        self.waiters.append(w)
        self.settle()

    @rule(steps=STEPS)
    def advance(self, steps: int) -> None:
        """Time passes with timers firing: expiries and waiter timeouts in due order."""
        target = self.now() + steps / 8
        for w in self.waiters:
            if w.expected is not None or w.lease is None:
                continue
            lease_end = w.lease.deadline
            if w.deadline <= target or lease_end <= target:
                if lease_end < w.deadline:
                    w.expected = {WaitOutcome.GONE}
                elif lease_end > w.deadline:
                    w.expected = {WaitOutcome.TIMEOUT}
                else:  # both due at once: the scheduler's tie order decides
                    w.expected = {WaitOutcome.GONE, WaitOutcome.TIMEOUT}
        self.sched.advance(steps / 8)
        for lease in self.m.newest.values():
            if lease.ended is None and self.now() >= lease.deadline:
                lease.ended = "expired"

    @precondition(lambda self: not self.pending_waiters())
    @rule(steps=STEPS)
    def advance_clock_only(self, steps: int) -> None:
        """Time passes with no timer run: expiry must be found lazily."""
        self.clock.advance(steps / 8)

    @rule()
    def reap(self) -> None:
        self.table.expire_due()
        live = sum(1 for key in KEYS if self.live(key) is not None)
        assert self.table.stats().live == live

    @precondition(lambda self: not self.pending_waiters())
    @rule()
    def restart(self) -> None:
        self.table = self._new_table()
        self.m.generation += 1
        self.m.newest.clear()

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def holders_match(self) -> None:
        for key in KEYS:
            lease = self.live(key)
            want = None if lease is None else (lease.lease_id, lease.token)
            assert self.table.holder(key) == want

    @invariant()
    def waiters_match(self) -> None:
        self.settle()
        for w in self.waiters:
            if w.expected is None:
                assert not w.task.done(), f"woken early with {w.task.result()}"
            else:
                assert w.task.done(), f"still parked, expected {w.expected}"
                assert w.task.result() in w.expected
        self.waiters = [w for w in self.waiters if not w.task.done()]
        assert self.table.stats().waiters == len(self.waiters)

    def teardown(self) -> None:
        for w in self.waiters:
            w.task.cancel()
        self.settle()
        self.loop.close()


TestLeaseTable = LeaseMachine.TestCase
TestLeaseTable.settings = settings(
    max_examples=300,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
