"""``disk_bytes = 0``: a RAM-only gateway (the two memory tiers, no LMDB), and the epoch file
that keeps its fencing tokens monotonic across restarts all the same."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from coherence.epoch_file import EpochFileError, FileTokenStore
from gateway.client import KVGateClient, Lease
from gateway.coherent import EPOCH_FILE
from gateway.config import MiB, load_config
from tests.conftest import running_gateway


async def test_the_epoch_file_only_goes_forward_across_instances(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "epoch"
    first = FileTokenStore(path)
    assert [await first.next_epoch() for _ in range(3)] == [1, 2, 3]
    # A restart is a new store over the same file.
    again = FileTokenStore(path)
    assert again.current() == 3
    assert await again.next_epoch() == 4
    assert path.read_text() == "4\n"
    assert not path.with_name("epoch.tmp").exists()


@pytest.mark.parametrize("content", [b"", b"twelve\n", b"-3\n", b"9" * 100])
async def test_an_unreadable_epoch_file_is_refused(tmp_path: Path, content: bytes) -> None:
    # Starting again from 1 would make old tokens valid again: refuse instead.
    path = tmp_path / "epoch"
    path.write_bytes(content)
    with pytest.raises(EpochFileError, match="does not hold an epoch"):
        await FileTokenStore(path).next_epoch()
    assert path.read_bytes() == content


async def test_an_epoch_file_that_cannot_be_written_is_an_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(EpochFileError, match="cannot"):
        await FileTokenStore(blocker / "epoch").next_epoch()


def test_disk_bytes_zero_is_accepted() -> None:
    assert load_config(environ={"KVGATE_DISK_BYTES": "0"}).disk_bytes == 0


async def test_a_ram_only_gateway_serves_from_memory_and_drops_what_it_evicts(
    tmp_path: Path,
) -> None:
    block = 1 * MiB
    async with (
        running_gateway(tmp_path, disk_bytes=0) as gw,
        KVGateClient(gw.url) as client,
    ):
        assert [t.name for t in gw.hierarchy.stats()] == ["hbm", "dram"]
        # 8 + 16 MiB of memory tiers: 40 blocks of 1 MiB do not all fit.
        data = {f"b{i}": os.urandom(block) for i in range(40)}
        for key, value in data.items():
            assert await client.put(key, value) is True
        await gw.hierarchy.quiesce()
        held = {k for k in data if gw.hierarchy.locate(f"default/{k}") is not None}
        assert 0 < len(held) < len(data)
        assert "b39" in held and "b0" not in held  # the oldest went first
        for key in sorted(set(data) - held):
            assert await client.get(key) is None, key
        # A hit may promote its block and push another out of memory: read the newest first.
        served = 0
        for key in sorted(held, key=lambda k: -int(k[1:])):
            if gw.hierarchy.locate(f"default/{key}") is not None:
                assert await client.get(key) == data[key], key
                served += 1
        assert served >= len(held) // 2
        stats = gw.hierarchy.stats()
        assert sum(s.evictions for s in stats) >= len(data) - len(held)
        assert sum(s.used_bytes for s in stats) <= 24 * MiB
    assert not (tmp_path / "blocks.lmdb").exists()


async def test_a_ram_only_gateways_tokens_outgrow_its_last_run(tmp_path: Path) -> None:
    tokens = []
    for run in range(2):
        async with (
            running_gateway(tmp_path, disk_bytes=0) as gw,
            KVGateClient(gw.url) as client,
        ):
            lease = await client.acquire_lease(f"k{run}", ttl_ms=5000)
            assert isinstance(lease, Lease)
            tokens.append(lease.token)
            assert await client.get("k0") is None  # RAM only: nothing survives the restart
    assert tokens[1] > tokens[0]
    assert int((tmp_path / EPOCH_FILE).read_text()) >= 2
