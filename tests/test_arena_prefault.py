"""Host arenas paged in ahead of use (tiers.arena ``prefault``): memory is backed before the
first write, blocks written meanwhile are intact, and closing stops the paging at once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tiers.arena import ArenaStorage

MiB = 1 << 20


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


def _populate_supported() -> bool:
    import mmap

    probe = mmap.mmap(-1, 4096)
    try:
        probe.madvise(23, 0, 4096)
    except OSError:
        return False
    finally:
        probe.close()
    return True


pytestmark = pytest.mark.skipif(
    not Path("/proc/self/status").exists() or not _populate_supported(),
    reason="needs Linux 5.14+ (MADV_POPULATE_WRITE) and /proc",
)


def test_a_prefaulted_private_arena_is_backed_before_any_write() -> None:
    size = 192 * MiB
    before = _rss_kib("RssAnon")
    storage = ArenaStorage("pf", size, prefault=True)
    try:
        assert storage.prefaulted(timeout=120)
        assert _rss_kib("RssAnon") - before >= (size // 1024) * 9 // 10
        view = storage.view
        assert view is not None and view[size - 1] == 0  # paging in writes nothing
    finally:
        storage.close()


def test_without_prefault_the_arena_is_backed_only_where_written() -> None:
    size = 192 * MiB
    before = _rss_kib("RssAnon")
    storage = ArenaStorage("lazy", size)
    try:
        assert storage.prefaulted(timeout=0)  # nothing was asked for
        assert _rss_kib("RssAnon") - before < (size // 1024) // 4
    finally:
        storage.close()


def test_blocks_written_while_it_pages_in_are_intact_and_close_stops_it(tmp_path: Path) -> None:
    size = 512 * MiB
    storage = ArenaStorage("busy", size, prefault=True, shm_dir=tmp_path)
    try:
        view = storage.view
        assert view is not None
        data = os.urandom(MiB)
        offsets = [0, 100 * MiB, size - MiB]
        for offset in offsets:
            view[offset : offset + MiB] = data
        assert storage.prefaulted(timeout=120)
        for offset in offsets:
            assert view[offset : offset + MiB] == data
    finally:
        storage.close()
    other = ArenaStorage("stopped", size, prefault=True)
    other.close()  # at once: the paging stops between chunks, then the mapping goes
    assert other.prefaulted(timeout=0)
