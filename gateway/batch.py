"""The ``application/x-kvgate-batch`` framing: many blocks in one body, binary, no base64.

Layout (all integers big-endian)::

    frame  := header item*
    header := magic "KVGB" | version u8 (=1) | flags u8 (=0) | reserved u16 (=0) | count u32
    item   := status u16 | tier_len u8 | key_len u16 | data_len u64 | tier | key | data

``status`` is the item's HTTP-like status (200 hit / 404 miss in a ``/v1/batch/get`` answer;
0 in a ``/v1/batch/put`` request), ``tier`` the ASCII tier name (empty when none), ``key`` the
ASCII block key. Server and client both use this module; decoding hands back memoryview slices
of the buffer, so nothing is copied.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

MEDIA_TYPE = "application/x-kvgate-batch"
MAGIC = b"KVGB"
VERSION = 1

_HEADER = struct.Struct("!4sBBHI")
_ITEM = struct.Struct("!HBHQ")
HEADER_SIZE = _HEADER.size
ITEM_HEADER_SIZE = _ITEM.size
_MAX_KEY = 0xFFFF
_MAX_TIER = 0xFF


class BatchFormatError(ValueError):
    """The bytes are not a well-formed batch frame."""


@dataclass(frozen=True, slots=True)
class BatchItem:
    key: str
    data: bytes | memoryview = b""
    status: int = 0
    tier: str = ""


def encode_parts(items: Sequence[BatchItem]) -> list[bytes | memoryview]:
    """The frame as a list of buffers (block bytes are not copied); join or write them in order."""
    parts: list[bytes | memoryview] = [_HEADER.pack(MAGIC, VERSION, 0, 0, len(items))]
    for item in items:
        key = item.key.encode("ascii")
        tier = item.tier.encode("ascii")
        if len(key) > _MAX_KEY or len(tier) > _MAX_TIER:
            raise BatchFormatError(f"key or tier name too long in item {item.key[:40]!r}")
        if not 0 <= item.status <= 0xFFFF:
            raise BatchFormatError(f"status {item.status} does not fit the frame")
        parts.append(_ITEM.pack(item.status, len(tier), len(key), len(item.data)) + tier + key)
        if len(item.data):
            parts.append(item.data)
    return parts


def encode(items: Sequence[BatchItem]) -> bytes:
    return b"".join(encode_parts(items))


def frame_length(parts: Iterable[bytes | memoryview]) -> int:
    return sum(len(p) for p in parts)


def decode(
    buf: bytes | bytearray | memoryview,
    *,
    max_items: int | None = None,
    max_item_bytes: int | None = None,
) -> list[BatchItem]:
    """Parse a whole frame; raises :class:`BatchFormatError` on anything malformed."""
    view = memoryview(buf).cast("B")
    if len(view) < HEADER_SIZE:
        raise BatchFormatError("frame shorter than its header")
    magic, version, flags, reserved, count = _HEADER.unpack_from(view, 0)
    if magic != MAGIC:
        raise BatchFormatError("bad magic: not an application/x-kvgate-batch frame")
    if version != VERSION or flags != 0 or reserved != 0:
        raise BatchFormatError(f"unsupported frame version {version} / flags {flags}")
    if max_items is not None and count > max_items:
        raise BatchFormatError(f"{count} items in one batch; at most {max_items}")
    # Every item costs at least its header, so a lying count cannot make us allocate much.
    if count * ITEM_HEADER_SIZE > len(view) - HEADER_SIZE:
        raise BatchFormatError(f"frame too short for {count} items")
    items: list[BatchItem] = []
    pos = HEADER_SIZE
    for index in range(count):
        if pos + ITEM_HEADER_SIZE > len(view):
            raise BatchFormatError(f"item {index}: truncated header")
        status, tier_len, key_len, data_len = _ITEM.unpack_from(view, pos)
        pos += ITEM_HEADER_SIZE
        if max_item_bytes is not None and data_len > max_item_bytes:
            raise BatchFormatError(
                f"item {index}: {data_len} bytes; at most {max_item_bytes} per block"
            )
        end = pos + tier_len + key_len + data_len
        if end > len(view):
            raise BatchFormatError(f"item {index}: truncated body")
        try:
            tier = bytes(view[pos : pos + tier_len]).decode("ascii")
            key = bytes(view[pos + tier_len : pos + tier_len + key_len]).decode("ascii")
        except UnicodeDecodeError:
            raise BatchFormatError(f"item {index}: key or tier is not ASCII") from None
        data_start = pos + tier_len + key_len
        items.append(BatchItem(key=key, data=view[data_start:end], status=status, tier=tier))
        pos = end
    if pos != len(view):
        raise BatchFormatError(f"{len(view) - pos} trailing bytes after {count} items")
    return items
