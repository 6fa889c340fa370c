"""KVGateClient against a real server."""

from __future__ import annotations

import aiohttp
import pytest

from gateway.client import KVGateClient
from gateway.errors import KVGateBadRequest, KVGateTooLarge
from tests.conftest import RunningGateway
from tests.test_http_blocks import MiB, payload
from tiers.block import digest


async def test_put_get_head_delete(gateway: RunningGateway) -> None:
    async with KVGateClient(gateway.url) as kv:
        assert await kv.put("a", b"alpha", dtype="uint8", shape=[5], ttl=60) is True
        assert await kv.put("a", b"other") is False
        assert await kv.get("a") == b"alpha"
        block = await kv.get_block("a")
        assert block is not None
        assert (block.data, block.tier, block.etag) == (
            b"alpha",
            "hbm",
            f'"{digest(b"alpha").hex()}"',
        )
        info = await kv.head("a")
        assert info is not None and (info.tier, info.size) == ("hbm", 5)
        assert await kv.get("missing") is None
        assert await kv.head("missing") is None
        assert await kv.delete("a") is True
        assert await kv.delete("a") is False
        assert await kv.get("a") is None
        assert await kv.ready() is True


async def test_put_sends_any_buffer_exactly(gateway: RunningGateway) -> None:
    import array

    floats = array.array("f", [1.5, -2.25, 3.0] * 100_000)  # not a byte format
    async with KVGateClient(gateway.url) as kv:
        assert await kv.put("f", memoryview(floats)) is True
        assert await kv.put("one", b"x") is True
        assert await kv.put("ba", bytearray(b"mutable")) is True
        assert await kv.get("f") == floats.tobytes()
        assert await kv.get("one") == b"x"
        assert await kv.get("ba") == b"mutable"


async def test_lookup_prefetch_stats(gateway: RunningGateway) -> None:
    async with KVGateClient(gateway.url) as kv:
        keys = [f"c{i}" for i in range(30)]
        for key in keys:
            await kv.put(key, payload(key, MiB))
        await gateway.hierarchy.quiesce()  # demotions to disk finish in the background
        hits, tiers = await kv.lookup([*keys[:5], "gap", keys[5]])
        assert hits == 5 and len(tiers) == 5
        stats = await kv.stats()
        assert [t["name"] for t in stats] == ["hbm", "dram", "disk"]
        assert sum(t["blocks"] for t in stats) == 30
        assert await kv.prefetch(keys) == 30
    await gateway.hierarchy.quiesce()


async def test_batch_calls(gateway: RunningGateway) -> None:
    async with KVGateClient(gateway.url) as kv:
        results = await kv.batch_put({"x": b"1" * 10, "y": b"2" * 20})
        assert results == [("x", 201), ("y", 201)]
        assert await kv.batch_put([("x", b"other")]) == [("x", 200)]
        got = await kv.batch_get(["y", "nope", "x"])
        assert got[1] is None
        assert got[0] is not None and got[0].data == b"2" * 20 and got[0].tier == "hbm"
        assert got[2] is not None and got[2].data == b"1" * 10


async def test_errors_are_typed(gateway: RunningGateway) -> None:
    async with KVGateClient(gateway.url) as kv:
        with pytest.raises(KVGateTooLarge) as too_large:
            await kv.put("big", b"x" * (gateway.config.max_block_bytes + 1))
        assert too_large.value.status == 413 and too_large.value.error == "too_large"
        with pytest.raises(KVGateBadRequest) as bad:
            await kv.put("bad key", b"x")
        assert bad.value.error == "bad_key"
        with pytest.raises(KVGateBadRequest):
            await kv.lookup(["ok", "no/slash"])


async def test_shared_session_is_left_open(gateway: RunningGateway) -> None:
    async with aiohttp.ClientSession() as session:
        async with KVGateClient(gateway.url, session=session, token="t0k") as kv:
            assert await kv.put("s", b"shared") is True
        assert not session.closed
        async with KVGateClient(gateway.url, session=session) as kv:
            assert await kv.get("s") == b"shared"
