"""Client side of the same-host data plane (see :mod:`gateway.shm`): map the segments the
gateway advertises, copy blocks out of (and into) them, and say when it cannot."""

from __future__ import annotations

import contextlib
import ipaddress
import mmap
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from gateway.fdpass import HandoffError, receive_fd
from tiers.shmseg import SegmentInfo, local_cuda, map_fd, open_segment

Dest = Any
"""Where ``read_into`` copies: a writable ``memoryview`` of bytes, or a flat ``uint8`` tensor."""


class ShmUnavailable(Exception):
    """The shared-memory path cannot be used from here; use HTTP bodies instead."""


def is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(slots=True)
class _Mapped:
    info: SegmentInfo
    mapping: mmap.mmap | None  # None for CUDA IPC segments (see _cuda)
    cuda: Any = None


class ShmSession:
    """The segments of one attach: ``read`` copies a descriptor's bytes out, ``write`` copies a
    block into a reserved staging region."""

    def __init__(self, session_id: str, segments: Sequence[SegmentInfo]) -> None:
        self.id = session_id
        self._segments: dict[str, _Mapped] = {}
        try:
            for info in segments:
                self._segments[info.name] = _map(info)
        except Exception:
            self.close()
            raise

    @classmethod
    def from_attach(cls, payload: dict[str, Any]) -> ShmSession:
        try:
            infos = [SegmentInfo.from_json(raw) for raw in payload["segments"]]
            session_id = str(payload["session"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ShmUnavailable(f"unreadable attach answer: {exc}") from None
        try:
            return cls(session_id, infos)
        except (OSError, ValueError, RuntimeError, HandoffError) as exc:
            raise ShmUnavailable(f"cannot map the gateway's segments: {exc}") from None

    @staticmethod
    def blocks_to_attach(payload: dict[str, Any]) -> bool:
        """Whether :meth:`from_attach` would wait on the gateway (a descriptor handoff): then
        call it off the event loop, which may be the one serving the gateway."""
        segments = payload.get("segments")
        return isinstance(segments, list) and any(
            isinstance(raw, dict) and raw.get("kind") == "fd" for raw in segments
        )

    def read(self, segment: str, runs: Sequence[Sequence[int]]) -> bytes:
        mapped = self._segments.get(segment)
        if mapped is None:
            raise ShmUnavailable(f"unknown segment {segment!r}")
        if mapped.mapping is None:
            return _cuda_read(mapped.cuda, runs)
        mm = mapped.mapping
        if len(runs) == 1:
            offset, length = runs[0]
            return mm[offset : offset + length]  # one memcpy, straight into a new bytes
        view = memoryview(mm)
        try:
            return b"".join(view[offset : offset + length] for offset, length in runs)
        finally:
            view.release()

    def read_into(self, segment: str, runs: Sequence[Sequence[int]], dest: Dest) -> int:
        """Copy a descriptor's bytes to the start of ``dest`` (a writable byte view, or a flat
        ``uint8`` torch tensor on any device); the number of bytes copied. No allocation: one
        copy per run (device to device when both ends are on the GPU)."""
        mapped = self._segments.get(segment)
        if mapped is None:
            raise ShmUnavailable(f"unknown segment {segment!r}")
        size = sum(length for _, length in runs)
        if size > dest_len(dest):
            raise ValueError(f"a block of {size} bytes does not fit a buffer of {dest_len(dest)}")
        if mapped.mapping is not None and isinstance(dest, memoryview):
            view = memoryview(mapped.mapping)
            try:
                pos = 0
                for offset, length in runs:
                    dest[pos : pos + length] = view[offset : offset + length]
                    pos += length
            finally:
                view.release()
            return size
        source = mapped.cuda if mapped.mapping is None else host_tensor(mapped.mapping)
        _tensor_copy(source, runs, dest if not isinstance(dest, memoryview) else host_tensor(dest))
        return size

    def write(self, segment: str, runs: Sequence[Sequence[int]], data: bytes | memoryview) -> None:
        mapped = self._segments.get(segment)
        if mapped is None or mapped.mapping is None or not mapped.info.writable:
            raise ShmUnavailable(f"segment {segment!r} is not writable here")
        src = memoryview(data).cast("B")
        pos = 0
        mm = mapped.mapping
        for offset, length in runs:
            mm[offset : offset + length] = src[pos : pos + length]
            pos += length
        if pos != len(src):
            raise ValueError("the reserved runs do not match the block's size")

    def close(self) -> None:
        for mapped in self._segments.values():
            if mapped.mapping is not None:
                with contextlib.suppress(BufferError):
                    mapped.mapping.close()
        self._segments.clear()


def _map(info: SegmentInfo) -> _Mapped:
    if info.kind == "cuda_ipc":
        return _Mapped(info, None, _cuda_open(info))
    if info.kind == "fd":
        if info.ticket is None:
            raise ShmUnavailable(f"segment {info.name} came without a ticket")
        fd = receive_fd(info.path, info.ticket)
        try:
            return _Mapped(info, map_fd(fd, info))
        finally:
            os.close(fd)  # the mapping keeps the memory
    if info.kind != "file":
        raise ShmUnavailable(f"unknown segment kind {info.kind!r}")
    return _Mapped(info, open_segment(info))


def _cuda_open(info: SegmentInfo) -> Any:  # pragma: no cover - needs a GPU
    """Open an HBM arena from its CUDA IPC handle (same host, same or peer GPU)."""
    import torch

    if not torch.cuda.is_available() or info.ipc is None:
        raise ShmUnavailable("a CUDA IPC segment needs CUDA here")
    local = local_cuda(info.ipc)
    if local is not None:
        return local
    torch.cuda.init()  # type: ignore[no-untyped-call]  # opening a handle first would crash
    storage = torch.UntypedStorage._new_shared_cuda(*info.ipc)
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def _cuda_read(arena: Any, runs: Sequence[Sequence[int]]) -> bytes:  # pragma: no cover - GPU
    import torch

    parts = [arena[offset : offset + length] for offset, length in runs]
    joined = parts[0] if len(parts) == 1 else torch.cat(parts)
    data: bytes = joined.cpu().numpy().tobytes()
    return data


def dest_len(dest: Dest) -> int:
    return len(dest) if isinstance(dest, memoryview) else int(dest.numel())


def host_tensor(buffer: Any) -> Any:
    import torch

    with warnings.catch_warnings():
        # A read-only mapping is only read from; torch warns because it cannot mark it so.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(buffer, dtype=torch.uint8)


def _tensor_copy(source: Any, runs: Sequence[Sequence[int]], dest: Any) -> None:
    import torch

    pos = 0
    for offset, length in runs:
        dest[pos : pos + length].copy_(source[offset : offset + length])
        pos += length
    for tensor in (source, dest):
        if tensor.device.type == "cuda":
            # The lease is released once this returns: the copy must be over by then, and a
            # device-to-device copy is only queued on the stream until now.
            torch.cuda.current_stream(tensor.device).synchronize()
