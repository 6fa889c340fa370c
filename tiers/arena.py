"""The storage under the memory tiers: one preallocated torch ``uint8`` tensor, carved into pages.

Each :class:`~tiers.memory.ArenaTier` stores its blocks in an :class:`ArenaStorage`: its own, or
one it shares with other tiers. Sharing is for tiers that live in the same memory. On a host
without CUDA, hbm and dram are both host DRAM, and a block demoted from one to the other would
be copied from one region of the same memory to another. With one storage, the block's pages
change owner instead (:meth:`~tiers.memory.ArenaTier.adopt` of a loan): no byte moves. Each tier
still has its own budget (its ledger); the storage only holds the pages all of them were
promised, so the page allocator can never run dry while every ledger is within budget.

A host arena can be paged in ahead of use (``prefault``): a background thread asks the kernel to
back it with memory, 16 MiB at a time (``MADV_POPULATE_WRITE``), so the first fill of a tier does
not pay a page fault per 4 KiB of every block written. On a VM a fault costs about 10 us: PUTs
into an untouched 6 GiB arena ran at 0.29 GB/s, into a paged-in one at 2.40 (docs/benchmarks.md).
Pages the kernel already backs are left as they are, so blocks written meanwhile are safe.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch

from tiers.allocator import PageAllocator
from tiers.errors import TierClosed, TierConfigError
from tiers.shmseg import SegmentInfo, ShmSegment, register_local_cuda

log = logging.getLogger(__name__)

DEFAULT_PAGE_BYTES = 64 * 1024
MADV_POPULATE_WRITE = 23
"""Linux 5.14+; Python's mmap module has no name for it. Older kernels refuse it (EINVAL): the
arena is then paged in by its first writes, as without ``prefault``."""
PREFAULT_ENDED = "paged in"
"""In both log lines that end the paging in (done, or refused): what a watcher of the log
waits for (loadtest.procs)."""
PREFAULT_CHUNK = 16 * 1024 * 1024
"""Small enough that closing the arena (which waits for the chunk in progress) stays short:
tens of milliseconds on a VM that pages memory in at 0.5 GB/s."""


class ArenaStorage:
    """Pages of one arena, for the tiers that :meth:`commit` to it.

    ``name`` labels the shared-memory segment and the CUDA IPC name. With ``shm_dir`` a CPU
    arena lives in a shared-memory segment (:mod:`tiers.shmseg`) that same-host clients map;
    with ``pin_memory`` it is page-locked for asynchronous DMA. The storage closes when the
    last tier using it closes.
    """

    def __init__(
        self,
        name: str,
        nbytes: int,
        *,
        device: str = "cpu",
        pin_memory: bool = False,
        page_bytes: int = DEFAULT_PAGE_BYTES,
        shm_dir: Path | None = None,
        prefault: bool = False,
    ) -> None:
        if page_bytes <= 0:
            raise TierConfigError("page_bytes must be positive")
        if nbytes < 0:
            raise TierConfigError(f"arena size must be >= 0, got {nbytes}")
        npages = nbytes // page_bytes
        self.name = name
        self.torch_device = torch.device(device)
        self._pinned = pin_memory and self.torch_device.type == "cpu"
        self._registered: int | None = None  # address of a shared arena page-locked by us
        self._ipc_handle: tuple[object, ...] | None = None
        self._segment: ShmSegment | None = None
        self._mapping: mmap.mmap | None = None  # a private host arena's own anonymous mapping
        self._prefaulter: _Prefaulter | None = None
        self.alloc = PageAllocator(npages, page_bytes)
        self._committed = 0
        self._users = 0
        self._arena: torch.Tensor | None = self._allocate(npages * page_bytes, shm_dir)
        self.device = str(self.torch_device) + ("-pinned" if self._pinned else "")
        # On the CPU the arena is also reachable as a flat memoryview: slicing it is free and
        # copying into/out of it is one memcpy without torch's per-op overhead.
        self.view: memoryview | None = (
            self._arena.numpy().data if self.torch_device.type == "cpu" else None
        )
        host = self._mapping if self._segment is None else self._segment.buffer
        if prefault and host is not None:
            self._prefaulter = _Prefaulter(name, host)

    @property
    def page_bytes(self) -> int:
        return self.alloc.page_bytes

    def prefaulted(self, timeout: float | None = None) -> bool:
        """Whether paging the arena in ahead has ended (or was never asked for)."""
        return self._prefaulter is None or self._prefaulter.wait(timeout)

    @property
    def committed_pages(self) -> int:
        return self._committed

    def commit(self, npages: int) -> None:
        """A tier will use up to ``npages`` pages of this storage (its budget and landing
        pages); raises when the storage was not made big enough for every tier promised."""
        if npages < 0:
            raise TierConfigError("a negative page count")
        if self._committed + npages > self.alloc.npages:
            raise TierConfigError(
                f"arena {self.name}: {npages} more pages asked, "
                f"{self.alloc.npages - self._committed} of {self.alloc.npages} left"
            )
        self._committed += npages
        self._users += 1

    def release(self) -> None:
        """A tier that committed is closed; the last one closes the storage."""
        self._users -= 1
        if self._users <= 0:
            self.close()

    @property
    def arena(self) -> torch.Tensor | None:
        return self._arena

    def live(self) -> torch.Tensor:
        if self._arena is None:
            raise TierClosed(f"arena {self.name} is closed")
        return self._arena

    @property
    def shared_name(self) -> str | None:
        """The name clients know the arena's storage by; ``None`` when it is private."""
        if self._segment is not None:
            return self._segment.name
        arena = self._arena
        if arena is not None and arena.device.type == "cuda":
            return f"cuda-{self.name}"
        return None

    def shared_segment(self) -> SegmentInfo | None:
        """The segment holding the arena, for same-host clients."""
        if self._segment is not None:
            return self._segment.info()
        arena = self._arena
        if arena is None or arena.device.type != "cuda":
            return None
        handle = self.cuda_ipc_handle()
        return SegmentInfo(f"cuda-{self.name}", "", arena.numel(), kind="cuda_ipc", ipc=handle)

    def cuda_ipc_handle(self) -> tuple[object, ...] | None:
        """The CUDA IPC handle of a GPU arena (``torch`` storage sharing), else ``None``."""
        arena = self._arena
        if arena is None or arena.device.type != "cuda":
            return None
        if self._ipc_handle is None:
            # Once per arena: every export counts one more consumer reference that torch's
            # producer side waits for.
            self._ipc_handle = arena.untyped_storage()._share_cuda_()  # type: ignore[no-untyped-call]
            # CUDA cannot open an IPC handle in the process that made it: a client in this
            # process (an engine embedding the gateway) finds the arena here instead.
            register_local_cuda(self._ipc_handle, arena)
        return self._ipc_handle

    def close(self) -> None:
        if self._prefaulter is not None:
            self._prefaulter.stop()  # before the unmap below
            self._prefaulter = None
        self._arena = None
        self.view = None
        if self._registered is not None:
            # Before the unmap: CUDA keeps the range registered otherwise, and a later mapping
            # at the same address then fails to register ("already mapped").
            _unregister_host(self._registered)
            self._registered = None
        if self._segment is not None:
            self._segment.close()
            self._segment = None
        mapping, self._mapping = self._mapping, None
        if mapping is not None:
            # A tensor or memoryview may still export it; the mapping then goes with them.
            with contextlib.suppress(BufferError):
                mapping.close()

    def _allocate(self, nbytes: int, shm_dir: Path | None) -> torch.Tensor:
        if shm_dir is not None and self.torch_device.type == "cpu" and nbytes > 0:
            try:
                segment = ShmSegment.create(self.name.lower()[:32], nbytes, directory=shm_dir)
            except (OSError, ValueError) as exc:
                log.warning("arena %s: private, no shared memory: %s", self.name, exc)
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    arena = torch.frombuffer(segment.buffer, dtype=torch.uint8)
                if self._pinned:
                    if _register_host(arena):
                        self._registered = arena.data_ptr()
                    else:
                        self._pinned = False
                self._segment = segment
                return arena
        if self.torch_device.type == "cpu" and not self._pinned and nbytes > 0:
            # An anonymous mapping of its own rather than torch's allocation: one the arena can
            # ask the kernel to page in (and back with huge pages where the kernel offers them).
            # MAP_PRIVATE: mmap's default for -1 is shared memory, which a fork would share
            # and the kernel would not back with huge pages.
            mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            with contextlib.suppress(OSError):
                mapping.madvise(mmap.MADV_HUGEPAGE)
            self._mapping = mapping
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return torch.frombuffer(mapping, dtype=torch.uint8)
        return torch.empty(
            nbytes, dtype=torch.uint8, device=self.torch_device, pin_memory=self._pinned
        )


def _libc_madvise() -> Callable[[int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return cast(Callable[[int, int, int], int], fn)


# Through ctypes, which lets go of the GIL for the call: mmap.madvise holds it, and paging in
# stalled the event loop for up to 39 ms at a time on this VM (ctypes: at most about 1 ms).
_MADVISE = _libc_madvise()


class _Prefaulter:
    """Pages a host mapping in from a background thread; :meth:`stop` waits for it (one chunk
    at most), so the mapping can then be closed."""

    def __init__(self, name: str, mapping: mmap.mmap) -> None:
        self._name = name
        self._size = len(mapping)
        # The address only: a ctypes view kept alive would hold the mapping open at close.
        view = ctypes.c_char.from_buffer(mapping)
        self._address = ctypes.addressof(view)
        del view
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"kvgate-prefault-{name}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    def wait(self, timeout: float | None = None) -> bool:
        """Whether the paging in has ended (done, stopped or refused) within ``timeout``."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        size = self._size
        started = time.perf_counter()
        for offset in range(0, size, PREFAULT_CHUNK):
            if self._stopped.is_set():
                return
            try:
                if _MADVISE is None:
                    raise OSError("no madvise in the C library")
                length = min(PREFAULT_CHUNK, size - offset)
                if _MADVISE(self._address + offset, length, MADV_POPULATE_WRITE) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, os.strerror(errno))
            except OSError as exc:
                log.info(
                    "arena %s: not %s ahead (%s); its first writes fault it in",
                    self._name,
                    PREFAULT_ENDED,
                    exc,
                )
                return
        log.info(
            "arena %s: %.0f MiB %s in %.1f s",
            self._name,
            size / (1 << 20),
            PREFAULT_ENDED,
            time.perf_counter() - started,
        )


def _register_host(arena: torch.Tensor) -> bool:
    """Page-lock a shared-memory arena for async DMA, as ``pin_memory`` does for private ones;
    whether it worked."""
    cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
    rc = cudart.cudaHostRegister(arena.data_ptr(), arena.numel(), 0)
    if int(rc) != 0:
        log.warning("cudaHostRegister failed (%s): the shared dram arena is pageable", rc)
        return False
    return True


def _unregister_host(address: int) -> None:
    cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
    rc = cudart.cudaHostUnregister(address)
    if int(rc) != 0:
        log.warning("cudaHostUnregister failed (%s)", rc)
