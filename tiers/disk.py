"""The disk tier: framed, zstd-compressed blocks in one LMDB environment.

Threads. Nothing here blocks the event loop. zstd and LMDB reads run on a reader pool (injected
or owned; read transactions last one ``get`` plus its decode, and decode straight out of the map
without a copy). Every write transaction runs on ONE dedicated writer thread. Writes queue on the
loop and the writer takes everything queued at once into a single transaction (group commit), so
concurrent puts share one commit and one fsync. Mutations of one key are serialised on the loop
by a per-key lock, so a put, a delete and an evict of the same key never race.

Capacity. The budget (``capacity_bytes``, ``--disk-bytes``) bounds the LMDB map, and the file can
never grow past its map. A block is charged to a :class:`~tiers.ledger.CapacityLedger` by what it
really occupies: the overflow pages its frame needs plus its leaf entry (counted twice, leaves are
rarely full). The ledger gets the budget less a reserve (1/16 of small budgets, at least 64
pages; 128 MiB + 0.4% of large ones) that holds the B-tree, the free list and the pages LMDB
cannot reuse yet (a page freed by transaction N is only reusable from N+2, and never while a
reader still sees it; a group commit is capped at a quarter of the reserve for that reason).
When a write still hits the map limit, the writer commits a couple of tiny "tick" transactions to
release those pages and retries once. A frame needs one contiguous run of pages and LMDB never
moves a page, so a small map can be fragmented past use while the ledger rightly sees room
(2 MiB frames in a 4 MiB map stop fitting after two evictions); while the live set is small
(``compact_max_bytes``) the writer then rewrites the file packed (``mdb_env_copy`` with
compaction, fsynced, swapped in by rename; the copy needs that much free disk space for a
moment) and retries. After that the put answers ``NO_ROOM`` and the hierarchy evicts. A
compaction that cannot reopen the environment fails its put; the writer reopens it before the
next batch, and reads are misses meanwhile. The last 32 pages of the budget are for removals
only (a delete needs copy-on-write pages too, and making room must never be refused); the map
grows into them for that one transaction.
The map itself starts small and doubles up to the budget; ``set_mapsize`` runs on the writer
thread while a gate holds off new readers (LMDB requires no open transaction in the process).

Durability. ``sync=True`` (default) with ``metasync=False``: each commit fsyncs its data pages but
not the meta page. LMDB's copy-on-write plus atomic meta switch means a kill -9 can never expose a
torn block, and an OS crash loses at most the last commit, never integrity; that is the right trade
for a cache (a lost block is a miss). Batches that touch the meta DB (fencing counters) are flushed
fully with ``env.sync(True)``, so a counter handed out survives a power cut. Every frame is also
checksummed (:mod:`tiers.frame`): whatever the disk does, wrong bytes are never served -- a block
that fails its check is deleted and answered as a miss.

Keys. LMDB keys are the UTF-8 scoped keys; keys over LMDB's limit (511 bytes) are stored under
``0x00 + xxh3-128(key)`` with the original kept in a side DB so the index can be rebuilt.

Use ``tier = await DiskTier.open(path, capacity_bytes=...)`` from async code (opening reads the
whole key index), or the constructor directly where blocking briefly is fine (tests, CLI).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import os
import shutil
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import lmdb

from tiers.base import PutOutcome, TierStats
from tiers.block import Block, digest
from tiers.clock import SYSTEM_CLOCK, Clock
from tiers.errors import CorruptBlock, TierClosed, TierConfigError, TierError, TierIOError
from tiers.frame import (
    DEFAULT_LEVEL,
    MAX_FRAME_OVERHEAD,
    ByteGroup,
    decode_frame,
    encode_frame,
    read_header,
)
from tiers.ledger import CapacityLedger
from tiers.observe import ATTR_BYTES, ATTR_TIER, child_span

log = logging.getLogger(__name__)

MIN_CAPACITY_BYTES: Final = 1 << 20
DEFAULT_INITIAL_MAP_BYTES: Final = 8 << 20
# Compacting copies every live page while puts wait: only worth it while that is cheap.
DEFAULT_COMPACT_MAX_BYTES: Final = 64 << 20

_DB_BLOCKS: Final = b"blocks"
_DB_LONGKEYS: Final = b"longkeys"
_DB_META: Final = b"meta"
_DB_INTERNAL: Final = b"internal"
_TICK: Final = b"tick"
_LONG_PREFIX: Final = b"\x00"
_COMPACT_DIR: Final = "compact.tmp"
_PAGE_HEADER: Final = 16  # LMDB PAGEHDRSZ
_NODE_HEADER: Final = 8  # LMDB NODESIZE
_PTR: Final = 2  # an indx_t slot in the page's pointer array
# Map pages only removals may use, so room can always be made; part of the reserve.
_EMERGENCY_PAGES: Final = 32
_MAX_CLIENT_KEY: Final = 1100  # a tenant, the separator and a 512-char key, comfortably

_OpKind = Literal["put", "delete", "pop", "meta_put", "meta_incr"]


@dataclass(slots=True)
class _Op:
    kind: _OpKind
    lkey: bytes
    value: bytes
    key: str
    long_key: bool
    future: asyncio.Future[Any]


class _NoRoom:
    """A put the map could not hold, even after releasing pages."""


_NO_ROOM: Final = _NoRoom()


class _ResizeGate:
    """Shared for read transactions, exclusive for ``set_mapsize`` and ``close``."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._readers = 0
        self._exclusive = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cv:
            while self._exclusive:
                self._cv.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cv:
                self._readers -= 1
                if self._readers == 0:
                    self._cv.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cv:
            while self._exclusive:
                self._cv.wait()
            self._exclusive = True
            while self._readers:
                self._cv.wait()
        try:
            yield
        finally:
            with self._cv:
                self._exclusive = False
                self._cv.notify_all()


class DiskTier:
    """The ``disk`` tier (see the module docstring for threads, capacity and durability)."""

    name = "disk"
    device = "lmdb"
    volatile = False

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        capacity_bytes: int,
        executor: Executor | None = None,
        clock: Clock = SYSTEM_CLOCK,
        level: int = DEFAULT_LEVEL,
        byte_group: ByteGroup = "auto",
        sync: bool = True,
        initial_map_bytes: int = DEFAULT_INITIAL_MAP_BYTES,
        read_threads: int = 2,
        max_batch_ops: int = 64,
        compact_max_bytes: int = DEFAULT_COMPACT_MAX_BYTES,
    ) -> None:
        if capacity_bytes < MIN_CAPACITY_BYTES:
            raise TierConfigError(
                f"disk capacity must be at least {MIN_CAPACITY_BYTES} bytes, got {capacity_bytes}"
            )
        if read_threads < 1 or max_batch_ops < 1 or initial_map_bytes < 1:
            raise TierConfigError("read_threads, max_batch_ops and initial_map_bytes must be >= 1")
        self.path = Path(path)
        self.capacity_bytes = capacity_bytes
        self._clock = clock  # uniform with the other tiers; expiry is the hierarchy's job
        self._level = level
        self._byte_group = byte_group
        self._max_batch_ops = max_batch_ops
        self._map_cap = capacity_bytes  # the map, hence the file, never grows past this
        self._sync = sync
        self._spare_txns = read_threads + 1
        self._compact_max_bytes = compact_max_bytes
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            # A compaction a crash interrupted: the live file was never touched.
            shutil.rmtree(self.path / _COMPACT_DIR, ignore_errors=True)
            self._open_env(min(initial_map_bytes, capacity_bytes - _EMERGENCY_PAGES * 4096))
            self._psize: int = self._env.stat()["psize"]
            self._max_key = int(self._env.max_key_size())
        except (lmdb.Error, OSError) as exc:
            raise TierIOError(f"cannot open LMDB environment at {self.path}: {exc}") from exc
        # LMDB node limit for 2 keys per page: larger values go to overflow pages.
        self._nodemax = (((self._psize - _PAGE_HEADER) // 2) & ~1) - _PTR
        # Small budgets: 1/16. Large ones: two batches of freed pages plus B-tree/free list.
        reserve = max(
            (64 + _EMERGENCY_PAGES) * self._psize,
            min(capacity_bytes // 16, (128 << 20) + capacity_bytes // 256),
        )
        self._max_batch_bytes = max(1, reserve // 4)
        self._put_map_cap = self._map_cap - _EMERGENCY_PAGES * self._psize
        self._ledger_budget = max(0, capacity_bytes - reserve)
        self._ledger = CapacityLedger(self._ledger_budget)
        self._present: set[str] = set()
        self._sizes: dict[str, int] = {}  # raw (uncompressed) bytes per block, for quotas
        # Sparse: only blocks stored with a TTL. Read back from frame headers on open, so an
        # expiry outlives a restart without decoding a single payload.
        self._expiry: dict[str, float] = {}
        self._gate = _ResizeGate()
        self._own_executor = executor is None
        self._pool: Executor = executor or ThreadPoolExecutor(
            max_workers=read_threads, thread_name_prefix="kvgate-disk-read"
        )
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvgate-disk-write")
        self._queue: list[_Op] = []
        self._flusher: asyncio.Task[None] | None = None
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        self._closed = False
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.corrupt_blocks = 0
        self.dropped_on_open = 0
        self.compactions = 0
        # Why the environment is closed, when a compaction could not reopen it: the writer
        # tries again before its next batch, and every read until then is a miss.
        self._env_lost: BaseException | None = None
        try:
            self._rebuild_index()
        except BaseException:
            self._env.close()
            self._writer.shutdown(wait=False)
            if self._own_executor:
                self._pool.shutdown(wait=False)
            raise

    @classmethod
    async def open(cls, path: str | os.PathLike[str], **kwargs: Any) -> DiskTier:
        """Construct off the event loop (the index rebuild scans every key)."""
        return await asyncio.to_thread(lambda: cls(path, **kwargs))

    # -- accounting -----------------------------------------------------------------------

    def charge_for(self, key: str, frame_len: int) -> int:
        """What a frame of ``frame_len`` bytes under ``key`` costs in the LMDB file."""
        raw_key = key.encode("utf-8")
        long_key = len(raw_key) > self._max_key
        klen = 17 if long_key else len(raw_key)
        leaf = _NODE_HEADER + klen + frame_len
        if leaf <= self._nodemax:
            cost = 2 * (leaf + _PTR)
        else:
            pages = math.ceil((_PAGE_HEADER + frame_len) / self._psize)
            cost = pages * self._psize + 2 * (_NODE_HEADER + klen + 8 + _PTR)
        if long_key:
            cost += 2 * (_NODE_HEADER + 17 + len(raw_key) + _PTR)
        return cost

    def _worst_charge(self, nbytes: int) -> int:
        # Incompressible blocks are stored raw, so a frame is at most the header bigger.
        return self.charge_for("k" * _MAX_CLIENT_KEY, nbytes + MAX_FRAME_OVERHEAD)

    def fits(self, nbytes: int) -> bool:
        return self._ledger.fits(self._worst_charge(nbytes))

    def could_ever_fit(self, nbytes: int) -> bool:
        return self._ledger.could_ever_fit(self._worst_charge(nbytes))

    def contains(self, key: str) -> bool:
        return key in self._present

    def size_of(self, key: str) -> int:
        """Uncompressed bytes of a stored block (0 when absent): what quotas count."""
        return self._sizes.get(key, 0)

    def expires_at_of(self, key: str) -> float | None:
        """Wall-clock expiry a stored block carries (None: no TTL, or absent)."""
        return self._expiry.get(key)

    def keys(self) -> list[str]:
        return list(self._present)

    @property
    def used_bytes(self) -> int:
        return self._ledger.used_bytes

    @property
    def usable_bytes(self) -> int:
        """The ledger's budget: ``capacity_bytes`` less the LMDB reserve."""
        return self._ledger_budget

    def file_bytes(self) -> int:
        """Size of the LMDB data file on disk right now."""
        return (self.path / "data.mdb").stat().st_size

    def map_bytes(self) -> int:
        with self._gate.shared():  # not while a compaction swaps the environment
            return int(self._env.info()["map_size"])

    def stats(self) -> TierStats:
        return TierStats(
            name=self.name,
            device=self.device,
            capacity_bytes=self.capacity_bytes,
            used_bytes=self._ledger.used_bytes,
            blocks=len(self._present),
            hits=self.hits,
            misses=self.misses,
            evictions=self.evictions,
        )

    # -- the Tier protocol ----------------------------------------------------------------

    async def get(self, key: str) -> Block | None:
        """The verified block, or ``None``. A corrupt block is deleted and missed; an LMDB
        fault raises :class:`TierIOError` (the hierarchy turns it into a miss and a span event)."""
        self._check_open()
        if key not in self._present:
            self.misses += 1
            return None
        loop = asyncio.get_running_loop()
        try:
            with child_span("kvgate.lmdb.txn") as span:
                if span.is_recording():
                    span.set_attributes({ATTR_TIER: self.name, "kvgate.lmdb.op": "read"})
                    # The read thread opens the decompress span: hand it this context.
                    run = contextvars.copy_context().run
                    block = await loop.run_in_executor(
                        self._pool, run, self._read_block, self._lkey(key)
                    )
                else:
                    block = await loop.run_in_executor(
                        self._pool, self._read_block, self._lkey(key)
                    )
        except CorruptBlock:
            self.corrupt_blocks += 1
            self.misses += 1
            await self._drop(key)
            return None
        if block is None:  # deleted while we were reading
            self.misses += 1
            return None
        self.hits += 1
        return block

    async def put(self, key: str, block: Block) -> PutOutcome:
        self._check_open()
        async with self._key_lock(key):
            if key in self._present:
                return PutOutcome.EXISTS
            loop = asyncio.get_running_loop()
            with child_span("kvgate.zstd.compress") as span:
                frame = await loop.run_in_executor(self._pool, self._encode, block)
                if span.is_recording():
                    span.set_attributes(
                        {
                            ATTR_TIER: self.name,
                            ATTR_BYTES: block.meta.size,
                            "kvgate.frame_bytes": len(frame),
                        }
                    )
            charge = self.charge_for(key, len(frame))
            if not self._ledger.could_ever_fit(charge):
                return PutOutcome.TOO_LARGE
            if not self._ledger.charge(key, charge):
                return PutOutcome.NO_ROOM
            with child_span("kvgate.lmdb.txn") as span:
                if span.is_recording():
                    span.set_attributes(
                        {ATTR_TIER: self.name, "kvgate.lmdb.op": "put", ATTR_BYTES: len(frame)}
                    )
                result = await self._submit_key_op("put", key, frame)
            if result is _NO_ROOM:
                return PutOutcome.NO_ROOM
            if result and key in self._present:
                self._sizes[key] = block.meta.size
                if block.meta.expires_at is not None:
                    self._expiry[key] = block.meta.expires_at
            return PutOutcome.STORED if result else PutOutcome.EXISTS

    async def delete(self, key: str) -> bool:
        self._check_open()
        async with self._key_lock(key):
            if key not in self._present:
                return False
            return bool(await self._submit_key_op("delete", key))

    async def drop(self, key: str) -> bool:
        """Evict ``key`` without reading its frame back (tiers.base.DroppingTier)."""
        if not await self.delete(key):
            return False
        self.evictions += 1
        return True

    async def evict(self, key: str) -> Block | None:
        """Remove ``key`` atomically and hand its block back (``None`` if absent or corrupt)."""
        self._check_open()
        async with self._key_lock(key):
            if key not in self._present:
                return None
            with child_span("kvgate.lmdb.txn") as span:
                if span.is_recording():
                    span.set_attributes({ATTR_TIER: self.name, "kvgate.lmdb.op": "pop"})
                frame = await self._submit_key_op("pop", key)
        if frame is None:
            return None
        self.evictions += 1
        loop = asyncio.get_running_loop()
        try:
            with child_span("kvgate.zstd.decompress") as span:
                if span.is_recording():
                    span.set_attributes({ATTR_TIER: self.name, "kvgate.frame_bytes": len(frame)})
                return await loop.run_in_executor(self._pool, decode_frame, frame)
        except CorruptBlock:
            self.corrupt_blocks += 1
            return None

    async def close(self) -> None:
        """Finish queued writes, then close the environment and the threads this tier owns."""
        if self._closed:
            return
        self._closed = True
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer, self._close_env)
        self._writer.shutdown(wait=False)
        if self._own_executor:
            await asyncio.to_thread(self._pool.shutdown, True)

    # -- the side store for other layers --------------------------------------------------

    async def meta_get(self, name: bytes) -> bytes | None:
        """A small record another layer persisted with :meth:`meta_put`/:meth:`meta_incr`."""
        self._check_open()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._read_meta, bytes(name))

    async def meta_put(self, name: bytes, value: bytes) -> None:
        """Store a small record durably (flushed, meta page included, before returning)."""
        self._check_open()
        self._check_meta_name(name)
        await self._submit("meta_put", bytes(name), bytes(value))

    async def meta_incr(self, name: bytes) -> int:
        """Atomically add one to the counter ``name`` (absent: 0) and return the new value.

        Monotonic across restarts and power loss: the commit is flushed before this returns.
        """
        self._check_open()
        self._check_meta_name(name)
        return int(await self._submit("meta_incr", bytes(name)))

    # -- loop side helpers ----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise TierClosed("disk tier is closed")

    def _check_meta_name(self, name: bytes) -> None:
        if not 0 < len(name) <= self._max_key:
            raise TierError(f"meta name must be 1..{self._max_key} bytes")

    def _encode(self, block: Block) -> bytes:
        return encode_frame(block, level=self._level, byte_group=self._byte_group)

    def _lkey(self, key: str) -> bytes:
        raw = key.encode("utf-8")
        if len(raw) > self._max_key or raw.startswith(_LONG_PREFIX):
            return _LONG_PREFIX + digest(raw)
        return raw

    def _submit_key_op(self, kind: _OpKind, key: str, value: bytes = b"") -> asyncio.Future[Any]:
        lkey = self._lkey(key)
        return self._submit(kind, lkey, value, key=key, long_key=lkey != key.encode("utf-8"))

    @contextlib.asynccontextmanager
    async def _key_lock(self, key: str) -> AsyncIterator[None]:
        entry = self._locks.get(key)
        if entry is None:
            entry = self._locks[key] = (asyncio.Lock(), [0])
        entry[1][0] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1][0] -= 1
            if entry[1][0] == 0:
                del self._locks[key]

    async def _drop(self, key: str) -> None:
        with contextlib.suppress(TierError):
            await self.delete(key)

    def _submit(
        self,
        kind: _OpKind,
        lkey: bytes,
        value: bytes = b"",
        *,
        key: str = "",
        long_key: bool = False,
    ) -> asyncio.Future[Any]:
        """Queue a write for the writer thread; whatever is queued commits as one transaction.

        Index and ledger are settled by the flusher, not by the caller, so a caller cancelled
        while waiting cannot leave them out of step with what was committed.
        """
        loop = asyncio.get_running_loop()
        op = _Op(kind, lkey, value, key, long_key, loop.create_future())
        self._queue.append(op)
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush())
        return op.future

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            # Bounded in bytes too: pages a commit frees are not reusable for two commits,
            # and the reserve is sized for that.
            count, nbytes = 0, 0
            for op in self._queue[: self._max_batch_ops]:
                if count and nbytes + len(op.value) > self._max_batch_bytes:
                    break
                count += 1
                nbytes += len(op.value)
            batch = self._queue[:count]
            del self._queue[:count]
            try:
                results = await loop.run_in_executor(self._writer, self._write_batch, batch)
            except Exception as exc:
                err = exc if isinstance(exc, TierError) else TierIOError(str(exc))
                results = [err] * len(batch)
            for op, result in zip(batch, results, strict=True):
                self._settle(op, result)

    def _settle(self, op: _Op, result: object) -> None:
        """Bring the index and ledger in line with what the writer did, then answer."""
        if op.kind == "put":
            if result is True:
                self._present.add(op.key)
            else:
                self._ledger.release(op.key)
        elif op.kind in ("delete", "pop") and not isinstance(result, BaseException):
            self._present.discard(op.key)
            self._sizes.pop(op.key, None)
            self._expiry.pop(op.key, None)
            self._ledger.release(op.key)
        if op.future.done():
            return
        if isinstance(result, BaseException):
            op.future.set_exception(result)
        else:
            op.future.set_result(result)

    # -- threads: readers -----------------------------------------------------------------

    def _read_block(self, lkey: bytes) -> Block | None:
        self._check_env()
        try:
            with self._gate.shared(), self._env.begin(db=self._blocks, buffers=True) as txn:
                frame = txn.get(lkey)
                if frame is None:
                    return None
                # Decoded inside the txn, straight from the map: no copy of the frame.
                with child_span("kvgate.zstd.decompress") as span:
                    if span.is_recording():
                        span.set_attributes(
                            {ATTR_TIER: self.name, "kvgate.frame_bytes": len(frame)}
                        )
                    return decode_frame(frame)
        except lmdb.Error as exc:
            raise TierIOError(f"LMDB read failed: {exc}") from exc

    def _read_meta(self, name: bytes) -> bytes | None:
        self._check_env()
        try:
            with self._gate.shared(), self._env.begin(db=self._meta) as txn:
                value = txn.get(name)
                return None if value is None else bytes(value)
        except lmdb.Error as exc:
            raise TierIOError(f"LMDB read failed: {exc}") from exc

    def _check_env(self) -> None:
        if self._env_lost is not None:
            raise TierIOError(f"LMDB environment lost in a compaction: {self._env_lost}")

    # -- threads: the writer --------------------------------------------------------------

    def _write_batch(self, batch: list[_Op]) -> list[object]:
        """One transaction for the whole batch; on a full map, grow it or go op by op."""
        if self._env_lost is not None:
            self._recover()
        try:
            while True:
                try:
                    results = self._run_txn(batch)
                    break
                except lmdb.MapFullError:
                    if not self._grow_map(self._put_map_cap):
                        # Each op answers for itself from here: an error in one (a failed
                        # compaction) must not hide that others committed.
                        results = [self._write_one(op) for op in batch]
                        break
            if any(op.kind.startswith("meta") for op in batch):
                if self._env_lost is not None:
                    lost = TierIOError(f"LMDB environment lost before a flush: {self._env_lost}")
                    return [
                        lost if op.kind.startswith("meta") else r
                        for op, r in zip(batch, results, strict=True)
                    ]
                self._env.sync(True)
            return results
        except lmdb.Error as exc:
            raise TierIOError(f"LMDB write failed: {exc}") from exc

    def _recover(self) -> None:
        with self._gate.exclusive():
            try:
                self._open_env(self._put_map_cap)
            except lmdb.Error as exc:
                raise TierIOError(f"LMDB environment cannot be reopened: {exc}") from exc
        log.warning("disk tier at %s reopened after %s", self.path, self._env_lost)
        self._env_lost = None

    def _write_one(self, op: _Op) -> object:
        """One op in its own transaction, trying what can free room in the map first."""
        removal = op.kind in ("delete", "pop")
        remedies = (self._age_freed_pages, self._open_emergency_pages if removal else self._compact)
        try:
            for remedy in (None, *remedies):
                try:
                    if remedy is not None and not remedy(op):
                        continue
                    return self._run_txn([op])[0]
                except lmdb.MapFullError:
                    continue
                except lmdb.Error as exc:
                    return TierIOError(f"LMDB write failed: {exc}")
                except TierIOError as exc:
                    return exc
        finally:
            self._shrink_map_to(self._put_map_cap)
        if op.kind == "put":
            return _NO_ROOM
        return TierIOError("LMDB map is full")

    def _age_freed_pages(self, op: _Op) -> bool:
        # Pages freed by the last two commits are not reusable yet: two tiny commits age them
        # out (readers are short-lived, so none pins them).
        for _ in range(2):
            with contextlib.suppress(lmdb.MapFullError):
                self._tick()
        return True

    def _open_emergency_pages(self, op: _Op) -> bool:
        # Removing needs a few copy-on-write pages too and must never be refused (it is how
        # room is made), so it may use the emergency pages.
        return self._grow_map(self._map_cap)

    def _compact(self, op: _Op) -> bool:
        """Rewrite the file with every live page packed at its start; False if not worth it.

        A frame needs one contiguous run of overflow pages, and LMDB never moves pages. Once
        the file has reached its map, every commit's copy-on-write takes single pages from the
        lowest free ones, which can leave each free run a few pages short of a large frame
        while the ledger (rightly) counts enough free bytes. An evicted neighbour may mend
        that, so this is the last remedy, and only for a small live set: puts wait while it
        is copied (readers do not).
        """
        live = self._live_pages()
        need = math.ceil((_PAGE_HEADER + len(op.value)) / self._psize) + 2 * _EMERGENCY_PAGES
        if live * self._psize > self._compact_max_bytes:
            return False
        if live + need > self._put_map_cap // self._psize:
            return False
        tmp = self.path / _COMPACT_DIR
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            # Readers go on meanwhile: the copy is a read snapshot, and only this thread writes.
            try:
                self._env.copy(str(tmp), compact=True)
                _fsync(tmp / "data.mdb")
            except (lmdb.Error, OSError) as exc:
                # The live file is untouched: the put is refused and the hierarchy evicts.
                log.warning("disk tier at %s could not compact (a copy failed): %s", self.path, exc)
                return False
            with self._gate.exclusive():
                map_size = int(self._env.info()["map_size"])
                self._env.close()
                swapped: OSError | None = None
                try:
                    os.replace(tmp / "data.mdb", self.path / "data.mdb")
                    _fsync(self.path)
                except OSError as exc:
                    swapped = exc
                try:
                    self._open_env(map_size)  # the packed file, or the old one if not swapped
                except lmdb.Error as exc:
                    self._env_lost = exc
                    raise TierIOError(f"LMDB environment lost in a compaction: {exc}") from exc
            if swapped is not None:
                log.warning("disk tier at %s could not compact: %s", self.path, swapped)
                return False
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.compactions += 1
        log.info(
            "disk tier at %s compacted: %d live pages packed to make room for a %d-byte frame",
            self.path,
            live,
            len(op.value),
        )
        return True

    def _live_pages(self) -> int:
        with self._env.begin() as txn:
            stats = [
                txn.stat(db) for db in (self._blocks, self._longkeys, self._meta, self._internal)
            ]
            stats.append(txn.stat())
        # Two meta pages head every file.
        return 2 + sum(s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"] for s in stats)

    def _run_txn(self, batch: list[_Op]) -> list[object]:
        results: list[object] = []
        with self._env.begin(write=True) as txn:
            for op in batch:
                results.append(self._apply(txn, op))
        return results

    def _apply(self, txn: lmdb.Transaction, op: _Op) -> object:
        if op.kind == "put":
            stored = txn.put(op.lkey, op.value, db=self._blocks, overwrite=False)
            if stored and op.long_key:
                txn.put(op.lkey, op.key.encode("utf-8"), db=self._longkeys)
            return bool(stored)
        if op.kind == "delete":
            if op.long_key:
                txn.delete(op.lkey, db=self._longkeys)
            return bool(txn.delete(op.lkey, db=self._blocks))
        if op.kind == "pop":
            if op.long_key:
                txn.delete(op.lkey, db=self._longkeys)
            return txn.pop(op.lkey, db=self._blocks)
        if op.kind == "meta_put":
            txn.put(op.lkey, op.value, db=self._meta)
            return None
        # meta_incr
        old = txn.get(op.lkey, db=self._meta)
        value = (int.from_bytes(old, "little") if old else 0) + 1
        txn.put(op.lkey, value.to_bytes(8, "little"), db=self._meta)
        return value

    def _tick(self) -> None:
        with self._env.begin(write=True) as txn:
            old = txn.get(_TICK, db=self._internal)
            n = (int.from_bytes(old, "little") if old else 0) + 1
            txn.put(_TICK, n.to_bytes(8, "little"), db=self._internal)

    def _grow_map(self, cap: int) -> bool:
        current = int(self._env.info()["map_size"])
        if current >= cap:
            return False
        with self._gate.exclusive():
            self._env.set_mapsize(min(cap, current * 2))
        return True

    def _shrink_map_to(self, cap: int) -> None:
        """Give back the emergency pages after a removal used them (never below used pages)."""
        if self._env_lost is not None:
            return
        info = self._env.info()
        if int(info["map_size"]) <= cap:
            return
        in_use = (int(info["last_pgno"]) + 1) * self._psize
        with self._gate.exclusive():
            self._env.set_mapsize(max(cap, in_use))

    def _close_env(self) -> None:
        with self._gate.exclusive():
            self._env.close()

    def _open_env(self, map_size: int) -> None:
        self._env = lmdb.open(
            str(self.path),
            map_size=map_size,
            subdir=True,
            max_dbs=4,
            sync=self._sync,
            metasync=False,
            max_spare_txns=self._spare_txns,
        )
        self._blocks = self._env.open_db(_DB_BLOCKS)
        self._longkeys = self._env.open_db(_DB_LONGKEYS)
        self._meta = self._env.open_db(_DB_META)
        self._internal = self._env.open_db(_DB_INTERNAL)

    # -- opening --------------------------------------------------------------------------

    def _key_of(self, lkey: bytes, names: dict[bytes, bytes]) -> str | None:
        raw = names.get(lkey) if lkey.startswith(_LONG_PREFIX) else lkey
        if raw is None:
            return None
        try:
            key = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
        return key if self._lkey(key) == lkey else None

    def _rebuild_index(self) -> None:
        """Charge every stored block from its value length alone (no page of it is read)."""
        info = self._env.info()
        in_use = (int(info["last_pgno"]) + 1) * self._psize
        if in_use > self._map_cap:
            # The file outgrew a budget that has since shrunk. LMDB cannot shrink a file in
            # place (``mdb_copy -c`` compacts offline): keep it, with room to delete the excess
            # below; the pages freed are reused, so it grows no further.
            self._put_map_cap = in_use + 64 * self._psize
            self._map_cap = self._put_map_cap + _EMERGENCY_PAGES * self._psize
            self._env.set_mapsize(self._put_map_cap)
        drop: list[bytes] = []
        with self._env.begin(buffers=True) as txn:
            names = {bytes(k): bytes(v) for k, v in txn.cursor(db=self._longkeys)}
            for k, v in txn.cursor(db=self._blocks):
                lkey = bytes(k)
                key = self._key_of(lkey, names)
                if (
                    key is None
                    or key in self._present
                    or not self._ledger.charge(key, self.charge_for(key, len(v)))
                ):
                    drop.append(lkey)  # not ours, or over a budget that shrank since
                    continue
                self._present.add(key)
                try:
                    head = read_header(v)
                except CorruptBlock:
                    continue  # counted as present: its first read finds the damage and drops it
                self._sizes[key] = head.raw_len
                if head.expires_at is not None:
                    self._expiry[key] = head.expires_at
        if drop:
            # A removal, so it may use the emergency pages (there are no readers yet).
            self._env.set_mapsize(max(int(self._env.info()["map_size"]), self._map_cap))
            with self._env.begin(write=True) as txn:
                for lkey in drop:
                    txn.delete(lkey, db=self._blocks)
                    txn.delete(lkey, db=self._longkeys)
            self._shrink_map_to(self._put_map_cap)
            self.dropped_on_open = len(drop)


def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries, to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
