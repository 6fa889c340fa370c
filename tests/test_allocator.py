"""The arena's page allocator (tiers.allocator): exact coverage, no page handed out twice, the
lowest free pages first."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiers.allocator import PageAllocator, Run
from tiers.errors import TierError

PAGE = 16


def pages_of(runs: list[Run]) -> list[int]:
    return [p for start, stop in runs for p in range(start // PAGE, -(-stop // PAGE))]


def test_the_lowest_pages_first_when_nothing_was_freed() -> None:
    alloc = PageAllocator(8, PAGE)
    assert alloc.allocate(2 * PAGE) == [(0, 2 * PAGE)]
    assert alloc.allocate(PAGE + 3) == [(2 * PAGE, 3 * PAGE + 3)]  # trimmed to the bytes asked
    assert alloc.free_pages == 4


def test_freed_pages_are_handed_out_lowest_first() -> None:
    alloc = PageAllocator(16, PAGE)
    blocks = [alloc.allocate(2 * PAGE) for _ in range(4)]  # pages 0-1, 2-3, 4-5, 6-7
    assert all(b is not None for b in blocks)
    alloc.free(blocks[3])  # type: ignore[arg-type]
    alloc.free(blocks[1])  # type: ignore[arg-type]
    assert alloc.allocate(3 * PAGE) == [(2 * PAGE, 4 * PAGE), (6 * PAGE, 7 * PAGE)]
    assert alloc.free_pages == 16 - 8 + 4 - 3


def test_a_double_free_is_refused() -> None:
    alloc = PageAllocator(4, PAGE)
    runs = alloc.allocate(PAGE)
    assert runs is not None
    alloc.free(runs)
    with pytest.raises(TierError):
        alloc.free(runs)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 5 * PAGE)), max_size=80))
def test_pages_are_never_handed_out_twice(ops: list[tuple[bool, int]]) -> None:
    alloc = PageAllocator(24, PAGE)
    held: list[list[Run]] = []
    for allocate, nbytes in ops:
        if allocate or not held:
            runs = alloc.allocate(nbytes)
            if runs is None:
                assert alloc.free_pages < alloc.pages_for(nbytes)
                continue
            assert sum(stop - start for start, stop in runs) == nbytes
            held.append(runs)
        else:
            alloc.free(held.pop(nbytes % len(held)))
        owned = [p for runs in held for p in pages_of(runs)]
        assert len(owned) == len(set(owned))  # no page in two blocks
        assert alloc.free_pages == 24 - len(owned)
