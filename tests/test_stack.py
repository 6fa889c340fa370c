"""The standard three-tier stack (hbm, dram, LMDB disk) built by tiers.factory."""

from __future__ import annotations

from pathlib import Path

import lmdb

from tests.tierkit import payload
from tiers.block import Block
from tiers.factory import TierSettings, build_hierarchy
from tiers.hierarchy import StoreOutcome

MiB = 1 << 20


def settings(path: Path, **kw: object) -> TierSettings:
    base: dict[str, object] = {
        "data_dir": path,
        "hbm_bytes": 2 * MiB,
        "dram_bytes": 3 * MiB,
        "disk_bytes": 64 * MiB,
        "page_bytes": 64 * 1024,
    }
    base.update(kw)
    return TierSettings(**base)  # type: ignore[arg-type]


async def fill(h: object, n: int, size: int = MiB // 2) -> list[str]:
    keys = [f"default/b{i}" for i in range(n)]
    for key in keys:
        assert await h.put(key, Block.of(payload(key, size))) is StoreOutcome.STORED  # type: ignore[attr-defined]
    return keys


async def test_blocks_spread_over_all_three_tiers_within_budgets(tmp_path: Path) -> None:
    h = await build_hierarchy(settings(tmp_path))
    try:
        keys = await fill(h, 24)
        tiers = {h.locate(k) for k in keys}
        assert tiers == {"hbm", "dram", "disk"}
        for s in h.stats():
            assert s.used_bytes <= s.capacity_bytes
        for key in keys:
            hit = await h.get(key)
            assert hit is not None and bytes(hit.block.data) == payload(key, MiB // 2)
        await h.quiesce()
    finally:
        await h.close()


async def test_graceful_close_spills_and_restart_is_warm(tmp_path: Path) -> None:
    h = await build_hierarchy(settings(tmp_path))
    keys = await fill(h, 12)
    assert any(h.locate(k) == "hbm" for k in keys)
    await h.close()

    h = await build_hierarchy(settings(tmp_path))
    try:
        assert [h.locate(k) for k in keys] == ["disk"] * len(keys)
        assert h.tenant_bytes("default") == 12 * (MiB // 2)
        for key in keys:
            hit = await h.get(key)
            assert hit is not None and bytes(hit.block.data) == payload(key, MiB // 2)
        await h.quiesce()
        assert h.locate(keys[-1]) == "hbm"  # hits promote again after the restart
    finally:
        await h.close()


async def test_without_spill_only_demoted_blocks_survive(tmp_path: Path) -> None:
    # A crash (no graceful close) loses the volatile tiers: only what reached disk is served.
    h = await build_hierarchy(settings(tmp_path, spill_on_close=False))
    keys = await fill(h, 14)
    await h.quiesce()  # demotions into the disk tier finish in the background
    on_disk = {k for k in keys if h.locate(k) == "disk"}
    assert on_disk
    await h.close()
    h = await build_hierarchy(settings(tmp_path))
    try:
        assert {k for k in keys if h.locate(k) is not None} == on_disk
    finally:
        await h.close()


async def test_write_through_makes_every_block_durable_at_once(tmp_path: Path) -> None:
    h = await build_hierarchy(settings(tmp_path, write_through=True, spill_on_close=False))
    keys = await fill(h, 4)
    assert [h.locate(k) for k in keys] == ["hbm"] * 4
    await h.close()
    h = await build_hierarchy(settings(tmp_path))
    try:
        assert [h.locate(k) for k in keys] == ["disk"] * 4
    finally:
        await h.close()


async def test_corrupt_disk_block_is_a_miss_never_wrong_bytes(tmp_path: Path) -> None:
    h = await build_hierarchy(settings(tmp_path))
    keys = await fill(h, 3)
    await h.close()  # spilled to disk
    env = lmdb.open(str(tmp_path / "blocks.lmdb"), max_dbs=8, subdir=True)
    db = env.open_db(b"blocks")
    with env.begin(write=True, db=db) as txn:
        raw = bytearray(txn.get(keys[0].encode()))
        raw[len(raw) // 2] ^= 0xFF
        txn.put(keys[0].encode(), bytes(raw))
    env.close()

    h = await build_hierarchy(settings(tmp_path))
    try:
        assert h.locate(keys[0]) == "disk"
        assert await h.get(keys[0]) is None
        assert h.locate(keys[0]) is None
        hit = await h.get(keys[1])
        assert hit is not None and bytes(hit.block.data) == payload(keys[1], MiB // 2)
        await h.quiesce()
    finally:
        await h.close()
