"""Shared-memory segments: files in a tmpfs (``/dev/shm``) that the gateway owns and same-host
clients map, so block bytes cross between processes with one memcpy and no socket.

A segment is created ``0600`` under the gateway's uid with ``O_EXCL | O_NOFOLLOW`` (no one can
plant a file or a symlink under the name first), its pages are reserved up front with
``posix_fallocate`` (a full tmpfs fails here, at start-up, instead of raising SIGBUS on a later
write), and it is unlinked when closed. Names carry the pid and a random token, so concurrent
gateways never collide and :func:`sweep_stale` can remove what a crashed gateway left behind.

A *private* segment (:meth:`ShmSegment.create_private`) has no name at all: it is a sealed
``memfd`` that reaches its one client as a file descriptor over a Unix socket
(gateway.fdpass), so no other process -- of the gateway's uid or any other -- can open it by
path, and its size is sealed, so the client cannot truncate it under the gateway (which would
raise SIGBUS in the gateway on its next access).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import logging
import mmap
import os
import re
import secrets
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_SHM_DIR = Path("/dev/shm")
PREFIX = "kvgate"
_NAME_RE = re.compile(rf"^{PREFIX}-(\d+)-[0-9a-f]{{16}}-[a-z0-9_]{{1,32}}$")


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    """What a client needs to map a segment: its file, its size, whether it may write."""

    name: str
    path: str
    size: int
    writable: bool = False
    kind: str = "file"
    """``file`` (a tmpfs file to mmap), ``fd`` (a private segment: redeem ``ticket`` at the Unix
    socket ``path`` for its descriptor) or ``cuda_ipc`` (an HBM arena: ``ipc`` is its handle)."""
    ipc: tuple[object, ...] | None = None
    ticket: str | None = None

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "name": self.name,
            "path": self.path,
            "size": self.size,
            "writable": self.writable,
            "kind": self.kind,
        }
        if self.ipc is not None:
            out["ipc"] = [_encode_ipc(v) for v in self.ipc]
        if self.ticket is not None:
            out["ticket"] = self.ticket
        return out

    @classmethod
    def from_json(cls, raw: dict[str, object]) -> SegmentInfo:
        ipc_raw = raw.get("ipc")
        ipc = tuple(_decode_ipc(v) for v in ipc_raw) if isinstance(ipc_raw, list) else None
        size = raw["size"]
        if not isinstance(size, int):
            raise ValueError("segment size must be an integer")
        return cls(
            name=str(raw["name"]),
            path=str(raw["path"]),
            size=size,
            writable=bool(raw.get("writable", False)),
            kind=str(raw.get("kind", "file")),
            ipc=ipc,
            ticket=str(raw["ticket"]) if "ticket" in raw else None,
        )


def _encode_ipc(value: object) -> object:
    # CUDA IPC handles are tuples of ints, bools and raw bytes; JSON carries bytes as base64.
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode("ascii")}
    return value


def _decode_ipc(value: object) -> object:
    if isinstance(value, dict) and isinstance(value.get("b64"), str):
        return base64.b64decode(value["b64"])
    return value


# CUDA IPC handles of this process's own arenas: CUDA refuses to open a handle in the process
# that exported it, so a same-process client looks here first. Keyed by the allocation's handle
# and the arena's offset in it: torch's caching allocator can carve two arenas out of one
# allocation, and then their memory handles are the same.
_LOCAL_CUDA: weakref.WeakValueDictionary[tuple[bytes, int], Any] = weakref.WeakValueDictionary()


def _local_key(ipc: tuple[object, ...]) -> tuple[bytes, int] | None:
    # torch's _share_cuda_(): (device, memory handle, size, offset in bytes, ref-counter, ...)
    if len(ipc) > 3 and isinstance(ipc[1], bytes) and isinstance(ipc[3], int):
        return ipc[1], ipc[3]
    return None


def register_local_cuda(ipc: tuple[object, ...], arena: Any) -> None:
    """Note that ``arena`` (a CUDA tensor of this process) is exported under ``ipc``."""
    key = _local_key(ipc)
    if key is not None:
        _LOCAL_CUDA[key] = arena


def local_cuda(ipc: tuple[object, ...]) -> Any | None:
    """The arena behind ``ipc`` when this process exported it, else ``None``."""
    key = _local_key(ipc)
    return None if key is None else _LOCAL_CUDA.get(key)


_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def _new_name(label: str, size: int) -> str:
    if size <= 0:
        raise ValueError("a segment needs a positive size")
    name = f"{PREFIX}-{os.getpid()}-{secrets.token_hex(8)}-{label}"
    if _NAME_RE.match(name) is None:
        raise ValueError(f"bad segment label {label!r}: use [a-z0-9_]{{1,32}}")
    return name


class ShmSegment:
    """One ``MAP_SHARED`` mapping of a tmpfs file (or, private, a memfd) the gateway created;
    :attr:`buffer` is its writable memoryview."""

    def __init__(
        self, name: str, path: Path | None, size: int, mapping: mmap.mmap, *, fd: int = -1
    ) -> None:
        self.name = name
        self.path = path
        self.size = size
        self._mmap: mmap.mmap | None = mapping
        self._fd = fd

    @classmethod
    def create_private(cls, label: str, size: int) -> ShmSegment:
        """A nameless segment (a sealed memfd) to hand to one client by descriptor; raises
        ``OSError`` when memory or memfd support is missing."""
        name = _new_name(label, size)
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            os.posix_fallocate(fd, 0, size)  # memory short: fail now, not SIGBUS later
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            raise
        return cls(name, None, size, mapping, fd=fd)

    @property
    def fd(self) -> int:
        """The descriptor of a private segment (what a client is handed); -1 once closed."""
        if self.path is not None:
            raise ValueError(f"segment {self.name} is a file: clients open it by path")
        return self._fd

    @classmethod
    def create(cls, label: str, size: int, *, directory: Path = DEFAULT_SHM_DIR) -> ShmSegment:
        """Create and map a new segment; raises ``OSError`` when the tmpfs cannot hold it."""
        name = _new_name(label, size)
        path = directory / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask said
            os.posix_fallocate(fd, 0, size)
            mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        os.close(fd)  # the mapping keeps the file alive
        return cls(name, path, size, mapping)

    @property
    def buffer(self) -> mmap.mmap:
        if self._mmap is None:
            raise ValueError(f"segment {self.name} is closed")
        return self._mmap

    def info(self, *, writable: bool = False) -> SegmentInfo:
        if self.path is None:
            raise ValueError(f"segment {self.name} is private: describe it with its ticket")
        return SegmentInfo(self.name, str(self.path), self.size, writable)

    def close(self) -> None:
        """Unlink the file; unmap unless views into it are still alive (then the GC does)."""
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)  # a client that was handed it keeps its own copy
        mapping, self._mmap = self._mmap, None
        if mapping is not None:
            # A tensor or memoryview may still export the buffer; the mapping then goes with it.
            with contextlib.suppress(BufferError):
                mapping.close()


def open_segment(info: SegmentInfo) -> mmap.mmap:
    """Client side: map a segment the gateway advertised (read-only unless writable)."""
    flags = os.O_RDWR if info.writable else os.O_RDONLY
    fd = os.open(info.path, flags | os.O_NOFOLLOW)
    try:
        return map_fd(fd, info)
    finally:
        os.close(fd)


def map_fd(fd: int, info: SegmentInfo) -> mmap.mmap:
    """Map the segment ``info`` from an open descriptor (the caller still owns ``fd``)."""
    if os.fstat(fd).st_size < info.size:
        raise OSError(f"segment {info.name} is smaller than advertised")
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if info.writable else 0)
    return mmap.mmap(fd, info.size, flags=mmap.MAP_SHARED, prot=prot)


def sweep_stale(directory: Path = DEFAULT_SHM_DIR) -> int:
    """Remove segments whose creating gateway is gone (a crash skips :meth:`ShmSegment.close`)."""
    removed = 0
    uid = os.getuid()
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for entry in entries:
        match = _NAME_RE.match(entry.name)
        if match is None:
            continue
        pid = int(match.group(1))
        try:
            if entry.stat(follow_symlinks=False).st_uid != uid or _alive(pid):
                continue
            os.unlink(entry.path)
            removed += 1
        except OSError:
            continue
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
