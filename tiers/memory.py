"""HBM and DRAM tiers: a preallocated torch arena, carved into pages (:mod:`tiers.arena`).

The arena is allocated once at start-up (``torch.empty``), on ``cuda`` for HBM when a GPU is
present and on the CPU otherwise, and in pinned host memory for DRAM when CUDA is present (so
host-device copies can be asynchronous DMA). No allocation happens per block: a block is a list of
byte runs (views) into the arena, handed out by :class:`~tiers.allocator.PageAllocator`.

Tiers in the same memory can share one arena (``storage``): a block lent by one of them
(:meth:`ArenaTier.lend`) is then adopted by the other with its pages, where it would otherwise be
copied (:meth:`ArenaTier.adopt`).

With ``landing_bytes`` a CPU arena has that many pages more than its budget, for
:meth:`ArenaTier.reserve`: a PUT body is received straight into them and the block then takes
them over (:meth:`ArenaTier.adopt`) instead of being copied in. They are charged to a ledger of
their own while they are a reservation and move to the tier's ledger on adoption, so the budget
(``capacity_bytes``) still bounds what the tier stores.

With ``shm_dir`` a CPU arena lives in a shared-memory segment (:mod:`tiers.shmseg`) that
same-host clients map, and :meth:`ArenaTier.pin` lends a block's pages out (for a zero-copy HTTP
write or a shared-memory descriptor): a pinned block that is deleted or evicted leaves the index
at once, but its pages (and their charge in the ledger) are freed only at the last release.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import warnings
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from opentelemetry import trace
from opentelemetry.trace import Span

from tiers.allocator import Run
from tiers.arena import DEFAULT_PAGE_BYTES, ArenaStorage
from tiers.base import Loan, Placement, PutOutcome, Reservation, TierStats
from tiers.block import Block, BlockMeta
from tiers.errors import TierClosed, TierConfigError, TierError
from tiers.ledger import CapacityLedger
from tiers.observe import ATTR_BYTES, ATTR_TIER, child_span
from tiers.shmseg import SegmentInfo

ATTR_COPY_DIRECTION = "kvgate.copy.direction"

log = logging.getLogger(__name__)

# Copies up to this size run inline on the event loop: a memcpy of 4 MiB takes well under a
# millisecond, less than handing it to a thread and back. Larger ones go to the executor.
DEFAULT_INLINE_COPY_BYTES = 4 * 1024 * 1024


@dataclass(slots=True, eq=False)
class _Entry:
    runs: list[Run]
    meta: BlockMeta
    pins: int = 0
    dropped: bool = False  # gone from the index; pages wait for the last unpin
    held_key: str = field(default="")  # the ledger key its charge moved to once dropped


@dataclass(slots=True, eq=False)
class ArenaPin:
    """One reader's hold on a block's pages (see :class:`tiers.base.PinnedBlock`)."""

    meta: BlockMeta
    _tier: ArenaTier
    _entry: _Entry
    _released: bool = False

    def views(self) -> list[memoryview] | None:
        view = self._tier._view
        if view is None or self._released:
            return None
        return [view[start:stop] for start, stop in self._entry.runs]

    def placement(self) -> Placement | None:
        name = self._tier.shared_name
        if name is None or self._released:
            return None
        return Placement(name, tuple((a, b - a) for a, b in self._entry.runs))

    async def read(self) -> bytes | memoryview:
        if self._released:
            raise RuntimeError("read of a released pin")
        return await self._tier._read(self._entry)

    @property
    def runs(self) -> list[Run]:
        return list(self._entry.runs)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._tier._unpin(self._entry)


@dataclass(slots=True, eq=False)
class ArenaReservation:
    """Pages of one arena set aside for a block still arriving (tiers.base.Reservation)."""

    view: memoryview
    _tier: ArenaTier
    _runs: list[Run]
    _charge_key: str
    _open: bool = True

    def release(self) -> None:
        if self._open:
            self._open = False
            self._tier._unreserve(self)


@dataclass(slots=True, kw_only=True)
class ArenaLoan(Loan):
    """A lent arena block (:meth:`ArenaTier.lend`): a tier sharing the arena adopts its pages."""

    tier: ArenaTier
    entry: _Entry


def cuda_available() -> bool:
    return torch.cuda.is_available()


class ArenaTier:
    """A byte store over one preallocated torch ``uint8`` tensor."""

    volatile = True

    def __init__(
        self,
        name: str,
        capacity_bytes: int,
        *,
        device: str = "cpu",
        pin_memory: bool = False,
        page_bytes: int = DEFAULT_PAGE_BYTES,
        executor: Executor | None = None,
        inline_copy_bytes: int = DEFAULT_INLINE_COPY_BYTES,
        shm_dir: Path | None = None,
        prefault: bool = False,
        landing_bytes: int = 0,
        storage: ArenaStorage | None = None,
    ) -> None:
        """``storage``: an arena shared with other tiers (its device, page size and memory are
        then the storage's); ``None`` gives the tier one of its own."""
        if page_bytes <= 0:
            raise TierConfigError("page_bytes must be positive")
        if landing_bytes < 0:
            raise TierConfigError("landing_bytes must be >= 0")
        if storage is not None:
            if torch.device(device) != storage.torch_device:
                raise TierConfigError(f"tier {name} on {device}, its arena on {storage.device}")
            page_bytes = storage.page_bytes
        npages = capacity_bytes // page_bytes
        landing_pages = landing_bytes // page_bytes
        self.name = name
        if storage is None:
            storage = ArenaStorage(
                name,
                (npages + landing_pages) * page_bytes,
                device=device,
                pin_memory=pin_memory,
                page_bytes=page_bytes,
                shm_dir=shm_dir,
                prefault=prefault,
            )
        storage.commit(npages + landing_pages)
        self._storage = storage
        self._alloc = storage.alloc
        self._ledger = CapacityLedger(npages * page_bytes)
        # Reservations are charged here, not to the budget: a tier full of blocks can still
        # receive the next one in place while the hierarchy makes room for it.
        self._landing_ledger = CapacityLedger(landing_pages * page_bytes)
        self._reservation_ids = itertools.count()
        self.adopted = 0
        """Blocks stored by adopting a reservation (no copy in)."""
        self.taken_over = 0
        """Blocks stored by taking another tier's loan over with its pages (no copy)."""
        self._entries: dict[str, _Entry] = {}
        self._executor = executor
        self._inline_copy_bytes = inline_copy_bytes
        self._held = 0
        self._arena: torch.Tensor | None = storage.live()
        self.device = storage.device
        self._view: memoryview | None = storage.view
        self._hits = self._misses = self._evictions = 0

    @classmethod
    def hbm(cls, capacity_bytes: int, **kwargs: object) -> ArenaTier:
        """The hottest tier: GPU memory when CUDA is present, else the CPU (and it says so)."""
        device = "cuda" if cuda_available() else "cpu"
        if device == "cpu":
            log.warning("no CUDA device: the hbm tier runs on the CPU")
        return cls("hbm", capacity_bytes, device=device, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def dram(cls, capacity_bytes: int, **kwargs: object) -> ArenaTier:
        return cls(
            "dram",
            capacity_bytes,
            device="cpu",
            pin_memory=cuda_available(),
            **kwargs,  # type: ignore[arg-type]
        )

    # -- Tier protocol ---------------------------------------------------------------------

    def contains(self, key: str) -> bool:
        return key in self._entries

    def keys(self) -> list[str]:
        return list(self._entries)

    def fits(self, nbytes: int) -> bool:
        return self._ledger.fits(self._charge(nbytes))

    def could_ever_fit(self, nbytes: int) -> bool:
        return self._ledger.could_ever_fit(self._charge(nbytes))

    async def get(self, key: str) -> Block | None:
        entry = self._entries.get(key)
        if entry is None:
            self._misses += 1
            return None
        self._hits += 1
        return Block(await self._read(entry), entry.meta)

    async def put(self, key: str, block: Block) -> PutOutcome:
        arena = self._live()
        if key in self._entries:
            return PutOutcome.EXISTS
        size = block.meta.size
        charge = self._charge(size)
        if not self._ledger.could_ever_fit(charge):
            return PutOutcome.TOO_LARGE
        if not self._ledger.charge(key, charge):
            return PutOutcome.NO_ROOM
        runs = self._alloc.allocate(size)
        if runs is None:  # the ledger and the allocator agree by construction
            self._ledger.release(key)
            return PutOutcome.NO_ROOM
        # Registered before the copy awaits, so a concurrent put of the same key sees EXISTS;
        # the hierarchy never serves a key from a tier until put has returned STORED.
        entry = _Entry(runs, block.meta)
        self._entries[key] = entry
        try:
            await self._write(arena, runs, block.data)
        except BaseException:
            self._drop(key)
            raise
        return PutOutcome.STORED

    async def delete(self, key: str) -> bool:
        return self._drop(key) is not None

    async def evict(self, key: str) -> Block | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        data = await self._read(entry)
        if self._entries.get(key) is entry:
            self._drop(key)
            self._evictions += 1
        return Block(data, entry.meta)

    async def drop(self, key: str) -> bool:
        """Evict ``key`` without copying it out (tiers.base.DroppingTier)."""
        if self._drop(key) is None:
            return False
        self._evictions += 1
        return True

    # -- reservations (tiers.base.ReservingTier) ------------------------------------------

    def reserve(self, nbytes: int) -> ArenaReservation | None:
        """One run of landing pages for ``nbytes``; ``None`` without a CPU arena, when the
        landing pages are taken, or when no single run is free (a body is received into one
        buffer)."""
        view = self._view
        if view is None or nbytes <= 0:
            return None
        charge_key = f"\x00landing:{next(self._reservation_ids)}"
        if not self._landing_ledger.charge(charge_key, self._charge(nbytes)):
            return None
        runs = self._alloc.allocate(nbytes)
        if runs is None or len(runs) != 1:
            if runs is not None:
                self._alloc.free(runs)
            self._landing_ledger.release(charge_key)
            return None
        start, stop = runs[0]
        return ArenaReservation(view[start:stop], self, runs, charge_key)

    def adopt(self, key: str, reservation: Reservation, meta: BlockMeta) -> PutOutcome | None:
        """Store ``key`` with no copy: in the pages of this tier's own open ``reservation``, or
        in those of a loan from a tier sharing this one's arena (which hands them over).

        ``None`` for anything else, and for a loan whose pages a reader still has pinned
        (they must stay where that reader's pin says): the caller copies instead.
        """
        if isinstance(reservation, ArenaReservation):
            if reservation._tier is not self or not reservation._open:
                return None
        elif isinstance(reservation, ArenaLoan):
            lender = reservation.tier
            if (
                lender._storage is not self._storage
                or lender is self
                or reservation.ended
                or reservation.entry.pins != 1  # the loan's own hold, no reader's
            ):
                return None
        else:
            return None
        self._live()
        if meta.size != len(reservation.view):
            raise TierError(
                f"a block of {meta.size} bytes in a {len(reservation.view)}-byte reservation"
            )
        if key in self._entries:
            return PutOutcome.EXISTS
        charge = self._charge(meta.size)
        if not self._ledger.could_ever_fit(charge):
            return PutOutcome.TOO_LARGE
        if not self._ledger.charge(key, charge):
            return PutOutcome.NO_ROOM
        if isinstance(reservation, ArenaLoan):
            runs = reservation.tier._hand_over(reservation)
            self.taken_over += 1
        else:
            reservation._open = False
            self._landing_ledger.release(reservation._charge_key)
            runs = reservation._runs
            self.adopted += 1
        self._entries[key] = _Entry(runs, meta)
        return PutOutcome.STORED

    @property
    def storage(self) -> ArenaStorage:
        """The arena the tier's pages come from, shared with other tiers or its own."""
        return self._storage

    @property
    def landing_bytes(self) -> int:
        """Pages for reservations, beyond the budget."""
        return self._landing_ledger.capacity_bytes

    @property
    def reserved_bytes(self) -> int:
        return self._landing_ledger.used_bytes

    def _unreserve(self, reservation: ArenaReservation) -> None:
        self._alloc.free(reservation._runs)
        self._landing_ledger.release(reservation._charge_key)

    def lend(self, key: str) -> Loan | None:
        """Evict ``key`` without copying it out (tiers.base.LendingTier): a block of one run in
        a CPU arena is lent as a view of its pages, which stay charged until the loan ends."""
        entry = self._entries.get(key)
        view = self._view
        if entry is None or view is None or len(entry.runs) != 1:
            return None
        entry.pins += 1  # the loan holds the pages the way a reader's pin does
        self._drop(key)
        self._evictions += 1
        start, stop = entry.runs[0]
        return ArenaLoan(
            Block(view[start:stop], entry.meta), lambda: self._unpin(entry), tier=self, entry=entry
        )

    def _hand_over(self, loan: ArenaLoan) -> list[Run]:
        """End ``loan`` by giving its pages away (to a tier sharing the arena): this tier's
        charge for them goes, the pages stay allocated, now the adopter's. The loan was the
        entry's only pin (adopt checks), and a settled loan never unpins, so nothing frees
        these pages here again."""
        entry = loan.entry
        loan.settle()
        entry.pins -= 1
        self._ledger.release(entry.held_key)
        self._held -= 1
        return entry.runs

    def stats(self) -> TierStats:
        snap = self._ledger.snapshot()
        return TierStats(
            name=self.name,
            device=self.device,
            capacity_bytes=snap.capacity_bytes,
            used_bytes=snap.used_bytes,
            blocks=len(self._entries),
            hits=self._hits,
            misses=self._misses,
            evictions=self._evictions,
        )

    async def close(self) -> None:
        self._entries.clear()
        if self._arena is not None:
            self._arena = None
            self._view = None
            self._storage.release()

    # -- pins (tiers.base.PinnableTier) ------------------------------------------------------

    def pin(self, key: str) -> ArenaPin | None:
        entry = self._entries.get(key)
        if entry is None or self._arena is None:
            self._misses += 1
            return None
        self._hits += 1
        entry.pins += 1
        return ArenaPin(entry.meta, self, entry)

    @property
    def shared_name(self) -> str | None:
        """The name clients know the arena's storage by; ``None`` when it is private."""
        return None if self._arena is None else self._storage.shared_name

    def shared_segment(self) -> SegmentInfo | None:
        """The segment holding the arena, for same-host clients (tiers.base.SharedTier)."""
        return None if self._arena is None else self._storage.shared_segment()

    @property
    def pinned_blocks(self) -> int:
        """Dropped blocks whose pages still wait for readers to release them."""
        return self._held

    def cuda_ipc_handle(self) -> tuple[object, ...] | None:
        """The CUDA IPC handle of an HBM arena (``torch`` storage sharing), else ``None``."""
        return None if self._arena is None else self._storage.cuda_ipc_handle()

    def _unpin(self, entry: _Entry) -> None:
        entry.pins -= 1
        if entry.pins == 0 and entry.dropped:
            self._alloc.free(entry.runs)
            self._ledger.release(entry.held_key)
            self._held -= 1

    # -- internals -------------------------------------------------------------------------

    @property
    def page_bytes(self) -> int:
        return self._alloc.page_bytes

    def _charge(self, nbytes: int) -> int:
        return self._alloc.pages_for(nbytes) * self._alloc.page_bytes

    def _live(self) -> torch.Tensor:
        if self._arena is None:
            raise TierClosed(f"tier {self.name} is closed")
        return self._arena

    def _drop(self, key: str) -> _Entry | None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        charge = self._ledger.release(key)
        if entry.pins:
            # Readers still copy from these pages: keep them (and their charge) until released.
            entry.dropped = True
            entry.held_key = f"\x00pinned:{id(entry)}"
            self._ledger.charge(entry.held_key, charge)
            self._held += 1
        else:
            self._alloc.free(entry.runs)
        return entry

    async def _write(self, arena: torch.Tensor, runs: list[Run], data: bytes | memoryview) -> None:
        if self._view is not None and len(data) <= self._inline_copy_bytes:
            _note_inline_copy("in")
            _copy_in(self._view, runs, memoryview(data))
            return
        # The span lives on the loop, around the awaited executor call: no context crosses threads.
        with child_span("kvgate.tier.copy") as span:
            if span.is_recording():
                self._copy_attrs(span, "in", len(data))
            await asyncio.get_running_loop().run_in_executor(
                self._executor, _copy_in_tensor, arena, runs, data
            )

    async def _read(self, entry: _Entry) -> bytes | memoryview:
        size = entry.meta.size
        if self._view is not None and size <= self._inline_copy_bytes:
            _note_inline_copy("out")
            return _copy_out(self._view, entry.runs)
        arena = self._live()
        with child_span("kvgate.tier.copy") as span:
            if span.is_recording():
                self._copy_attrs(span, "out", size)
            return await asyncio.get_running_loop().run_in_executor(
                self._executor, _copy_out_tensor, arena, entry.runs, size
            )

    def _copy_attrs(self, span: Span, direction: str, size: int) -> None:
        span.set_attributes(
            {
                ATTR_TIER: self.name,
                ATTR_BYTES: size,
                ATTR_COPY_DIRECTION: direction,
                "kvgate.copy.device": self.device,
            }
        )


def _note_inline_copy(direction: str) -> None:
    # An inline memcpy of a small block costs about what a span would: it is noted on the
    # enclosing tier span (get, put or evict) instead of getting one of its own.
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes({ATTR_COPY_DIRECTION: direction, "kvgate.copy.inline": True})


def _copy_in(view: memoryview, runs: list[Run], src: memoryview) -> None:
    src = src.cast("B") if src.format != "B" or src.ndim != 1 else src
    offset = 0
    for start, stop in runs:
        n = stop - start
        view[start:stop] = src[offset : offset + n]
        offset += n


def _copy_out(view: memoryview, runs: list[Run]) -> bytes:
    if len(runs) == 1:
        start, stop = runs[0]
        return view[start:stop].tobytes()
    return b"".join(view[start:stop] for start, stop in runs)


def _copy_in_tensor(arena: torch.Tensor, runs: list[Run], data: bytes | memoryview) -> None:
    # torch's copy_ releases the GIL, so big copies in a worker thread don't stall the loop.
    with warnings.catch_warnings():
        # The source is only read; torch warns because it cannot mark the tensor read-only.
        warnings.simplefilter("ignore", UserWarning)
        src = torch.frombuffer(memoryview(data).cast("B"), dtype=torch.uint8) if len(data) else None
    offset = 0
    for start, stop in runs:
        n = stop - start
        if n and src is not None:
            arena[start:stop].copy_(src[offset : offset + n])
        offset += n
    if arena.device.type == "cuda":
        torch.cuda.current_stream(arena.device).synchronize()


def _copy_out_tensor(arena: torch.Tensor, runs: list[Run], size: int) -> memoryview:
    if arena.device.type == "cuda":
        return _copy_out_cuda(arena, runs, size)
    out = np.empty(size, dtype=np.uint8)
    dst = torch.from_numpy(out)
    offset = 0
    for start, stop in runs:
        n = stop - start
        if n:
            dst[offset : offset + n].copy_(arena[start:stop])
        offset += n
    return out.data


def _copy_out_cuda(arena: torch.Tensor, runs: list[Run], size: int) -> memoryview:
    # Into page-locked memory from torch's caching host allocator: the DMA runs at full speed
    # (a pageable destination is staged by the driver), and a buffer freed by an earlier read is
    # reused, so there is neither a cudaHostAlloc nor a page fault per read. The returned view
    # keeps the tensor, and so the buffer, until the response has been written.
    host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    offset = 0
    for start, stop in runs:
        n = stop - start
        if n:
            host[offset : offset + n].copy_(arena[start:stop], non_blocking=True)
        offset += n
    torch.cuda.current_stream(arena.device).synchronize()
    return host.numpy().data
