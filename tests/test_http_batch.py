"""The batch framing (property-based) and the /v1/batch endpoints over a real server."""

from __future__ import annotations

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import batch
from tests.conftest import RunningGateway
from tests.test_http_blocks import MiB, payload

items_strategy = st.lists(
    st.builds(
        batch.BatchItem,
        key=st.from_regex(r"[A-Za-z0-9._:@-]{1,60}", fullmatch=True),
        data=st.binary(max_size=300),
        status=st.sampled_from([0, 200, 201, 404]),
        tier=st.sampled_from(["", "hbm", "dram", "disk"]),
    ),
    max_size=20,
)


@given(items_strategy)
def test_frame_round_trips(items: list[batch.BatchItem]) -> None:
    decoded = batch.decode(batch.encode(items))
    assert [(i.key, bytes(i.data), i.status, i.tier) for i in decoded] == [
        (i.key, bytes(i.data), i.status, i.tier) for i in items
    ]


@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_format_error(raw: bytes) -> None:
    try:
        items = batch.decode(raw)
    except batch.BatchFormatError:
        return
    assert batch.encode(items) == raw


@given(items_strategy, st.data())
def test_any_truncation_is_a_format_error(
    items: list[batch.BatchItem], data: st.DataObject
) -> None:
    frame = batch.encode(items)
    cut = data.draw(st.integers(min_value=0, max_value=len(frame) - 1))
    with pytest.raises(batch.BatchFormatError):
        batch.decode(frame[:cut])


def test_limits_are_enforced() -> None:
    frame = batch.encode([batch.BatchItem("a", b"12345"), batch.BatchItem("b", b"1")])
    with pytest.raises(batch.BatchFormatError, match="at most 1"):
        batch.decode(frame, max_items=1)
    with pytest.raises(batch.BatchFormatError, match="at most 4 per block"):
        batch.decode(frame, max_item_bytes=4)
    assert len(batch.decode(frame, max_items=2, max_item_bytes=5)) == 2


async def test_batch_put_then_batch_get_round_trip(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    keys = [f"b:{i}" for i in range(30)]
    frame = batch.encode([batch.BatchItem(k, payload(k, MiB)) for k in keys])
    headers = {"Content-Type": batch.MEDIA_TYPE}
    async with http.post(f"{gateway.url}/v1/batch/put", data=frame, headers=headers) as resp:
        assert resp.status == 200
        result = await resp.json()
    assert result["stored"] == 30 and result["exists"] == 0
    assert [r["status"] for r in result["results"]] == [201] * 30

    await gateway.hierarchy.quiesce()  # demotions to disk finish in the background (spill_behind)
    wanted = [*keys, "absent", keys[0]]
    async with http.post(f"{gateway.url}/v1/batch/get", json={"keys": wanted}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == batch.MEDIA_TYPE
        items = batch.decode(await resp.read())
    assert [i.key for i in items] == wanted
    for item in items:
        if item.key == "absent":
            assert (item.status, item.tier, bytes(item.data)) == (404, "", b"")
        else:
            assert item.status == 200
            assert bytes(item.data) == payload(item.key, MiB)
    assert {i.tier for i in items if i.status == 200} >= {"hbm", "disk"}
    await gateway.hierarchy.quiesce()


async def test_batch_put_first_body_wins_and_applies_ttl(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    await http.put(gateway.block_url("old"), data=b"old")
    frame = batch.encode(
        [
            batch.BatchItem("dup", b"first"),
            batch.BatchItem("dup", b"second"),
            batch.BatchItem("old", b"new"),
        ]
    )
    headers = {"Content-Type": batch.MEDIA_TYPE, "X-KV-TTL": "10"}
    async with http.post(f"{gateway.url}/v1/batch/put", data=frame, headers=headers) as resp:
        result = await resp.json()
    assert [r["status"] for r in result["results"]] == [201, 200, 200]
    assert (result["stored"], result["exists"]) == (1, 2)
    async with http.get(gateway.block_url("dup")) as resp:
        assert await resp.read() == b"first"
    gateway.clock.advance(11)
    async with http.get(gateway.block_url("dup")) as resp:
        assert resp.status == 404
    async with http.get(gateway.block_url("old")) as resp:
        assert await resp.read() == b"old"


async def test_batch_put_item_under_another_writers_lease_is_refused(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    async with http.post(f"{gateway.url}/v1/leases", json={"key": "held"}) as resp:
        assert resp.status == 201
    frame = batch.encode([batch.BatchItem("held", b"x"), batch.BatchItem("free", b"y")])
    headers = {"Content-Type": batch.MEDIA_TYPE}
    async with http.post(f"{gateway.url}/v1/batch/put", data=frame, headers=headers) as resp:
        result = await resp.json()
    assert result["results"] == [
        {"key": "held", "status": 409, "error": "lease_conflict"},
        {"key": "free", "status": 201},
    ]
    assert (result["stored"], result["exists"]) == (1, 0)
    async with http.get(gateway.block_url("held")) as resp:
        assert resp.status == 404


async def test_batch_item_over_the_block_limit_is_refused(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    big = b"z" * (gateway.config.max_block_bytes + 1)
    frame = batch.encode([batch.BatchItem("ok", b"1"), batch.BatchItem("big", big)])
    headers = {"Content-Type": batch.MEDIA_TYPE}
    async with http.post(f"{gateway.url}/v1/batch/put", data=frame, headers=headers) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "bad_batch"
