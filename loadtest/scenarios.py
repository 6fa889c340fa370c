"""The scenarios: what one worker does per operation, and what must exist beforehand.

A scenario is stateless between runs except for its key counters; ``prepare`` loads the
working set (not measured), ``op`` performs and records exactly one logical operation.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from loadtest.recorder import Recorder
from loadtest.targets import (
    Lease,
    LeaseRefusal,
    PutStatus,
    SupportsLeases,
    SupportsLookup,
    Target,
)


@dataclass(frozen=True)
class Params:
    block_size: int = 1 << 20
    key_count: int = 64
    read_ratio: float = 0.8
    lookup_keys: int = 32
    lease_ttl_ms: int = 2000
    verify: bool = False
    seed: int = 1
    tag: str = field(default_factory=lambda: os.urandom(4).hex())
    """Namespaces the keys one run writes, so repeated runs never collide with old blocks."""

    def working_set(self) -> list[str]:
        # Shared by hot-get, mixed and lookup: the same block size reuses what is loaded.
        return [f"lt.ws.{self.block_size}.{i}" for i in range(self.key_count)]


class Payloads:
    """A few distinct random blocks, made once: no allocation or hashing on the hot path."""

    def __init__(self, block_size: int, *, count: int = 8, seed: int = 1) -> None:
        rng = random.Random(seed)
        self.blocks = [rng.randbytes(block_size) for _ in range(count)]

    def for_index(self, i: int) -> bytes:
        return self.blocks[i % len(self.blocks)]


class Scenario(Protocol):
    name: ClassVar[str]
    summary: ClassVar[str]

    def supports(self, target: Target) -> bool: ...

    async def prepare(self, target: Target) -> None: ...

    async def op(self, target: Target, worker: int, rec: Recorder) -> None: ...


async def _load(target: Target, keys: list[str], payloads: Payloads, *, parallel: int = 8) -> None:
    """PUT every key (an EXISTS answer is fine: the block is there already)."""
    it = iter(enumerate(keys))

    async def loader() -> None:
        for i, key in it:
            status = await target.put(key, payloads.for_index(i))
            if status not in (PutStatus.STORED, PutStatus.EXISTS):
                raise RuntimeError(f"preloading {key} on {target.name}: {status.value}")

    await asyncio.gather(*(loader() for _ in range(parallel)))


class _Base:
    name: ClassVar[str]
    summary: ClassVar[str]

    def __init__(self, params: Params) -> None:
        self.params = params
        self.payloads = Payloads(params.block_size, seed=params.seed)
        self.keys = params.working_set()
        self.rng = random.Random(params.seed)

    def supports(self, target: Target) -> bool:
        return True

    async def prepare(self, target: Target) -> None:
        await _load(target, self.keys, self.payloads)

    async def op(self, target: Target, worker: int, rec: Recorder) -> None:
        raise NotImplementedError

    async def _read(self, target: Target, rec: Recorder) -> None:
        i = self.rng.randrange(len(self.keys))
        started = rec.clock()
        result = await target.get(self.keys[i])
        if result.value is None:
            rec.record("get", result.tier, started, 0, "miss")
            return
        ok = len(result.value) == self.params.block_size and (
            not self.params.verify or result.value == self.payloads.for_index(i)
        )
        rec.record("get", result.tier, started, len(result.value), "hit" if ok else "corrupt")


class HotGet(_Base):
    name = "hot-get"
    summary = "GET random keys of a preloaded working set (key-count blocks)"

    async def op(self, target: Target, worker: int, rec: Recorder) -> None:
        await self._read(target, rec)


class Put(_Base):
    name = "put"
    summary = "PUT fresh keys (first writes, never already present)"

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self._seq = itertools.count()

    async def prepare(self, target: Target) -> None:
        return None

    async def _write(self, target: Target, rec: Recorder) -> None:
        n = next(self._seq)
        started = rec.clock()
        status = await target.put(f"lt.put.{self.params.tag}.{n}", self.payloads.for_index(n))
        stored = status in (PutStatus.STORED, PutStatus.EXISTS)
        rec.record(
            "put", target.name, started, self.params.block_size if stored else 0, status.value
        )

    async def op(self, target: Target, worker: int, rec: Recorder) -> None:
        await self._write(target, rec)


class Mixed(Put):
    name = "mixed"
    summary = "read-ratio GETs of the working set, the rest PUTs of fresh keys"

    async def prepare(self, target: Target) -> None:
        await _load(target, self.keys, self.payloads)

    async def op(self, target: Target, worker: int, rec: Recorder) -> None:
        if self.rng.random() < self.params.read_ratio:
            await self._read(target, rec)
        else:
            await self._write(target, rec)


class LookupStorm(_Base):
    name = "lookup"
    summary = "POST /v1/lookup chains of lookup-keys keys with a random present prefix"

    def supports(self, target: Target) -> bool:
        return isinstance(target, SupportsLookup)

    async def op(self, target: Target, worker: int, rec: Recorder) -> None:
        assert isinstance(target, SupportsLookup)
        n = self.params.lookup_keys
        present = self.rng.randint(0, min(n, len(self.keys)))
        start = self.rng.randrange(len(self.keys))
        chain = [self.keys[(start + j) % len(self.keys)] for j in range(present)]
        chain += [f"lt.absent.{self.params.tag}.{j}" for j in range(n - present)]
        started = rec.clock()
        hits = await target.lookup(chain)
        rec.record("lookup", target.name, started, 0, "ok" if hits == present else "wrong")


class LeaseContention(_Base):
    name = "lease"
    summary = (
        "workers race POST /v1/leases over key-count slots; the winner PUTs with "
        "X-KV-Lease-Token, losers GET ?wait_ms for its commit"
    )

    def __init__(self, params: Params) -> None:
        super().__init__(params)
        self._generation = [0] * params.key_count

    def supports(self, target: Target) -> bool:
        return isinstance(target, SupportsLeases)

    async def prepare(self, target: Target) -> None:
        return None

    async def op(self, target: Target, worker: int, rec: Recorder) -> None:
        assert isinstance(target, SupportsLeases)
        slot = self.rng.randrange(len(self._generation))
        gen = self._generation[slot]
        key = f"lt.lease.{self.params.tag}.{slot}.{gen}"
        started = rec.clock()
        answer = await target.acquire_lease(key, ttl_ms=self.params.lease_ttl_ms)
        if isinstance(answer, Lease):
            rec.record("lease", target.name, started, 0, "granted")
            started = rec.clock()
            status = await target.put_leased(key, self.payloads.for_index(gen), token=answer.token)
            ok = status in (PutStatus.STORED, PutStatus.EXISTS)
            rec.record(
                "leased-put",
                target.name,
                started,
                self.params.block_size if ok else 0,
                status.value,
            )
            if ok:
                # Committed: the slot moves on to a fresh key, so the race starts over.
                self._generation[slot] = max(self._generation[slot], gen + 1)
            else:
                await target.release_lease(answer.lease_id)
            return
        rec.record("lease", target.name, started, 0, answer.value)
        if answer is LeaseRefusal.EXISTS:
            self._generation[slot] = max(self._generation[slot], gen + 1)
            return
        started = rec.clock()
        result = await target.get_waiting(key, wait_ms=self.params.lease_ttl_ms)
        size = 0 if result.value is None else len(result.value)
        rec.record("wait-get", result.tier, started, size, "served" if size else "miss")


SCENARIOS: dict[str, type[_Base]] = {
    cls.name: cls for cls in (HotGet, Put, Mixed, LookupStorm, LeaseContention)
}


def make_scenario(name: str, params: Params) -> Scenario:
    try:
        return SCENARIOS[name](params)
    except KeyError:
        raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}") from None
