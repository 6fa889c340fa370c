"""The load generator's allocator settings (glibc ``mallopt``), the same for every target.

Every target's client runs in the load-generator process and hands back each block read as a
fresh 1 MiB ``bytes`` (aiohttp, redis-py, Mooncake's ``get``, kvgate's shared-memory client).
With glibc's defaults a freed 1 MiB buffer is given back to the kernel as soon as the top of the
heap holds more than ~2 MiB free (the trim threshold follows the mmap threshold, which adapts to
1 MiB), so the next ``bytes`` of that size is fresh memory again: 256 page faults, each zeroing
a page, before a single byte is copied. On the 2-core VM that caps a plain memcpy of 1 MiB into
a new ``bytes`` at ~2.5 GB/s instead of ~9 GB/s, and whichever client allocates most per second
pays most -- a property of the load generator, not of the store measured.

``keep_freed_memory`` fixes the mmap threshold at 32 MiB and the trim threshold at 512 MiB, so
freed blocks stay in the heap and are reused (the resident size of the load generator stays at
its peak, bounded by what is in flight: 16 workers x 1 MiB here). The servers are not touched.
``--client-malloc default`` keeps glibc's behaviour, for comparison.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 512 << 20
CHOICES = ("keep", "default")


def keep_freed_memory() -> bool:
    """Apply the settings above; ``False`` where there is no glibc ``mallopt`` (then nothing
    changes)."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )


def apply(choice: str) -> str:
    """What the run used, for the results' metadata."""
    if choice == "keep":
        return "keep (mmap 32 MiB, trim 512 MiB)" if keep_freed_memory() else "default (no mallopt)"
    return "default"
