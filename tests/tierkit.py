"""Factories shared by the tier tests: every tier the product ships, built small."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

from tiers.arena import ArenaStorage
from tiers.base import Tier
from tiers.block import Block
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


async def make_dram_shared(path: Path, capacity: int) -> Tier:
    # dram in an arena it shares with an hbm tier (tiers.arena, as on a host without CUDA),
    # whose own blocks sit in pages the dram tier must neither count nor hand out.
    storage = ArenaStorage("host", 2 * capacity, page_bytes=PAGE)
    neighbour = ArenaTier("hbm", capacity, storage=storage)
    for i in range(capacity // PAGE):
        await neighbour.put(f"neighbour-{i}", Block.of(payload(f"neighbour-{i}", PAGE)))
    return ArenaTier("dram", capacity, storage=storage)


async def make_disk(path: Path, capacity: int) -> Tier:
    # LMDB needs a floor of budget for its own pages; the suite fills it by fits()/NO_ROOM.
    from tiers.disk import DiskTier

    return await DiskTier.open(path / "disk", capacity_bytes=max(capacity, 1 << 20))


TIER_FACTORIES: dict[str, TierFactory] = {
    "disk": make_disk,
    "hbm": make_hbm,
    "dram": make_dram,
    "dram-offloop": make_dram_offloop,
    "dram-shared": make_dram_shared,
}


def payload(key: str, size: int) -> bytes:
    """Deterministic, key-derived, incompressible bytes.

    A block served under the wrong key is detectable, and the disk tier's compression cannot
    shrink it, so budgets fill as they would with dense data.
    """
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return random.Random(seed).randbytes(size)
