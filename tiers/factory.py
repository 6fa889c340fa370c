"""Builds the standard three-tier hierarchy (hbm, dram, disk) from plain settings; with
``disk_bytes`` 0, the two memory tiers alone (a RAM-only cache)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

from tiers.arena import DEFAULT_PAGE_BYTES, ArenaStorage
from tiers.base import Tier
from tiers.clock import SYSTEM_CLOCK, Clock
from tiers.hierarchy import Hierarchy, HierarchyConfig
from tiers.memory import ArenaTier, cuda_available
from tiers.policy import make_policy
from tiers.remote import RemoteSettings, RemoteTier


@dataclass(frozen=True, slots=True)
class TierSettings:
    data_dir: Path
    hbm_bytes: int
    dram_bytes: int
    disk_bytes: int
    page_bytes: int = DEFAULT_PAGE_BYTES
    hbm_policy: str | None = None
    dram_policy: str | None = None
    disk_policy: str | None = None
    write_through: bool = False
    disk_compression_level: int = 1  # measured best on real bf16 KV (docs/benchmarks.md)
    promote_on_hit: bool = True
    spill_on_close: bool = True
    spill_behind: int = 8
    """Background demotions to disk in flight at once (tiers.hierarchy.HierarchyConfig)."""
    shed_when_disk_behind: bool = False
    landing_bytes: int = 0
    """Pages beyond the budget for PUT bodies received in place (tiers.memory.ArenaTier), in
    the first CPU arena: hbm without a GPU, dram with one."""
    shm_dir: Path | None = None
    """Put the CPU arenas in shared memory there (same-host clients map them); None: private."""
    prefault: bool = False
    """Page the host arenas in from a background thread at start (tiers.arena)."""
    remote: RemoteSettings | None = None
    """The shared remote tier (Redis) below the local ones; None: this gateway alone."""


async def build_hierarchy(
    settings: TierSettings,
    *,
    clock: Clock = SYSTEM_CLOCK,
    executor: Executor | None = None,
    is_pinned: Callable[[str], bool] | None = None,
) -> Hierarchy:
    """Create, open and index the tiers; the caller closes the hierarchy."""
    from tiers.disk import DiskTier  # lazy: keeps LMDB out of arena-only imports

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # First: an unreachable Redis fails startup before any local file is opened.
    shared = (
        None
        if settings.remote is None
        else await RemoteTier.connect(settings.remote, clock=clock, executor=executor)
    )
    disk = (
        None
        if settings.disk_bytes == 0
        else await DiskTier.open(
            settings.data_dir / "blocks.lmdb",
            capacity_bytes=settings.disk_bytes,
            level=settings.disk_compression_level,
            clock=clock,
        )
    )
    arena_kwargs: dict[str, object] = {
        "page_bytes": settings.page_bytes,
        "executor": executor,
        "shm_dir": settings.shm_dir,
        "prefault": settings.prefault,
    }
    gpu = cuda_available()
    if not gpu:
        # hbm falls back to host memory, the same memory as dram: one arena for both, so a
        # block moving between them changes owner with its pages instead of being copied
        # (tiers.arena). Each keeps its own budget.
        page = settings.page_bytes
        pages = sum(
            n // page for n in (settings.hbm_bytes, settings.landing_bytes, settings.dram_bytes)
        )
        arena_kwargs["storage"] = ArenaStorage(
            "host",
            pages * page,
            page_bytes=page,
            shm_dir=settings.shm_dir,
            prefault=settings.prefault,
        )
    tiers: list[Tier] = [
        ArenaTier.hbm(
            settings.hbm_bytes, landing_bytes=0 if gpu else settings.landing_bytes, **arena_kwargs
        ),
        ArenaTier.dram(
            settings.dram_bytes, landing_bytes=settings.landing_bytes if gpu else 0, **arena_kwargs
        ),
    ]
    policies = [make_policy(settings.hbm_policy), make_policy(settings.dram_policy)]
    if disk is not None:
        tiers.append(disk)
        policies.append(make_policy(settings.disk_policy))
    hierarchy = Hierarchy(
        tiers,
        policies=policies,
        config=HierarchyConfig(
            write_through=settings.write_through,
            promote_on_hit=settings.promote_on_hit,
            spill_on_close=settings.spill_on_close,
            spill_behind=settings.spill_behind,
            shed_when_disk_behind=settings.shed_when_disk_behind,
            min_charge_bytes=settings.page_bytes,
        ),
        clock=clock,
        is_pinned=is_pinned,
        shared=shared,
    )
    await hierarchy.open()
    return hierarchy
