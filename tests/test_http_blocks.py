"""Block PUT/GET/HEAD/DELETE over a real server and real tiers."""

from __future__ import annotations

import hashlib

import aiohttp

from tests.conftest import RunningGateway
from tiers.block import digest

MiB = 1024 * 1024


def payload(key: str, size: int) -> bytes:
    """Deterministic bytes derived from the key (different keys, different bytes)."""
    seed = hashlib.sha256(key.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


async def test_put_then_get_is_bit_identical(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    data = bytes(range(256)) * 1000 + b"\x00tail"
    async with http.put(gateway.block_url("blk-1"), data=data) as resp:
        assert resp.status == 201
        assert resp.headers["ETag"] == f'"{digest(data).hex()}"'
    async with http.get(gateway.block_url("blk-1")) as resp:
        assert resp.status == 200
        assert await resp.read() == data
        assert resp.headers["Content-Type"] == "application/octet-stream"
        assert resp.headers["ETag"] == f'"{digest(data).hex()}"'
        assert resp.headers["X-KV-Tier"] == "hbm"


async def test_second_put_is_200_and_keeps_the_first_body(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    async with http.put(gateway.block_url("k"), data=b"first") as resp:
        assert resp.status == 201
    async with http.put(gateway.block_url("k"), data=b"second") as resp:
        assert resp.status == 200
    async with http.get(gateway.block_url("k")) as resp:
        assert await resp.read() == b"first"


async def test_blocks_spread_over_tiers_and_all_read_back_exactly(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    # 40 x 1 MiB does not fit hbm (8 MiB) + dram (16 MiB): some blocks must land on disk.
    keys = [f"seq:{i}" for i in range(40)]
    for key in keys:
        async with http.put(gateway.block_url(key), data=payload(key, MiB)) as resp:
            assert resp.status == 201
    await gateway.hierarchy.quiesce()  # demotions to disk finish in the background
    placed = {key: gateway.hierarchy.locate(f"default/{key}") for key in keys}
    assert set(placed.values()) == {"hbm", "dram", "disk"}
    for key in keys:
        # Earlier hits promote in the background and may demote this block: settle first.
        await gateway.hierarchy.quiesce()
        tier_before = gateway.hierarchy.locate(f"default/{key}")
        async with http.get(gateway.block_url(key)) as resp:
            assert resp.status == 200
            assert await resp.read() == payload(key, MiB)
            assert resp.headers["X-KV-Tier"] == tier_before
    await gateway.hierarchy.quiesce()


async def test_head_reports_like_get_without_body(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    data = payload("h", 5000)
    await http.put(gateway.block_url("h"), data=data)
    async with http.head(gateway.block_url("h")) as resp:
        assert resp.status == 200
        assert resp.headers["ETag"] == f'"{digest(data).hex()}"'
        assert resp.headers["X-KV-Tier"] == "hbm"
        assert resp.headers["Content-Length"] == "5000"
        assert await resp.read() == b""
    async with http.head(gateway.block_url("nope")) as resp:
        assert resp.status == 404


async def test_get_miss_is_404_json(gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    async with http.get(gateway.block_url("missing")) as resp:
        assert resp.status == 404
        body = await resp.json()
        assert body["error"] == "not_found"
        assert "missing" in body["detail"]


async def test_delete_removes_from_every_tier(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    await http.put(gateway.block_url("d"), data=b"x" * 100)
    async with http.delete(gateway.block_url("d")) as resp:
        assert resp.status == 204
    async with http.get(gateway.block_url("d")) as resp:
        assert resp.status == 404
    async with http.delete(gateway.block_url("d")) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"] == "not_found"
    # Deleted means gone: the key can be written again with new bytes.
    async with http.put(gateway.block_url("d"), data=b"new") as resp:
        assert resp.status == 201


async def test_if_none_match_answers_304(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    data = b"cached" * 100
    await http.put(gateway.block_url("c"), data=data)
    etag = f'"{digest(data).hex()}"'
    async with http.get(gateway.block_url("c"), headers={"If-None-Match": etag}) as resp:
        assert resp.status == 304
        assert resp.headers["ETag"] == etag
        assert await resp.read() == b""
    async with http.get(gateway.block_url("c"), headers={"If-None-Match": '"00", W/' + etag}) as r:
        assert r.status == 304
    async with http.get(gateway.block_url("c"), headers={"If-None-Match": '"abc"'}) as resp:
        assert resp.status == 200
        assert await resp.read() == data


async def test_ttl_bounds_serving(gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    async with http.put(gateway.block_url("t"), data=b"short", headers={"X-KV-TTL": "30"}) as r:
        assert r.status == 201
    await http.put(gateway.block_url("forever"), data=b"long")
    gateway.clock.advance(29)
    async with http.get(gateway.block_url("t")) as resp:
        assert resp.status == 200
    gateway.clock.advance(2)
    async with http.get(gateway.block_url("t")) as resp:
        assert resp.status == 404
    async with http.get(gateway.block_url("forever")) as resp:
        assert resp.status == 200
    async with http.post(f"{gateway.url}/v1/lookup", json={"keys": ["t"]}) as resp:
        assert (await resp.json())["prefix_hits"] == 0


async def test_dtype_and_shape_headers_are_accepted(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    data = bytes(2 * 4 * 8 * 2)
    headers = {"X-KV-Dtype": "float16", "X-KV-Shape": "2, 4,8"}
    async with http.put(gateway.block_url("typed"), data=data, headers=headers) as resp:
        assert resp.status == 201
    hit = await gateway.hierarchy.get("default/typed")
    assert hit is not None
    assert hit.block.meta.dtype == "float16"
    assert hit.block.meta.shape == (2, 4, 8)
    async with http.get(gateway.block_url("typed")) as resp:
        assert await resp.read() == data


async def test_chunked_put_is_stored(gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    data = payload("chunked", 300_000)

    async def body() -> object:
        for i in range(0, len(data), 70_000):
            yield data[i : i + 70_000]

    async with http.put(gateway.block_url("chunked"), data=body()) as resp:
        assert resp.status == 201
    async with http.get(gateway.block_url("chunked")) as resp:
        assert await resp.read() == data


async def test_empty_block_round_trips(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    async with http.put(gateway.block_url("empty"), data=b"") as resp:
        assert resp.status == 201
    async with http.get(gateway.block_url("empty")) as resp:
        assert resp.status == 200
        assert await resp.read() == b""
        assert resp.headers["ETag"] == f'"{digest(b"").hex()}"'


async def test_expect_100_continue_put_is_stored(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    async with http.put(gateway.block_url("expect"), data=b"abc" * 1000, expect100=True) as resp:
        assert resp.status == 201
    async with http.get(gateway.block_url("expect")) as resp:
        assert await resp.read() == b"abc" * 1000


async def test_keys_with_every_allowed_character(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    key = "Az09._:@-" + "x" * 503
    assert len(key) == 512
    async with http.put(gateway.block_url(key), data=b"long key") as resp:
        assert resp.status == 201
    async with http.get(gateway.block_url(key)) as resp:
        assert await resp.read() == b"long key"
