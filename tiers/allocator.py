"""A page allocator over one preallocated arena.

Blocks are stored as lists of fixed-size pages, so any free page serves any block: there is no
external fragmentation to creep, and internal waste is under one page per block. Handing out the
lowest free pages first keeps a block's pages mostly contiguous, so reads copy a few long runs
instead of many pages.
"""

from __future__ import annotations

import heapq

from tiers.errors import TierConfigError, TierError

Run = tuple[int, int]
"""A half-open byte range ``[start, stop)`` inside the arena."""


class PageAllocator:
    def __init__(self, npages: int, page_bytes: int) -> None:
        if npages < 0 or page_bytes <= 0:
            raise TierConfigError(f"bad arena geometry: {npages} pages of {page_bytes} bytes")
        self.npages = npages
        self.page_bytes = page_bytes
        self._free: list[int] = list(range(npages))  # a heap; sorted already
        self._free_count = npages

    @property
    def free_pages(self) -> int:
        return self._free_count

    def pages_for(self, nbytes: int) -> int:
        return max(1, -(-nbytes // self.page_bytes))

    def allocate(self, nbytes: int) -> list[Run] | None:
        """Byte runs covering ``nbytes`` (the last one trimmed), or ``None`` when out of pages."""
        n = self.pages_for(nbytes)
        if n > self._free_count:
            return None
        pages = [heapq.heappop(self._free) for _ in range(n)]
        self._free_count -= n
        runs: list[Run] = []
        page = self.page_bytes
        start = prev = pages[0]
        for p in pages[1:]:
            if p != prev + 1:
                runs.append((start * page, (prev + 1) * page))
                start = p
            prev = p
        runs.append((start * page, (prev + 1) * page))
        # Trim the tail so the runs cover exactly nbytes.
        excess = n * page - nbytes
        if excess:
            s, e = runs[-1]
            runs[-1] = (s, e - excess)
        return runs

    def free(self, runs: list[Run]) -> None:
        page = self.page_bytes
        for start, stop in runs:
            first = start // page
            last = -(-stop // page) if stop > start else first + 1
            for p in range(first, last):
                heapq.heappush(self._free, p)
                self._free_count += 1
        if self._free_count > self.npages:
            raise TierError("double free in page allocator")
