"""Trace-driven cache simulation through the real policy objects, with no server.

Each request looks its blocks up in chain order: hits count toward the prefix hit ratio only up
to the first missing block, and every block of the request is then touched or inserted, as a
serving engine that recomputed the missing suffix would store it. Several tiers may be simulated
at once: a hit below the hottest tier promotes the block, an eviction demotes it one tier down.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tiers.clock import FakeClock
from tiers.errors import TierConfigError
from tiers.policies.belady import BeladyPolicy, FutureOracle
from tiers.policy import Access, EvictionPolicy, link_tiers, make_policy


@dataclass(frozen=True, slots=True)
class TraceRequest:
    timestamp_ms: float
    keys: tuple[str, ...]


def read_trace(path: str | os.PathLike[str]) -> list[TraceRequest]:
    """Mooncake format: one JSON object per line with ``timestamp`` (ms) and ``hash_ids``."""
    out: list[TraceRequest] = []
    with Path(path).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                ts = float(obj.get("timestamp", 0))
                keys = tuple(str(h) for h in obj["hash_ids"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: not a trace record ({exc})") from exc
            out.append(TraceRequest(ts, keys))
    return out


def distinct_blocks(trace: Iterable[TraceRequest]) -> int:
    seen: set[str] = set()
    for req in trace:
        seen.update(req.keys)
    return len(seen)


@dataclass(slots=True)
class _Tier:
    name: str
    capacity: int
    policy: EvictionPolicy
    hits: int = 0
    prefix_hits: int = 0
    evictions: int = 0
    inserts: int = 0
    rejected: int = 0
    keys: set[str] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class TierSpec:
    name: str
    capacity_blocks: int


class Simulator:
    """Drives one policy per tier over a trace; a policy only orders keys, this holds them."""

    def __init__(
        self,
        tiers: list[tuple[TierSpec, EvictionPolicy]],
        *,
        clock: FakeClock | None = None,
        oracle: FutureOracle | None = None,
    ) -> None:
        if not tiers:
            raise TierConfigError("at least one tier is needed")
        self._tiers = [_Tier(s.name, s.capacity_blocks, p) for s, p in tiers]
        self._where: dict[str, int] = {}
        # depth and parent of every block seen, so a demoted block still carries its hints
        self._meta: dict[str, tuple[int, str | None]] = {}
        self.clock = clock or FakeClock()
        self._oracle = oracle
        self._t0_ms: float | None = None
        self._last_ms = 0.0
        self.requests = 0
        self.requested_blocks = 0
        self.prefix_hits = 0
        self.any_hits = 0

    def _advance_to(self, ts_ms: float) -> None:
        if self._t0_ms is None:
            self._t0_ms = ts_ms
            self._last_ms = ts_ms
        if ts_ms > self._last_ms:
            self.clock.advance((ts_ms - self._last_ms) / 1000.0)
            self._last_ms = ts_ms

    def _make_room_and_insert(self, idx: int, access: Access) -> bool:
        """Place ``access.key`` in tier ``idx`` or the first colder one that takes it."""
        tiers = self._tiers
        while idx < len(tiers):
            tier = tiers[idx]
            if tier.capacity > 0 and tier.policy.admit(access):
                while len(tier.keys) >= tier.capacity:
                    victim = tier.policy.victim(None)
                    if victim is None or victim not in tier.keys:
                        raise RuntimeError(
                            f"policy {tier.policy.name!r} named victim {victim!r} not in tier"
                        )
                    tier.keys.discard(victim)
                    del self._where[victim]
                    tier.policy.on_remove(victim)
                    tier.evictions += 1
                    depth, prev = self._meta[victim]
                    demoted = Access(victim, 1, access.now, depth, prev)
                    self._make_room_and_insert(idx + 1, demoted)
                tier.keys.add(access.key)
                self._where[access.key] = idx
                tier.policy.on_insert(access)
                tier.inserts += 1
                return True
            tier.rejected += 1
            idx += 1
        return False

    def request(self, req: TraceRequest) -> int:
        """Replay one request; returns its prefix hits."""
        self._advance_to(req.timestamp_ms)
        now = self.clock.monotonic()
        tiers = self._tiers
        where = self._where
        oracle = self._oracle
        in_prefix = True
        hits = 0
        prev: str | None = None
        for depth, key in enumerate(req.keys):
            if oracle is not None:
                oracle.advance(key)
            self._meta[key] = (depth, prev)
            access = Access(key, 1, now, depth, prev)
            idx = where.get(key)
            if idx is not None:
                tier = tiers[idx]
                tier.hits += 1
                self.any_hits += 1
                if in_prefix:
                    hits += 1
                    tier.prefix_hits += 1
                # As the live hierarchy does: every tier above the one that holds it missed.
                for upper in tiers[:idx]:
                    upper.policy.on_miss(access)
                tier.policy.on_hit(access)
                if idx > 0 and tiers[0].policy.admit(access):
                    tier.keys.discard(key)
                    del where[key]
                    tier.policy.on_remove(key)
                    self._make_room_and_insert(0, access)
            else:
                in_prefix = False
                for tier in tiers:
                    tier.policy.on_miss(access)
                self._make_room_and_insert(0, access)
            prev = key
        self.requests += 1
        self.requested_blocks += len(req.keys)
        self.prefix_hits += hits
        return hits

    def result(self) -> dict[str, object]:
        total = self.requested_blocks
        return {
            "prefix_hit_ratio": self.prefix_hits / total if total else 0.0,
            "block_hit_ratio": self.any_hits / total if total else 0.0,
            "hits": self.prefix_hits,
            "requested_blocks": total,
            "requests": self.requests,
            "capacity_blocks": sum(t.capacity for t in self._tiers),
            "tiers": [
                {
                    "name": t.name,
                    "capacity_blocks": t.capacity,
                    "prefix_hits": t.prefix_hits,
                    "hits": t.hits,
                    "inserts": t.inserts,
                    "rejected": t.rejected,
                    "evictions": t.evictions,
                    "blocks": len(t.keys),
                }
                for t in self._tiers
            ],
        }


def build_policies(
    name: str, specs: list[TierSpec], trace: list[TraceRequest]
) -> tuple[list[tuple[TierSpec, EvictionPolicy]], FutureOracle | None]:
    if name == "belady":
        oracle = FutureOracle(k for req in trace for k in req.keys)
        return [(s, BeladyPolicy(oracle, capacity=s.capacity_blocks)) for s in specs], oracle
    policies = [make_policy(name) for _ in specs]
    link_tiers(policies)  # as the live hierarchy does
    return list(zip(specs, policies, strict=True)), None


def simulate(
    trace: list[TraceRequest],
    specs: list[TierSpec],
    policy: str,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, object]:
    tiers, oracle = build_policies(policy, specs, trace)
    sim = Simulator(tiers, oracle=oracle)
    n = len(trace)
    for i, req in enumerate(trace):
        sim.request(req)
        if progress is not None:
            progress(i + 1, n)
    out = sim.result()
    out["policy"] = policy
    return out


def iter_batches(trace: list[TraceRequest], size: int) -> Iterator[list[TraceRequest]]:
    for i in range(0, len(trace), size):
        yield trace[i : i + size]
