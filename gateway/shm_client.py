"""Client side of the same-host data plane (see :mod:`gateway.shm`): map the segments the
gateway advertises, copy blocks out of (and into) them, and say when it cannot."""

from __future__ import annotations

import contextlib
import ipaddress
import mmap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from tiers.shmseg import SegmentInfo, open_segment


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
        except (OSError, ValueError, RuntimeError) as exc:
            raise ShmUnavailable(f"cannot map the gateway's segments: {exc}") from None

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

    def read_into(self, segment: str, runs: Sequence[Sequence[int]], dest: memoryview) -> int:
        """Copy a descriptor's bytes to the start of ``dest`` (a writable byte view); the
        number of bytes copied. No allocation: one memcpy per run."""
        mapped = self._segments.get(segment)
        if mapped is None:
            raise ShmUnavailable(f"unknown segment {segment!r}")
        size = sum(length for _, length in runs)
        if size > len(dest):
            raise ValueError(f"a block of {size} bytes does not fit a buffer of {len(dest)}")
        if mapped.mapping is None:
            dest[:size] = _cuda_read(mapped.cuda, runs)
            return size
        view = memoryview(mapped.mapping)
        try:
            pos = 0
            for offset, length in runs:
                dest[pos : pos + length] = view[offset : offset + length]
                pos += length
        finally:
            view.release()
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
    if info.kind != "file":
        raise ShmUnavailable(f"unknown segment kind {info.kind!r}")
    return _Mapped(info, open_segment(info))


def _cuda_open(info: SegmentInfo) -> Any:  # pragma: no cover - needs a GPU
    """Open an HBM arena from its CUDA IPC handle (same host, same or peer GPU)."""
    import torch

    if not torch.cuda.is_available() or info.ipc is None:
        raise ShmUnavailable("a CUDA IPC segment needs CUDA here")
    storage = torch.UntypedStorage._new_shared_cuda(*info.ipc)
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def _cuda_read(arena: Any, runs: Sequence[Sequence[int]]) -> bytes:  # pragma: no cover - GPU
    import torch

    parts = [arena[offset : offset + length] for offset, length in runs]
    joined = parts[0] if len(parts) == 1 else torch.cat(parts)
    data: bytes = joined.cpu().numpy().tobytes()
    return data
