"""The LMDB disk tier against real LMDB files under tmp_path."""

from __future__ import annotations

import asyncio
import signal
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import pytest

from tests.conftest import subprocess_env
from tiers import disk as disk_module
from tiers.base import PutOutcome, Tier
from tiers.block import Block
from tiers.disk import DiskTier
from tiers.errors import TierClosed, TierConfigError, TierIOError
from tiers.ledger import CapacityLedger

CAP = 2 << 20
ROOT = Path(__file__).resolve().parent.parent


def rand_block(n: int, seed: int, **meta: object) -> Block:
    return Block.of(np.random.default_rng(seed).bytes(n), **meta)  # type: ignore[arg-type]


def bf16_block(n_elems: int, seed: int) -> Block:
    f32 = np.random.default_rng(seed).normal(0, 1, n_elems).astype(np.float32)
    data = (f32.view(np.uint32) >> 16).astype("<u2").tobytes()
    return Block.of(data, dtype="bfloat16", shape=(n_elems,))


@pytest.fixture
async def tier(tmp_path: Path) -> AsyncIterator[DiskTier]:
    t = DiskTier(tmp_path / "disk", capacity_bytes=CAP, initial_map_bytes=256 << 10)
    yield t
    await t.close()


def raw_env(path: Path) -> lmdb.Environment:
    return lmdb.open(str(path), max_dbs=4, map_size=CAP)


async def test_is_a_tier(tier: DiskTier) -> None:
    assert isinstance(tier, Tier)
    assert (tier.name, tier.device, tier.volatile) == ("disk", "lmdb", False)


async def test_put_get_bit_identical(tier: DiskTier) -> None:
    blocks = {
        "a": bf16_block(8192, 1),
        "b": rand_block(5000, 2, expires_at=1.7e9 + 60),
        "c": Block.of(b""),
        "tiny": Block.of(b"x", dtype="int8", shape=(1,)),
    }
    for key, block in blocks.items():
        assert await tier.put(key, block) is PutOutcome.STORED
        assert tier.contains(key)
    for key, block in blocks.items():
        got = await tier.get(key)
        assert got is not None
        assert bytes(got.data) == bytes(block.data)
        assert got.meta == block.meta
    assert await tier.get("missing") is None
    stats = tier.stats()
    assert (stats.hits, stats.misses, stats.blocks) == (4, 1, 4)
    assert sorted(tier.keys()) == sorted(blocks)


async def test_put_never_overwrites(tier: DiskTier) -> None:
    first, second = rand_block(3000, 1), rand_block(3000, 2)
    assert await tier.put("k", first) is PutOutcome.STORED
    used = tier.used_bytes
    assert await tier.put("k", second) is PutOutcome.EXISTS
    got = await tier.get("k")
    assert got is not None and bytes(got.data) == bytes(first.data)
    assert tier.used_bytes == used


async def test_concurrent_puts_of_one_key(tier: DiskTier) -> None:
    outcomes = await asyncio.gather(*(tier.put("k", rand_block(2000, i)) for i in range(8)))
    assert outcomes.count(PutOutcome.STORED) == 1
    assert outcomes.count(PutOutcome.EXISTS) == 7
    assert len(tier.keys()) == 1


async def test_concurrent_puts_group_commit(tier: DiskTier) -> None:
    blocks = {f"k{i}": rand_block(1500 + i, i) for i in range(40)}
    outcomes = await asyncio.gather(*(tier.put(k, b) for k, b in blocks.items()))
    assert set(outcomes) == {PutOutcome.STORED}
    got = await asyncio.gather(*(tier.get(k) for k in blocks))
    assert [bytes(g.data) for g in got if g] == [bytes(b.data) for b in blocks.values()]


async def test_delete_and_evict(tier: DiskTier) -> None:
    block = bf16_block(4096, 3)
    await tier.put("a", block)
    await tier.put("b", rand_block(4000, 4))
    assert await tier.delete("b") is True
    assert await tier.delete("b") is False
    assert not tier.contains("b")
    evicted = await tier.evict("a")
    assert evicted is not None and bytes(evicted.data) == bytes(block.data)
    assert evicted.meta == block.meta
    assert await tier.evict("a") is None
    assert tier.used_bytes == 0 and tier.keys() == []
    assert tier.stats().evictions == 1


async def test_capacity_is_never_exceeded(tier: DiskTier) -> None:
    size = 48 << 10
    assert tier.fits(size)
    n = 0
    while (outcome := await tier.put(f"k{n}", rand_block(size, n))) is PutOutcome.STORED:
        n += 1
        assert tier.used_bytes <= tier.usable_bytes
        assert tier.file_bytes() <= CAP
    assert outcome is PutOutcome.NO_ROOM
    assert not tier.fits(size)
    assert n * size > CAP // 2  # the budget is actually usable
    assert tier.map_bytes() <= CAP
    # Churn at full capacity: every evict makes room for the next put, the file stays put.
    for i in range(n, n + 60):
        assert await tier.evict(f"k{i - n}") is not None
        assert await tier.put(f"k{i}", rand_block(size, i)) is PutOutcome.STORED
        assert tier.file_bytes() <= CAP
        assert tier.used_bytes <= tier.usable_bytes
    assert len(tier.keys()) == n


async def test_full_map_answers_no_room_never_an_lmdb_error(tier: DiskTier) -> None:
    # White-box: a ledger that over-promises makes the LMDB map itself the limit, which is the
    # path a real tier takes when freed pages are not reusable yet.
    tier._ledger = CapacityLedger(100 * CAP)
    outcomes = [await tier.put(f"k{i}", rand_block(40_000, i)) for i in range(80)]
    assert PutOutcome.NO_ROOM in outcomes
    stored = [f"k{i}" for i, o in enumerate(outcomes) if o is PutOutcome.STORED]
    assert sorted(tier.keys()) == sorted(stored)
    assert tier.file_bytes() <= CAP and tier.map_bytes() <= CAP
    # Concurrent puts into a full map share a batch; each still gets its own answer.
    late = await asyncio.gather(*(tier.put(f"x{i}", rand_block(40_000, 100 + i)) for i in range(4)))
    assert set(late) == {PutOutcome.NO_ROOM}
    # Squeeze the map to the pages in use: not one to spare for copy-on-write. Removing must
    # still work (it is how room is made), through the emergency pages.
    tier._shrink_map_to(0)
    tier._put_map_cap = tier.map_bytes()
    assert await tier.evict(stored[0]) is not None
    for key in stored[1:4]:
        assert await tier.delete(key)
    assert await tier.put("again", rand_block(40_000, 999)) is PutOutcome.STORED
    assert tier.file_bytes() <= CAP and tier.map_bytes() <= CAP
    got = await tier.get(stored[5])
    assert got is not None and bytes(got.data) == bytes(rand_block(40_000, 5).data)


async def test_removal_gets_through_a_full_map(
    tier: DiskTier, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: LMDB answers MAP_FULL to a removal until the emergency pages are in."""
    for i in range(6):
        await tier.put(f"k{i}", rand_block(40_000, i))
    real_run = tier._run_txn

    def run_txn(batch: list[Any]) -> list[object]:
        removal = any(op.kind in ("delete", "pop") for op in batch)
        if removal and tier.map_bytes() < CAP:
            raise lmdb.MapFullError("injected")
        return real_run(batch)

    monkeypatch.setattr(tier, "_run_txn", run_txn)
    assert await tier.delete("k0") is True
    assert await tier.evict("k1") is not None
    assert tier.map_bytes() < CAP  # the emergency pages were handed back
    assert sorted(tier.keys()) == ["k2", "k3", "k4", "k5"]
    # A put refused by a full map is NO_ROOM, with nothing charged.

    def refuse(batch: list[Any]) -> list[object]:
        raise lmdb.MapFullError("injected")

    monkeypatch.setattr(tier, "_run_txn", refuse)
    used = tier.used_bytes
    assert await tier.put("new", rand_block(1000, 1)) is PutOutcome.NO_ROOM
    assert tier.used_bytes == used and not tier.contains("new")


async def test_fits_is_a_promise(tier: DiskTier) -> None:
    i = 0
    while tier.fits(30_000):
        assert await tier.put(f"k{i}", rand_block(30_000, i)) is PutOutcome.STORED
        i += 1
    assert i > 0


async def test_too_large(tier: DiskTier) -> None:
    assert not tier.could_ever_fit(CAP)
    assert await tier.put("big", rand_block(CAP, 0)) is PutOutcome.TOO_LARGE
    assert not tier.contains("big") and tier.used_bytes == 0


async def test_charge_tracks_the_file(tier: DiskTier) -> None:
    for i in range(20):
        await tier.put(f"k{i}", rand_block(20_000 + 997 * i, i))
    # What the ledger holds is what the blocks occupy: within the reserve of the file size.
    assert tier.used_bytes <= tier.file_bytes() <= tier.used_bytes + (CAP - tier.usable_bytes)


async def test_map_grows_from_small(tier: DiskTier) -> None:
    assert tier.map_bytes() == 256 << 10
    for i in range(12):
        await tier.put(f"k{i}", rand_block(64 << 10, i))
    assert 256 << 10 < tier.map_bytes() <= CAP


async def test_reopen_keeps_blocks_and_index(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    t = DiskTier(path, capacity_bytes=CAP)
    blocks = {f"k{i}": bf16_block(1000 * (i + 1), i) for i in range(6)}
    long_key = "tenant/" + "x" * 600  # over LMDB's 511-byte key limit
    blocks[long_key] = rand_block(700, 9)
    for k, b in blocks.items():
        assert await t.put(k, b) is PutOutcome.STORED
    used = t.used_bytes
    await t.close()

    t = await DiskTier.open(path, capacity_bytes=CAP)
    try:
        assert sorted(t.keys()) == sorted(blocks)
        assert t.used_bytes == used
        for k, b in blocks.items():
            got = await t.get(k)
            assert got is not None and bytes(got.data) == bytes(b.data) and got.meta == b.meta
        assert await t.put(long_key, b) is PutOutcome.EXISTS
        assert await t.delete(long_key)
    finally:
        await t.close()
    t = DiskTier(path, capacity_bytes=CAP)
    assert not t.contains(long_key) and len(t.keys()) == 6
    await t.close()


async def test_reopen_with_smaller_budget_drops_the_excess(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    t = DiskTier(path, capacity_bytes=4 << 20)
    for i in range(40):
        await t.put(f"k{i}", rand_block(64 << 10, i))
    await t.close()
    t = DiskTier(path, capacity_bytes=1 << 20)
    assert 0 < len(t.keys()) < 40
    assert t.used_bytes <= t.usable_bytes
    assert t.dropped_on_open == 40 - len(t.keys())
    await t.close()


@pytest.mark.parametrize("where", ["payload", "header", "garbage"])
async def test_corrupt_block_on_disk_is_a_miss(tmp_path: Path, where: str) -> None:
    path = tmp_path / "disk"
    t = DiskTier(path, capacity_bytes=CAP)
    block = bf16_block(20_000, 5)
    await t.put("victim", block)
    await t.put("bystander", block)
    await t.close()

    env = raw_env(path)
    db = env.open_db(b"blocks")
    with env.begin(write=True, db=db) as txn:
        stored = txn.get(b"victim")
        assert stored is not None
        frame = bytearray(stored)
        if where == "payload":
            frame[len(frame) // 2] ^= 0x10
        elif where == "header":
            frame[30] ^= 0x01  # inside the raw-bytes checksum field
        else:
            frame = bytearray(b"not a frame at all")
        txn.put(b"victim", bytes(frame))
    env.close()

    t = DiskTier(path, capacity_bytes=CAP)
    try:
        assert t.contains("victim")  # the index does not read values
        assert await t.get("victim") is None
        assert t.corrupt_blocks == 1
        assert not t.contains("victim")  # dropped
        assert t.stats().misses == 1
        good = await t.get("bystander")
        assert good is not None and bytes(good.data) == bytes(block.data)
    finally:
        await t.close()
    env = raw_env(path)
    with env.begin(db=env.open_db(b"blocks")) as txn:
        assert txn.get(b"victim") is None
    env.close()


async def test_meta_records_and_counter_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    t = DiskTier(path, capacity_bytes=CAP)
    assert await t.meta_get(b"fence") is None
    assert [await t.meta_incr(b"fence") for _ in range(3)] == [1, 2, 3]
    assert await asyncio.gather(*(t.meta_incr(b"c") for _ in range(10))) == list(range(1, 11))
    await t.meta_put(b"node-id", b"n1")
    await t.close()
    t = DiskTier(path, capacity_bytes=CAP)
    try:
        assert await t.meta_incr(b"fence") == 4
        assert await t.meta_get(b"node-id") == b"n1"
        assert t.keys() == []  # meta records are not blocks
    finally:
        await t.close()


async def test_closed_tier_refuses(tmp_path: Path) -> None:
    t = DiskTier(tmp_path / "d", capacity_bytes=CAP)
    await t.close()
    await t.close()  # idempotent
    with pytest.raises(TierClosed):
        await t.get("k")
    with pytest.raises(TierClosed):
        await t.put("k", Block.of(b"x"))


def test_tiny_budget_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(TierConfigError):
        DiskTier(tmp_path / "d", capacity_bytes=1000)


_WRITER = textwrap.dedent(
    """
    import asyncio, sys
    import numpy as np
    from tiers.block import Block
    from tiers.disk import DiskTier

    async def main():
        t = DiskTier(sys.argv[1], capacity_bytes=8 << 20)
        i = 0
        while True:
            batch = [f"k{j}" for j in range(i, i + 4)]
            await asyncio.gather(*(t.put(k, Block.of(content(k))) for k in batch))
            i += 4
            print(i, flush=True)
            if i >= 400:
                for j in range(i - 400, i - 396):
                    await t.delete(f"k{j}")

    def content(k):
        return np.random.default_rng(int(k[1:])).bytes(20_000 + int(k[1:]) % 7 * 1000)

    asyncio.run(main())
    """
)


@pytest.mark.slow
async def test_kill_9_never_leaves_a_torn_block(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    env = subprocess_env(ROOT)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _WRITER, str(path), stdout=asyncio.subprocess.PIPE, env=env
    )
    assert proc.stdout is not None
    written = 0
    while written < 120:  # kill it mid-stream, once it has committed a fair amount
        line = await proc.stdout.readline()
        assert line, "writer died early"
        written = int(line)
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    assert proc.returncode == -signal.SIGKILL

    t = DiskTier(path, capacity_bytes=8 << 20)
    try:
        keys = t.keys()
        assert len(keys) >= 100
        for k in keys:
            got = await t.get(k)
            want = np.random.default_rng(int(k[1:])).bytes(20_000 + int(k[1:]) % 7 * 1000)
            assert got is not None and bytes(got.data) == want
        assert t.corrupt_blocks == 0
    finally:
        await t.close()


async def test_large_frames_keep_fitting_a_small_map(tmp_path: Path) -> None:
    """2 MiB frames in a 4 MiB map: after a few evictions no free run of pages is long enough
    (copy-on-write nibbles them), though the ledger rightly counts room; compaction mends it."""
    tier = DiskTier(tmp_path / "disk", capacity_bytes=4 << 20)
    try:
        assert await tier.meta_incr(b"fence") == 1
        size, prev = 2 << 20, None
        for i in range(8):
            block = rand_block(size, i)
            outcome = await tier.put(f"k{i}", block)
            if outcome is PutOutcome.NO_ROOM and prev is not None:
                assert await tier.evict(prev) is not None
                outcome = await tier.put(f"k{i}", block)
            assert outcome is PutOutcome.STORED, f"put {i}: {outcome}"
            got = await tier.get(f"k{i}")
            assert got is not None and bytes(got.data) == bytes(block.data)
            assert tier.file_bytes() <= 4 << 20 and tier.map_bytes() <= 4 << 20
            prev = f"k{i}"
        assert tier.compactions > 0
        assert tier.keys() == ["k7"]
        assert await tier.meta_incr(b"fence") == 2  # the side store came through the rewrite
    finally:
        await tier.close()
    reopened = DiskTier(tmp_path / "disk", capacity_bytes=4 << 20)
    try:
        got = await reopened.get("k7")
        assert got is not None and bytes(got.data) == bytes(rand_block(size, 7).data)
        assert await reopened.meta_incr(b"fence") == 3
    finally:
        await reopened.close()


async def test_reads_during_compaction_see_whole_blocks(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path / "disk", capacity_bytes=4 << 20)
    small = {f"s{i}": rand_block(3000, 100 + i) for i in range(4)}
    stop = False
    seen: list[bool] = []

    async def read_loop() -> None:
        while not stop:
            for key, block in small.items():
                got = await tier.get(key)
                seen.append(got is not None and bytes(got.data) == bytes(block.data))

    try:
        for key, block in small.items():
            assert await tier.put(key, block) is PutOutcome.STORED
        reader = asyncio.create_task(read_loop())
        prev = None
        for i in range(6):
            block = rand_block(1800 << 10, i)
            if await tier.put(f"k{i}", block) is not PutOutcome.STORED:
                assert prev is not None and await tier.evict(prev) is not None
                assert await tier.put(f"k{i}", block) is PutOutcome.STORED
            prev = f"k{i}"
        stop = True
        await reader
        assert tier.compactions > 0
        assert seen and all(seen)
    finally:
        await tier.close()


async def test_no_compaction_above_its_bound(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path / "disk", capacity_bytes=4 << 20, compact_max_bytes=0)
    try:
        outcomes = []
        for i in range(4):
            if tier.keys():
                await tier.evict(tier.keys()[0])
            outcomes.append(await tier.put(f"k{i}", rand_block(2 << 20, i)))
        assert tier.compactions == 0
        assert PutOutcome.NO_ROOM in outcomes  # the fragmentation this guards against is real
    finally:
        await tier.close()


def test_an_interrupted_compaction_is_cleared_on_open(tmp_path: Path) -> None:
    (tmp_path / "disk" / "compact.tmp").mkdir(parents=True)
    (tmp_path / "disk" / "compact.tmp" / "data.mdb").write_bytes(b"half a copy")
    tier = DiskTier(tmp_path / "disk", capacity_bytes=CAP)
    try:
        assert not (tmp_path / "disk" / "compact.tmp").exists()
    finally:
        asyncio.run(tier.close())


async def test_a_full_tier_reopened_again_and_again_stays_within_its_budget(
    tmp_path: Path,
) -> None:
    cap = 4 << 20
    n = 0
    for _ in range(5):
        tier = DiskTier(tmp_path / "disk", capacity_bytes=cap)
        try:
            for _ in range(60):  # full, then churn: the file's high-water mark sits at the map
                while (outcome := await tier.put(f"k{n}", rand_block(100_000, n))) is not (
                    PutOutcome.STORED
                ):
                    assert outcome is PutOutcome.NO_ROOM
                    assert await tier.evict(sorted(tier.keys(), key=lambda k: int(k[1:]))[0])
                n += 1
                assert tier.file_bytes() <= cap and tier.map_bytes() <= cap
        finally:
            await tier.close()


def _fragmenting_puts(tier: DiskTier, count: int) -> list[tuple[str, Block]]:
    return [(f"k{i}", rand_block(2 << 20, i)) for i in range(count)]


async def _cycle(tier: DiskTier, key: str, block: Block) -> PutOutcome:
    """Put ``block``, evicting what is there when the tier answers NO_ROOM."""
    outcome = await tier.put(key, block)
    if outcome is PutOutcome.NO_ROOM:
        for old in list(tier.keys()):
            await tier.evict(old)
        outcome = await tier.put(key, block)
    return outcome


async def test_a_compaction_that_cannot_reopen_fails_one_put_and_the_tier_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tier = DiskTier(tmp_path / "disk", capacity_bytes=4 << 20)
    try:
        real_open = tier._open_env
        refusals = [lmdb.Error("injected: too many open files")]

        def open_env(map_size: int) -> None:
            if refusals:
                raise refusals.pop()
            real_open(map_size)

        monkeypatch.setattr(tier, "_open_env", open_env)
        puts = _fragmenting_puts(tier, 6)
        failed = None
        for key, block in puts:
            try:
                await _cycle(tier, key, block)
            except TierIOError as exc:
                failed = (key, str(exc))
                break
        assert failed is not None and "too many open files" in failed[1]
        assert tier.compactions == 0
        assert await tier.get(failed[0]) is None  # a miss while the environment is gone
        key, block = "after", rand_block(1 << 20, 99)
        assert await _cycle(tier, key, block) is PutOutcome.STORED  # the writer reopened it
        got = await tier.get(key)
        assert got is not None and bytes(got.data) == bytes(block.data)
        assert await tier.meta_incr(b"n") == 1 and tier.map_bytes() <= 4 << 20
    finally:
        await tier.close()


async def test_a_failed_compaction_does_not_hide_the_commits_of_its_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tier = DiskTier(tmp_path / "disk", capacity_bytes=CAP)
    try:
        real_run = tier._run_txn

        def run_txn(batch: list[Any]) -> list[object]:
            if len(batch) > 1 or batch[0].key == "b":
                raise lmdb.MapFullError("injected")
            return real_run(batch)

        def compact(op: Any) -> bool:
            raise TierIOError("injected compaction failure")

        monkeypatch.setattr(tier, "_run_txn", run_txn)
        monkeypatch.setattr(tier, "_compact", compact)
        loop = asyncio.get_running_loop()
        ops = [
            disk_module._Op("put", key.encode(), b"v" * 3000, key, False, loop.create_future())
            for key in ("a", "b")
        ]
        results = await loop.run_in_executor(tier._writer, tier._write_batch, ops)
        assert results[0] is True
        assert isinstance(results[1], TierIOError) and "injected" in str(results[1])
    finally:
        await tier.close()


async def test_a_compaction_whose_copy_fails_is_logged_and_the_put_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    tier = DiskTier(tmp_path / "disk", capacity_bytes=4 << 20)
    try:
        real_fsync = disk_module._fsync

        def fsync(path: Path) -> None:
            if "compact" in str(path):
                raise OSError(28, "No space left on device")
            real_fsync(path)

        monkeypatch.setattr(disk_module, "_fsync", fsync)
        outcomes = [await _cycle(tier, key, block) for key, block in _fragmenting_puts(tier, 4)]
        assert PutOutcome.NO_ROOM in outcomes and tier.compactions == 0
        assert "could not compact" in caplog.text and "No space left" in caplog.text
        assert not (tmp_path / "disk" / "compact.tmp").exists()
    finally:
        await tier.close()
