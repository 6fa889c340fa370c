"""Factories shared by the tier tests: every tier the product ships, built small."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path

from tiers.base import Tier
from tiers.memory import ArenaTier

PAGE = 4096

TierFactory = Callable[[Path, int], Awaitable[Tier]]


async def make_hbm(path: Path, capacity: int) -> Tier:
    return ArenaTier.hbm(capacity, page_bytes=PAGE)


async def make_dram(path: Path, capacity: int) -> Tier:
    return ArenaTier.dram(capacity, page_bytes=PAGE)


async def make_dram_offloop(path: Path, capacity: int) -> Tier:
    # Every copy through the executor path (the path GPUs and big blocks take).
    return ArenaTier("dram", capacity, page_bytes=PAGE, inline_copy_bytes=0)


TIER_FACTORIES: dict[str, TierFactory] = {
    "hbm": make_hbm,
    "dram": make_dram,
    "dram-offloop": make_dram_offloop,
}


def payload(key: str, size: int) -> bytes:
    """Deterministic, key-derived bytes: a block served under the wrong key is detectable."""
    seed = hashlib.sha256(key.encode()).digest()
    reps = size // len(seed) + 1
    return (seed * reps)[:size]
