"""The block frame: round trips, codec choice, and every kind of damage -> CorruptBlock."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import xxhash
import zstandard as zstd
from hypothesis import given, settings
from hypothesis import strategies as st

from tiers.block import Block, digest
from tiers.errors import CorruptBlock, TierError
from tiers.frame import (
    CODEC_RAW,
    CODEC_ZSTD,
    CODEC_ZSTD_GROUPED,
    MAX_FRAME_OVERHEAD,
    decode_frame,
    dtype_width,
    encode_frame,
    frame_codec,
    frame_overhead,
    group_bytes,
    ungroup_bytes,
)

DTYPES = [None, "bfloat16", "float16", "torch.bfloat16", "int16", "float32", "uint8", "weird"]


def kv_like(n_elems: int, seed: int = 0) -> bytes:
    """bf16 values of a normal distribution: the exponent byte is skewed, like real KV."""
    rng = np.random.default_rng(seed)
    f32 = rng.normal(0.0, 1.0, n_elems).astype(np.float32)
    return (f32.view(np.uint32) >> 16).astype("<u2").tobytes()


def forge(
    *,
    codec: int,
    width: int,
    raw_len: int,
    payload: bytes,
    checksum: bytes,
    flags: int = 0,
    extra: bytes = b"",
    magic: bytes = b"KVGF",
    version: int = 1,
) -> bytes:
    """A frame with a valid header check around whatever fields a test wants."""
    header = struct.pack(
        "<4sBBBBQQ16s", magic, version, codec, width, flags, raw_len, len(payload), checksum
    )
    header += extra
    return header + struct.pack("<Q", xxhash.xxh3_64_intdigest(header)) + payload


def assert_same(a: Block, b: Block) -> None:
    assert bytes(a.data) == bytes(b.data)
    assert a.meta == b.meta


@settings(max_examples=150, deadline=None)
@given(
    data=st.binary(max_size=5000),
    dtype=st.sampled_from(DTYPES),
    shape=st.none() | st.lists(st.integers(0, 2**40), max_size=6).map(tuple),
    expires=st.none() | st.floats(allow_nan=False),
    byte_group=st.sampled_from([False, True, "auto"]),
    level=st.sampled_from([-1, 1, 3]),
)
def test_round_trip_arbitrary(
    data: bytes,
    dtype: str | None,
    shape: tuple[int, ...] | None,
    expires: float | None,
    byte_group: bool | str,
    level: int,
) -> None:
    block = Block.of(data, dtype=dtype, shape=shape, expires_at=expires)
    frame = encode_frame(block, level=level, byte_group=byte_group)  # type: ignore[arg-type]
    assert_same(decode_frame(frame), block)
    assert_same(decode_frame(memoryview(frame)), block)
    assert len(frame) <= len(data) + frame_overhead(block) <= len(data) + MAX_FRAME_OVERHEAD


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=4096), st.sampled_from([2, 4, 8]))
def test_group_ungroup_inverse(data: bytes, width: int) -> None:
    data = data[: len(data) - len(data) % width]
    planes = group_bytes(data, width)
    assert len(planes) == len(data)
    assert bytes(ungroup_bytes(planes, width)) == data


def test_grouping_puts_each_byte_in_its_plane() -> None:
    assert group_bytes(b"\x01\x02\x03\x04\x05\x06", 2) == b"\x01\x03\x05\x02\x04\x06"


def test_bf16_is_grouped_and_smaller_than_plain_zstd() -> None:
    block = Block.of(kv_like(64 * 1024), dtype="bfloat16")
    grouped = encode_frame(block, byte_group=True)
    plain = encode_frame(block, byte_group=False)
    assert frame_codec(grouped) == "zstd+bytegroup"
    assert frame_codec(plain) == "zstd"
    assert len(grouped) < len(plain) < len(block.data)
    assert_same(decode_frame(grouped), block)


def test_auto_groups_by_dtype_and_probes_without_one() -> None:
    data = kv_like(128 * 1024)
    assert frame_codec(encode_frame(Block.of(data, dtype="bf16"))) == "zstd+bytegroup"
    assert frame_codec(encode_frame(Block.of(data))) == "zstd+bytegroup"  # probed
    # A 1-byte dtype is never grouped; an odd length cannot be.
    assert frame_codec(encode_frame(Block.of(data, dtype="uint8"))) == "zstd"
    assert frame_codec(encode_frame(Block.of(data[:-1]), byte_group=True)) == "zstd"


def test_incompressible_is_stored_raw() -> None:
    data = np.random.default_rng(1).bytes(10_000)
    frame = encode_frame(Block.of(data, dtype="bfloat16"))
    assert frame_codec(frame) == "raw"
    assert frame[5] == CODEC_RAW
    assert bytes(decode_frame(frame).data) == data


@pytest.mark.parametrize("dtype", [None, "bfloat16", "uint8"])
def test_incompressible_head_skips_compression(dtype: str | None) -> None:
    """Early abort: a block whose first bytes zstd cannot shrink is stored raw, whatever path
    chose the width, and a compressible block of the same size still compresses."""
    size = 256 * 1024
    noise = np.random.default_rng(2).bytes(size)
    frame = encode_frame(Block.of(noise, dtype=dtype))
    assert frame_codec(frame) == "raw"
    assert bytes(decode_frame(frame).data) == noise
    kv = kv_like(size)
    assert frame_codec(encode_frame(Block.of(kv, dtype=dtype))) != "raw"


def test_dtype_width() -> None:
    assert dtype_width("bfloat16") == 2
    assert dtype_width("torch.float16") == 2
    assert dtype_width("float32") == 4
    assert dtype_width("nope") is None
    assert dtype_width(None) is None


def test_encode_rejects_misuse() -> None:
    block = Block.of(b"abcd")
    with pytest.raises(TierError):
        encode_frame(Block(b"abc", block.meta))
    with pytest.raises(TierError):
        encode_frame(Block.of(b"ab", dtype="x" * 300))
    with pytest.raises(TierError):
        encode_frame(Block.of(b"ab", expires_at=float("nan")))


# -- damage -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def frames() -> list[bytes]:
    small = kv_like(300)
    return [
        encode_frame(Block.of(small, dtype="bfloat16", shape=(3, 100), expires_at=12.5)),
        encode_frame(Block.of(small), byte_group=False),
        encode_frame(Block.of(b"tiny raw block", dtype="int8")),
    ]


def test_every_truncation_is_corrupt(frames: list[bytes]) -> None:
    for frame in frames:
        for cut in range(len(frame)):
            with pytest.raises(CorruptBlock):
                decode_frame(frame[:cut])


def test_no_bit_flip_yields_wrong_bytes(frames: list[bytes]) -> None:
    """A flip is caught, or lands on a bit zstd ignores and the block decodes unchanged."""
    caught = 0
    for frame in frames:
        original = decode_frame(frame)
        for pos in range(len(frame)):
            for bit in (0, 7):
                damaged = bytearray(frame)
                damaged[pos] ^= 1 << bit
                try:
                    block = decode_frame(bytes(damaged))
                except CorruptBlock:
                    caught += 1
                    continue
                assert_same(block, original)
    # Only a handful of don't-care bits exist (in zstd's own frame header).
    assert caught >= 2 * sum(len(f) for f in frames) - 8


def test_trailing_bytes_are_corrupt(frames: list[bytes]) -> None:
    for frame in frames:
        with pytest.raises(CorruptBlock):
            decode_frame(frame + b"\x00")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_is_corrupt(buf: bytes) -> None:
    with pytest.raises(CorruptBlock):
        decode_frame(buf)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=200))
def test_garbage_payload_behind_valid_header_is_corrupt(payload: bytes) -> None:
    for codec, width in ((CODEC_ZSTD, 1), (CODEC_ZSTD_GROUPED, 2)):
        frame = forge(
            codec=codec, width=width, raw_len=100, payload=payload, checksum=digest(b"\0" * 100)
        )
        with pytest.raises(CorruptBlock):
            decode_frame(frame)


def test_forged_headers_are_corrupt() -> None:
    data = kv_like(200)
    good = zstd.ZstdCompressor(level=1).compress(data)
    cases: list[dict[str, object]] = [
        dict(magic=b"KVGX"),
        dict(version=2),
        dict(codec=9),
        dict(flags=0x80),
        dict(checksum=digest(b"other")),  # decompresses fine, wrong bytes
        dict(raw_len=len(data) + 1),  # zstd content size disagrees
        dict(codec=CODEC_ZSTD_GROUPED, width=3),
        dict(codec=CODEC_ZSTD, width=2),
        dict(codec=CODEC_RAW),  # raw frame whose payload length differs from raw_len
        dict(flags=0x01, extra=b"\x05ab"),  # dtype runs past the header
        dict(flags=0x01, extra=b"\x02\xff\xfe"),  # dtype not UTF-8
        dict(flags=0x02, extra=b"\x40"),  # 64 dims
        dict(flags=0x04, extra=struct.pack("<d", float("nan"))),
    ]
    for override in cases:
        fields: dict[str, object] = dict(
            codec=CODEC_ZSTD, width=1, raw_len=len(data), payload=good, checksum=digest(data)
        )
        fields.update(override)
        with pytest.raises(CorruptBlock):
            decode_frame(forge(**fields))  # type: ignore[arg-type]
    # The untouched fields decode, so each case above failed for its own reason.
    ok = forge(codec=CODEC_ZSTD, width=1, raw_len=len(data), payload=good, checksum=digest(data))
    assert bytes(decode_frame(ok).data) == data


def test_forged_grouped_payloads_are_corrupt() -> None:
    data = kv_like(500)
    n = len(data) // 2
    low, high = group_bytes(data, 2)[:n], group_bytes(data, 2)[n:]
    packed_high = zstd.ZstdCompressor(level=1).compress(high)

    def plane(kind: int, body: bytes, size: int | None = None) -> bytes:
        return struct.pack("<BQ", kind, len(body) if size is None else size) + body

    good = plane(0, low) + plane(1, packed_high)
    bad_payloads = [
        plane(0, low) + plane(7, packed_high),  # unknown plane codec
        plane(0, low[:-2]) + plane(1, packed_high),  # raw plane of the wrong size
        plane(0, low) + plane(1, packed_high) + b"\0",  # bytes after the last plane
        plane(0, low) + plane(1, packed_high, size=len(packed_high) + 5),  # runs past the end
        plane(0, low) + plane(1, zstd.ZstdCompressor(level=1).compress(high[:-1])),  # short
        plane(0, high) + plane(1, zstd.ZstdCompressor(level=1).compress(low)),  # swapped
    ]
    for payload in bad_payloads:
        frame = forge(
            codec=CODEC_ZSTD_GROUPED,
            width=2,
            raw_len=len(data),
            payload=payload,
            checksum=digest(data),
        )
        with pytest.raises(CorruptBlock):
            decode_frame(frame)
    ok = forge(
        codec=CODEC_ZSTD_GROUPED, width=2, raw_len=len(data), payload=good, checksum=digest(data)
    )
    assert bytes(decode_frame(ok).data) == data


def test_small_blocks_still_gain_from_grouping() -> None:
    block = Block.of(kv_like(4096), dtype="bfloat16")  # 8 KiB
    assert len(encode_frame(block, byte_group=True)) < len(encode_frame(block, byte_group=False))


def test_non_buffer_input_is_corrupt() -> None:
    with pytest.raises(CorruptBlock):
        decode_frame(12345)  # type: ignore[arg-type]
    with pytest.raises(CorruptBlock):
        frame_codec(b"nope")
