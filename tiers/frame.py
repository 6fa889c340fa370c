"""The on-disk frame of one block: a small checked header, then the (compressed) payload.

Layout, little-endian::

    magic "KVGF" | version u8 | codec u8 | width u8 | flags u8 | raw_len u64 | payload_len u64
    | xxh3-128 of the raw bytes (16) | [dtype: u8 len + utf-8] | [shape: u8 ndim + ndim * u64]
    | [expires_at: f64] | xxh3-64 of every header byte before it (8) | payload

The header carries its own check so that a flipped bit in ``dtype``/``shape``/``expires_at`` is
caught as surely as one in the payload (which the xxh3-128 of the raw bytes covers). Anything
that does not parse, check and decompress to exactly the recorded bytes is
:class:`~tiers.errors.CorruptBlock`; no other exception leaves :func:`decode_frame`.

Byte-grouping (codec ``zstd+bytegroup``): for an element width ``w`` (2 for bf16/fp16) byte ``i``
of every element goes to plane ``i``, and the payload is, per plane, ``codec u8 | length u64 |
bytes`` where the plane is its own zstd frame, or raw when zstd cannot shrink it. The high plane
of bf16 holds the sign and 7 exponent bits and compresses well; the low plane is mantissa noise,
stored raw and read in place. Interleaved, zstd sees neither pattern. On real KV projections
grouping lifts bf16 from ~1.28x to ~1.48x at level 1 and decodes faster (docs/benchmarks.md).
"""

from __future__ import annotations

import math
import struct
import threading
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
import xxhash
import zstandard as zstd

from tiers.block import Block, BlockMeta, digest
from tiers.errors import CorruptBlock, TierError

MAGIC: Final = b"KVGF"
FORMAT_VERSION: Final = 1

CODEC_RAW: Final = 0
CODEC_ZSTD: Final = 1
CODEC_ZSTD_GROUPED: Final = 2
CODEC_NAMES: Final = {CODEC_RAW: "raw", CODEC_ZSTD: "zstd", CODEC_ZSTD_GROUPED: "zstd+bytegroup"}

# Level 1 measured best on bf16 KV (ratio *and* speed): see docs/benchmarks.md.
DEFAULT_LEVEL: Final = 1

_FLAG_DTYPE: Final = 0x01
_FLAG_SHAPE: Final = 0x02
_FLAG_EXPIRES: Final = 0x04
_KNOWN_FLAGS: Final = _FLAG_DTYPE | _FLAG_SHAPE | _FLAG_EXPIRES

_FIXED = struct.Struct("<4sBBBBQQ16s")
_U8 = struct.Struct("<B")
_U64 = struct.Struct("<Q")
_F64 = struct.Struct("<d")
_HCHECK = struct.Struct("<Q")
_PLANE = struct.Struct("<BQ")  # per plane of a grouped payload: codec, stored length
_PLANE_RAW: Final = 0
_PLANE_ZSTD: Final = 1
_MAX_DIMS: Final = 32
_GROUP_WIDTHS: Final = frozenset({2, 4, 8})

# Widths whose grouping wins by default ("auto"); 2-byte types measured (docs/benchmarks.md).
AUTO_GROUP_WIDTHS: Final = frozenset({2, 4})
# Without a dtype hint, "auto" compresses a sample both ways and keeps the smaller.
_PROBE_BYTES: Final = 64 * 1024
# Early abort, as ZFS and btrfs do: when zstd shrinks a block's first 64 KiB by less than 3%,
# the block is stored raw without compressing the rest. On incompressible data (random bytes,
# already-quantized KV) that turns ~0.6 ms of CPU per MiB into ~0.15 ms. When a dtype hint
# already chose the width, the probe is 16 KiB: a compressible block pays ~2% more encode time.
_SKIP_RATIO: Final = 0.97
_HINTED_PROBE_BYTES: Final = 16 * 1024
_PLANE_PROBE: Final = 16 * 1024
# Exponent planes are runs of a few byte values: short matches cost more than the Huffman-coded
# literals they replace. A smaller hash table and 7-byte minimum matches compress them ~1.05x
# smaller, ~1.3x faster, and decode ~1.2x faster than plain level 1 (docs/benchmarks.md).
_PLANE_TUNING: Final = {"hash_log": 10, "min_match": 7}
_PLANE_TUNING_MAX_LEVEL: Final = 3

_DTYPE_WIDTHS: Final = {
    "bfloat16": 2,
    "bf16": 2,
    "float16": 2,
    "fp16": 2,
    "half": 2,
    "int16": 2,
    "uint16": 2,
    "float32": 4,
    "fp32": 4,
    "float": 4,
    "int32": 4,
    "uint32": 4,
    "float64": 8,
    "fp64": 8,
    "double": 8,
    "int64": 8,
    "uint64": 8,
    "int8": 1,
    "uint8": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}

ByteGroup = bool | Literal["auto"]


def dtype_width(dtype: str | None) -> int | None:
    """Element width in bytes of a dtype name (``bfloat16``, ``torch.float16``...), if known."""
    if dtype is None:
        return None
    name = dtype.strip().lower().removeprefix("torch.").removeprefix("numpy.")
    return _DTYPE_WIDTHS.get(name)


class _Codecs(threading.local):
    """zstd contexts are not thread-safe; each thread keeps its own and reuses them."""

    def __init__(self) -> None:
        self.compressors: dict[int, zstd.ZstdCompressor] = {}
        self.plane_compressors: dict[int, zstd.ZstdCompressor] = {}
        self.decompressor = zstd.ZstdDecompressor()

    def compressor(self, level: int) -> zstd.ZstdCompressor:
        c = self.compressors.get(level)
        if c is None:
            # threads=0: no zstd worker threads; the tier runs many frames in parallel instead.
            c = zstd.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)
            self.compressors[level] = c
        return c

    def plane_compressor(self, level: int) -> zstd.ZstdCompressor:
        c = self.plane_compressors.get(level)
        if c is None:
            tuning = _PLANE_TUNING if 1 <= level <= _PLANE_TUNING_MAX_LEVEL else {}
            params = zstd.ZstdCompressionParameters.from_level(
                level, write_content_size=1, write_checksum=0, threads=0, **tuning
            )
            c = zstd.ZstdCompressor(compression_params=params)
            self.plane_compressors[level] = c
        return c


_codecs = _Codecs()


def group_bytes(data: bytes | memoryview, width: int) -> bytes:
    """Byte ``i`` of every ``width``-byte element into plane ``i``; ``len(data) % width == 0``."""
    return np.frombuffer(data, dtype=np.uint8).reshape(-1, width).T.tobytes()


def ungroup_bytes(planes: bytes | memoryview, width: int) -> memoryview:
    """Inverse of :func:`group_bytes`, as a read-only view of a fresh buffer."""
    n = len(planes) // width
    view = memoryview(planes)
    return _interleave([view[i * n : (i + 1) * n] for i in range(width)])


def _interleave(planes: list[memoryview] | list[bytes | memoryview]) -> memoryview:
    width = len(planes)
    n = len(planes[0])
    out = bytearray(n * width)
    src = [np.frombuffer(p, dtype=np.uint8) for p in planes]
    if width == 2:
        # Shift/or into little-endian u16 lanes: ~4x faster than a strided byte scatter.
        lanes = np.frombuffer(out, dtype="<u2")
        np.left_shift(src[1], 8, out=lanes, dtype="<u2")
        np.bitwise_or(lanes, src[0], out=lanes)
    else:
        cols = np.frombuffer(out, dtype=np.uint8).reshape(-1, width)
        for i, plane in enumerate(src):
            cols[:, i] = plane  # one column at a time: a full transposed copy is ~4x slower
    return memoryview(out).toreadonly()


def _grouped_payload(data: bytes | memoryview, width: int, level: int) -> bytes:
    """Each plane its own zstd frame, or raw when zstd cannot shrink it (mantissa noise).

    Separate frames keep zstd's Huffman tables per plane whatever the block size, and let the
    reader skip zstd entirely for the noisy planes.
    """
    planes = np.frombuffer(data, dtype=np.uint8).reshape(-1, width).T.copy()
    c = _codecs.plane_compressor(level)
    parts: list[bytes] = []
    for plane in planes:
        raw = memoryview(plane.data)
        if len(raw) >= 4 * _PLANE_PROBE and len(c.compress(raw[:_PLANE_PROBE])) >= _PLANE_PROBE:
            # Mantissa planes are noise: a sample that does not shrink spares compressing it all.
            parts += [_PLANE.pack(_PLANE_RAW, len(raw)), bytes(raw)]
            continue
        packed = c.compress(raw)
        if len(packed) < len(raw):
            parts += [_PLANE.pack(_PLANE_ZSTD, len(packed)), packed]
        else:
            parts += [_PLANE.pack(_PLANE_RAW, len(raw)), bytes(raw)]
    return b"".join(parts)


def _decode_grouped(payload: memoryview, width: int, raw_len: int) -> memoryview:
    n = raw_len // width
    planes: list[bytes | memoryview] = []
    pos = 0
    for _ in range(width):
        kind, size = _PLANE.unpack_from(payload, pos)
        pos += _PLANE.size
        part = payload[pos : pos + size]
        if len(part) != size:
            raise CorruptBlock("truncated plane")
        pos += size
        if kind == _PLANE_RAW:
            if size != n:
                raise CorruptBlock("raw plane of the wrong size")
            planes.append(part)  # no copy: interleaving reads it in place
        elif kind == _PLANE_ZSTD:
            planes.append(_unzstd(part, n))
        else:
            raise CorruptBlock(f"unknown plane codec {kind}")
    if pos != len(payload):
        raise CorruptBlock("bytes after the last plane")
    return _interleave(planes)


def _unzstd(payload: memoryview, size: int) -> bytes:
    # Check the declared size before zstd allocates it.
    if zstd.frame_content_size(payload) != size:
        raise CorruptBlock("zstd content size disagrees with the header")
    out = _codecs.decompressor.decompress(payload, max_output_size=size)
    if len(out) != size:
        raise CorruptBlock("zstd output length mismatch")
    return out


def _choose_width(block: Block, byte_group: ByteGroup, level: int) -> int:
    """The byte-group width to compress with (1: plain zstd), or 0 to store the block raw."""
    n = len(block.data)
    sample = memoryview(block.data)[:_PROBE_BYTES] if n >= 2 * _PROBE_BYTES else None
    if byte_group is False:
        width = 1
    elif byte_group is True:
        hint = dtype_width(block.meta.dtype)
        hint = hint if hint is not None and hint > 1 else 2
        width = hint if hint in _GROUP_WIDTHS and n % hint == 0 else 1
    elif (hint := dtype_width(block.meta.dtype)) is not None:
        width = hint if hint in AUTO_GROUP_WIDTHS and n % hint == 0 else 1
    elif sample is None or n % 2:
        width = 1
    else:
        # No hint: try the sample both ways; two small compressions, a lot saved on KV blocks.
        plain = len(_codecs.compressor(level).compress(sample))
        grouped = len(_grouped_payload(sample, 2, level))
        if min(plain, grouped) > _SKIP_RATIO * len(sample):
            return 0
        return 2 if grouped < plain else 1
    if sample is not None:
        # A quarter of the probe is enough to tell random from structured bytes.
        sample = sample[:_HINTED_PROBE_BYTES]
        if _probe(sample, width, level) > _SKIP_RATIO * len(sample):
            return 0
    return width


def _probe(sample: memoryview, width: int, level: int) -> int:
    if width > 1:
        return len(_grouped_payload(sample, width, level))
    return len(_codecs.compressor(level).compress(sample))


def encode_frame(
    block: Block, *, level: int = DEFAULT_LEVEL, byte_group: ByteGroup = "auto"
) -> bytes:
    """Frame ``block`` for storage; falls back to the raw codec when zstd does not shrink it."""
    data = block.data
    meta = block.meta
    raw_len = len(data)
    if raw_len != meta.size:
        raise TierError(f"block size {meta.size} does not match its {raw_len} bytes")
    width = _choose_width(block, byte_group, level)
    payload: bytes | memoryview
    if width == 0:
        payload, codec, width = data, CODEC_RAW, 1
    elif width > 1:
        payload, codec = _grouped_payload(data, width, level), CODEC_ZSTD_GROUPED
    else:
        payload, codec = _codecs.compressor(level).compress(data), CODEC_ZSTD
    if len(payload) >= raw_len:
        payload, codec, width = data, CODEC_RAW, 1

    flags = 0
    parts: list[bytes] = []
    if meta.dtype is not None:
        name = meta.dtype.encode("utf-8")
        if len(name) > 255:
            raise TierError("dtype name over 255 bytes")
        flags |= _FLAG_DTYPE
        parts += [_U8.pack(len(name)), name]
    if meta.shape is not None:
        if len(meta.shape) > _MAX_DIMS or any(d < 0 for d in meta.shape):
            raise TierError(f"unsupported shape {meta.shape!r}")
        flags |= _FLAG_SHAPE
        parts.append(_U8.pack(len(meta.shape)))
        parts += [_U64.pack(d) for d in meta.shape]
    if meta.expires_at is not None:
        if math.isnan(meta.expires_at):
            raise TierError("expires_at is NaN")
        flags |= _FLAG_EXPIRES
        parts.append(_F64.pack(meta.expires_at))
    fixed = _FIXED.pack(
        MAGIC, FORMAT_VERSION, codec, width, flags, raw_len, len(payload), meta.digest
    )
    header = fixed + b"".join(parts)
    return b"".join((header, _HCHECK.pack(xxhash.xxh3_64_intdigest(header)), payload))


def frame_overhead(block: Block) -> int:
    """Header bytes :func:`encode_frame` adds to a raw-codec payload (its worst case)."""
    n = _FIXED.size + _HCHECK.size
    if block.meta.dtype is not None:
        n += 1 + len(block.meta.dtype.encode("utf-8"))
    if block.meta.shape is not None:
        n += 1 + 8 * len(block.meta.shape)
    if block.meta.expires_at is not None:
        n += 8
    return n


# Largest header: fixed part, a 255-byte dtype, 32 dims, expiry, header check.
MAX_FRAME_OVERHEAD: Final = _FIXED.size + (1 + 255) + (1 + 8 * _MAX_DIMS) + 8 + _HCHECK.size


def frame_codec(buf: bytes | memoryview) -> str:
    """The codec name of a frame (for stats and benchmarks); raises CorruptBlock if unreadable."""
    if len(buf) < _FIXED.size or bytes(buf[:4]) != MAGIC:
        raise CorruptBlock("not a kvgate frame")
    name = CODEC_NAMES.get(buf[5])
    if name is None:
        raise CorruptBlock(f"unknown codec {buf[5]}")
    return name


def frame_is_raw(buf: bytes | memoryview) -> bool:
    """Whether a frame stores its payload uncompressed (decoding it is a checksum, no codec)."""
    return len(buf) >= _FIXED.size and bytes(buf[:4]) == MAGIC and buf[5] == CODEC_RAW


def decode_frame(buf: bytes | memoryview, *, owned: bool = False) -> Block:
    """Parse, decompress and verify one frame.

    ``buf`` may be a view into an LMDB map: the returned block owns fresh memory. With
    ``owned=True`` the caller hands over an immutable buffer nobody will reuse (a value fresh
    from Redis), and a raw frame's block is a view into it instead of a copy. Raises
    :class:`CorruptBlock` on any malformed, short, truncated or mismatching input, and nothing
    else.
    """
    try:
        return _decode(memoryview(buf), owned=owned)
    except CorruptBlock:
        raise
    except Exception as exc:  # the contract: no other exception type escapes a bad frame
        raise CorruptBlock(f"undecodable frame: {exc}") from exc


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """What a frame's checked header says, read without touching the payload."""

    codec: int
    width: int
    raw_len: int
    payload_len: int
    want: bytes
    dtype: str | None
    shape: tuple[int, ...] | None
    expires_at: float | None
    payload_at: int


def read_header(buf: bytes | memoryview) -> FrameHeader:
    """Parse and check a frame's header only (cheap: no decompression, no payload hash).

    Raises :class:`CorruptBlock` when the header is malformed or fails its own check.
    """
    try:
        return _header(memoryview(buf))
    except CorruptBlock:
        raise
    except Exception as exc:
        raise CorruptBlock(f"unreadable frame header: {exc}") from exc


def _header(view: memoryview) -> FrameHeader:
    total = len(view)
    if total < _FIXED.size + _HCHECK.size:
        raise CorruptBlock(f"frame of {total} bytes is shorter than a header")
    magic, version, codec, width, flags, raw_len, payload_len, want = _FIXED.unpack_from(view, 0)
    if magic != MAGIC:
        raise CorruptBlock("bad magic")
    if version != FORMAT_VERSION:
        raise CorruptBlock(f"unsupported frame version {version}")
    if flags & ~_KNOWN_FLAGS:
        raise CorruptBlock(f"unknown flags {flags:#x}")
    pos = _FIXED.size
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    expires_at: float | None = None
    if flags & _FLAG_DTYPE:
        (n,) = _U8.unpack_from(view, pos)
        pos += 1
        if pos + n > total:
            raise CorruptBlock("truncated dtype")
        dtype = bytes(view[pos : pos + n]).decode("utf-8")
        pos += n
    if flags & _FLAG_SHAPE:
        (ndim,) = _U8.unpack_from(view, pos)
        pos += 1
        if ndim > _MAX_DIMS or pos + 8 * ndim > total:
            raise CorruptBlock("bad shape")
        shape = struct.unpack_from(f"<{ndim}Q", view, pos)
        pos += 8 * ndim
    if flags & _FLAG_EXPIRES:
        (expires_at,) = _F64.unpack_from(view, pos)
        pos += 8
        if math.isnan(expires_at):
            raise CorruptBlock("expiry is NaN")
    (hcheck,) = _HCHECK.unpack_from(view, pos)
    if hcheck != xxhash.xxh3_64_intdigest(view[:pos]):
        raise CorruptBlock("header check mismatch")
    pos += _HCHECK.size
    if total - pos != payload_len:
        raise CorruptBlock(f"payload is {total - pos} bytes, header says {payload_len}")
    return FrameHeader(
        codec, width, raw_len, payload_len, bytes(want), dtype, shape, expires_at, pos
    )


def _decode(view: memoryview, *, owned: bool) -> Block:
    head = _header(view)
    codec, width, raw_len, payload_len = head.codec, head.width, head.raw_len, head.payload_len
    payload = view[head.payload_at :]
    data: bytes | memoryview
    if codec == CODEC_RAW:
        if width != 1 or payload_len != raw_len:
            raise CorruptBlock("raw frame with inconsistent lengths")
        # Unless owned, copy: the caller's buffer may be an LMDB page.
        data = payload if owned else bytes(payload)
    elif codec == CODEC_ZSTD:
        if width != 1:
            raise CorruptBlock("plain zstd frame with a group width")
        data = _unzstd(payload, raw_len)
    elif codec == CODEC_ZSTD_GROUPED:
        if width not in _GROUP_WIDTHS or raw_len % width:
            raise CorruptBlock(f"bad group width {width}")
        data = _decode_grouped(payload, width, raw_len)
    else:
        raise CorruptBlock(f"unknown codec {codec}")
    if digest(data) != head.want:
        raise CorruptBlock("checksum mismatch")
    meta = BlockMeta(
        raw_len, head.want, dtype=head.dtype, shape=head.shape, expires_at=head.expires_at
    )
    return Block(data, meta)
