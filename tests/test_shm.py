"""The same-host data plane and the pinned (zero-copy) read path.

Real gateway on loopback, real /dev/shm segments, FakeClock for lease expiry.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import stat
import sys
from pathlib import Path
from typing import cast

import aiohttp
import pytest
import torch

from gateway.client import KVGateClient
from gateway.config import MiB, TenantConfig
from gateway.shm import SHM
from gateway.shm_client import ShmSession
from tests.conftest import RunningGateway, running_gateway, subprocess_env
from tiers.block import Block, digest
from tiers.memory import ArenaTier
from tiers.shmseg import DEFAULT_SHM_DIR, ShmSegment

pytestmark = pytest.mark.skipif(
    not os.access(DEFAULT_SHM_DIR, os.W_OK), reason="no writable /dev/shm"
)


def payload(key: str, size: int) -> bytes:
    seed = hashlib.sha256(key.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def read_runs(path: str | Path, runs: list[list[int]] | tuple[tuple[int, int], ...]) -> bytes:
    """What a same-host client sees at those runs of a segment file."""
    raw = Path(path).read_bytes()
    return b"".join(raw[off : off + n] for off, n in runs)


def tenant(name: str, token: str) -> TenantConfig:
    return TenantConfig(name, hashlib.sha256(token.encode()).hexdigest())


# -- segments -------------------------------------------------------------------------------


def test_segment_is_private_to_the_gateway_uid_and_unlinked_on_close() -> None:
    seg = ShmSegment.create("t", 1 << 20)
    mode = os.stat(seg.path).st_mode
    assert stat.S_IMODE(mode) == 0o600
    assert os.stat(seg.path).st_uid == os.getuid()
    seg.buffer[:4] = b"abcd"
    path = seg.path
    seg.close()
    assert not path.exists()


async def test_arena_lives_in_shared_memory_when_asked() -> None:
    tier = ArenaTier("dram", 1 << 20, page_bytes=4096, shm_dir=DEFAULT_SHM_DIR)
    info = tier.shared_segment()
    assert info is not None and info.kind == "file"
    data = payload("x", 10_000)
    await tier.put("k", Block.of(data))
    pin = tier.pin("k")
    assert pin is not None
    place = pin.placement()
    assert place is not None and place.segment == info.name
    assert read_runs(info.path, place.runs) == data
    pin.release()
    await tier.close()
    with pytest.raises(FileNotFoundError):
        read_runs(info.path, ())


# -- pins -----------------------------------------------------------------------------------


async def test_pin_keeps_pages_from_reuse_until_released() -> None:
    tier = ArenaTier("hbm", 64 * 1024, page_bytes=16 * 1024)  # 4 pages
    old = payload("old", 64 * 1024)
    await tier.put("old", Block.of(old))
    pin = tier.pin("old")
    assert pin is not None
    assert await tier.delete("old")
    assert not tier.contains("old")
    # The pages are still lent out: nothing fits until the reader lets go.
    assert not tier.fits(16 * 1024)
    assert (await tier.put("new", Block.of(payload("new", 16 * 1024)))).value == "no_room"
    views = pin.views()
    assert views is not None and b"".join(views) == old
    assert bytes(await pin.read()) == old  # the copy a GPU arena's reader takes
    pin.release()
    pin.release()  # idempotent
    with pytest.raises(RuntimeError):
        await pin.read()
    assert tier.pinned_blocks == 0
    assert tier.fits(64 * 1024)
    new = payload("new", 64 * 1024)
    assert (await tier.put("new", Block.of(new))).value == "stored"
    got = await tier.get("new")
    assert got is not None and bytes(got.data) == new


async def test_evicting_a_pinned_block_hands_back_its_bytes_and_defers_the_free() -> None:
    tier = ArenaTier("hbm", 32 * 1024, page_bytes=16 * 1024)
    data = payload("v", 20_000)
    await tier.put("v", Block.of(data))
    pin = tier.pin("v")
    assert pin is not None
    evicted = await tier.evict("v")
    assert evicted is not None and bytes(evicted.data) == data
    assert tier.stats().used_bytes == 32 * 1024  # still charged while lent out
    pin.release()
    assert tier.stats().used_bytes == 0


# -- the shared-memory path through the gateway -----------------------------------------------


async def test_shm_round_trip_is_bit_identical(gateway: RunningGateway) -> None:
    blocks = {f"r:{i}": payload(f"r:{i}", size) for i, size in enumerate([1, 5000, MiB, 3 * MiB])}
    async with KVGateClient(gateway.url) as kv:
        results = await kv.put_many(blocks, dtype="bfloat16")
        assert kv.uses_shm
        assert [status for _, status in results] == [201] * len(blocks)
        got = await kv.get_many([*blocks, "absent"])
        assert got[:-1] == list(blocks.values())
        assert got[-1] is None
        for key, data in blocks.items():  # the HTTP path sees exactly the same bytes
            fetched = await kv.get_block(key)
            assert fetched is not None and fetched.data == data
            assert fetched.etag == f'"{digest(data).hex()}"'


async def test_shm_writes_respect_another_writers_lease(gateway: RunningGateway) -> None:
    # The shm commit is a write like any PUT: a block under someone else's write lease is theirs
    # to store, so the same-host path answers 409 for it and stores the free key beside it.
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gateway.url}/v1/leases", json={"key": "held"}) as resp:
            assert resp.status == 201
            token = (await resp.json())["token"]
        async with KVGateClient(gateway.url) as kv:
            results = await kv.put_many({"held": b"intruder", "free": b"ok"})
            assert kv.uses_shm
            assert results == [("held", 409), ("free", 201)]
            assert await kv.get("held") is None
        async with http.put(
            f"{gateway.url}/v1/blocks/held",
            data=b"writer",
            headers={"X-KV-Lease-Token": str(token)},
        ) as resp:
            assert resp.status == 201
        async with http.get(f"{gateway.url}/v1/blocks/held") as resp:
            assert await resp.read() == b"writer"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, hbm is its own IPC segment")
async def test_hbm_and_dram_in_one_arena_advertise_one_segment(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    # Without CUDA both CPU tiers share one arena (tiers.arena): a client maps it once, and
    # descriptors of blocks in either tier name it.
    async with http.post(f"{gateway.url}/v1/shm/attach", json={}) as resp:
        assert resp.status == 201
        segments = (await resp.json())["segments"]
    arenas = [s for s in segments if not s["writable"]]
    assert len(arenas) == 1 and arenas[0]["kind"] == "file"
    assert len({s["name"] for s in segments}) == len(segments)


async def test_get_many_into_fills_caller_buffers_without_allocating(
    gateway: RunningGateway,
) -> None:
    import numpy as np

    blocks = {f"i:{i}": payload(f"i:{i}", size) for i, size in enumerate([7, MiB, 2 * MiB + 3])}
    async with KVGateClient(gateway.url) as kv:
        await kv.put_many(blocks)
        assert kv.uses_shm
        # Numpy pages, a bytearray and a wider dtype: all written as bytes, from their start.
        cache = np.zeros((3, 3 * MiB), dtype=np.uint8)
        spare = bytearray(b"\xff" * (3 * MiB))
        wide = np.zeros(3 * MiB // 4, dtype=np.float32)
        sizes = await kv.get_many_into([*blocks, "absent"], [cache[0], cache[1], wide, spare])
        assert sizes == [len(v) for v in blocks.values()] + [None]
        assert cache[0, :7].tobytes() == blocks["i:0"] and not cache[0, 7:].any()
        assert cache[1, :MiB].tobytes() == blocks["i:1"]
        assert wide.tobytes()[: 2 * MiB + 3] == blocks["i:2"]
        assert spare == b"\xff" * (3 * MiB)  # a miss leaves its buffer alone
        with pytest.raises(ValueError, match="does not fit"):
            await kv.get_many_into(["i:1"], [bytearray(MiB - 1)])
        with pytest.raises(ValueError, match="writable"):
            await kv.get_many_into(["i:0"], [b"read-only bytes"])
        with pytest.raises(ValueError, match="buffers"):
            await kv.get_many_into(["i:0", "i:1"], [bytearray(8)])
        # The lease of the refused read was released with the next call: nothing stays pinned.
        assert await kv.get_many(["i:0"]) == [blocks["i:0"]]


async def test_get_many_into_over_http_without_shm(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, shm=False) as gw, KVGateClient(gw.url) as kv:
        await kv.put("h", b"over http")
        out = bytearray(16)
        assert await kv.get_many_into(["h", "none"], [out, bytearray(1)]) == [9, None]
        assert not kv.uses_shm and out[:9] == b"over http"


@pytest.mark.parametrize("shm", [True, False], ids=["shm", "http"])
async def test_get_many_into_torch_tensors(tmp_path: Path, shm: bool) -> None:
    """A serving engine's own cache pages are tensors: filled in place, byte for byte, whatever
    their dtype, through shared memory or (without it) from the HTTP bodies."""
    blocks = {"t:0": payload("t:0", MiB), "t:1": payload("t:1", 70_001)}
    async with running_gateway(tmp_path, shm=shm) as gw, KVGateClient(gw.url) as kv:
        await kv.put_many(blocks)
        pages = torch.zeros(2 * MiB, dtype=torch.uint8)
        wide = torch.zeros(MiB, dtype=torch.bfloat16)  # 2 MiB of bytes
        assert await kv.get_many_into([*blocks], [pages, wide]) == [MiB, 70_001]
        assert kv.uses_shm is shm
        assert pages[:MiB].numpy().tobytes() == blocks["t:0"] and not pages[MiB:].any()
        assert wide.view(torch.uint8)[:70_001].numpy().tobytes() == blocks["t:1"]
        with pytest.raises(ValueError, match="contiguous"):
            await kv.get_many_into(["t:0"], [torch.zeros(4, MiB, dtype=torch.uint8).t()])
        with pytest.raises(ValueError, match="does not fit"):
            await kv.get_many_into(["t:0"], [torch.zeros(MiB - 1, dtype=torch.uint8)])


async def test_shm_serves_disk_blocks_through_staging(gateway: RunningGateway) -> None:
    keys = [f"d:{i}" for i in range(30)]  # 30 MiB: more than hbm + dram hold
    async with KVGateClient(gateway.url) as kv:
        await kv.put_many({k: payload(k, MiB) for k in keys})
        await gateway.hierarchy.quiesce()
        tiers = {gateway.hierarchy.locate(f"default/{k}") for k in keys}
        assert "disk" in tiers
        got = await kv.get_many(keys)
        assert got == [payload(k, MiB) for k in keys]


async def test_client_falls_back_to_http_without_shm(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, shm=False) as gw, KVGateClient(gw.url) as kv:
        data = {"a": payload("a", 70_000), "b": payload("b", 10)}
        assert [s for _, s in await kv.put_many(data)] == [201, 201]
        assert await kv.get_many(["a", "b", "c"]) == [data["a"], data["b"], None]
        assert not kv.uses_shm
        assert kv.shm_fallback_reason is not None


async def test_client_falls_back_when_segments_cannot_be_mapped(
    gateway: RunningGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.shm_client as shm_client

    def refuse(info: object) -> object:
        raise PermissionError("not for you")

    monkeypatch.setattr(shm_client, "open_segment", refuse)
    async with KVGateClient(gateway.url) as kv:
        await kv.put("k", b"bytes over http")
        assert await kv.get_many(["k"]) == [b"bytes over http"]
        assert not kv.uses_shm
        assert "not for you" in (kv.shm_fallback_reason or "")


async def test_non_loopback_url_never_tries_shm() -> None:
    kv = KVGateClient("http://10.1.2.3:8080")
    assert await kv._shm_session() is None  # no request made: nothing listens there
    await kv.close()


async def _attach(http: aiohttp.ClientSession, url: str, token: str | None = None) -> str:
    return (await _attach_mapped(http, url, token)).id


async def _attach_mapped(
    http: aiohttp.ClientSession, url: str, token: str | None = None
) -> ShmSession:
    """Attach, check the segment files are private, and map what the answer advertises (an
    HBM arena on a GPU host is a CUDA IPC segment, not a file)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.post(f"{url}/v1/shm/attach", json={}, headers=headers) as resp:
        assert resp.status == 201
        body = await resp.json()
    for seg in body["segments"]:
        if seg["kind"] == "file":
            assert stat.S_IMODE(os.stat(seg["path"]).st_mode) == 0o600
    # A private session's descriptor comes from the gateway, which runs on this event loop.
    return await asyncio.to_thread(ShmSession.from_attach, body)


async def test_a_read_lease_pins_the_pages_until_released(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    data = payload("p", MiB)
    await http.put(gateway.block_url("p"), data=data)
    mapped = await _attach_mapped(http, gateway.url)
    session = mapped.id
    async with http.post(
        f"{gateway.url}/v1/shm/get", json={"session": session, "keys": ["p"]}
    ) as resp:
        answer = await resp.json()
    item = answer["items"][0]
    # Delete it and flood both arenas with other blocks: the lent pages must not be reused.
    async with http.delete(gateway.block_url("p")) as resp:
        assert resp.status == 204
    for i in range(30):
        await http.put(gateway.block_url(f"flood:{i}"), data=payload(f"flood:{i}", MiB))
    assert mapped.read(item["segment"], item["runs"]) == data
    mapped.close()
    exchange = gateway.app[SHM]
    assert exchange.active_leases == 1
    async with http.post(
        f"{gateway.url}/v1/shm/release", json={"session": session, "leases": [answer["lease"]]}
    ) as resp:
        assert (await resp.json())["released"] == 1
    assert exchange.active_leases == 0
    assert all(t.pinned_blocks == 0 for t in gateway.hierarchy.tiers if isinstance(t, ArenaTier))


async def test_an_expired_read_lease_frees_the_pages(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    await http.put(gateway.block_url("e"), data=payload("e", MiB))
    session = await _attach(http, gateway.url)
    async with http.post(
        f"{gateway.url}/v1/shm/get", json={"session": session, "keys": ["e"], "ttl_ms": 1000}
    ) as resp:
        assert (await resp.json())["lease"] is not None
    async with http.delete(gateway.block_url("e")) as resp:
        assert resp.status == 204
    hbm = gateway.hierarchy.tiers[0]
    assert isinstance(hbm, ArenaTier)
    assert hbm.pinned_blocks == 1
    exchange = gateway.app[SHM]
    gateway.clock.advance(0.5)
    assert exchange.sweep() == 0
    assert hbm.pinned_blocks == 1
    gateway.clock.advance(0.6)
    assert exchange.sweep() == 1
    assert hbm.pinned_blocks == 0
    assert hbm.stats().used_bytes == 0


async def test_tenants_only_get_descriptors_for_their_own_blocks(tmp_path: Path) -> None:
    tenants = (tenant("alice", "alice-token"), tenant("bob", "bob-token"))
    async with (
        running_gateway(tmp_path, tenants=tenants) as gw,
        aiohttp.ClientSession() as http,
    ):
        alice_h = {"Authorization": "Bearer alice-token"}
        bob_h = {"Authorization": "Bearer bob-token"}
        await http.put(gw.block_url("secret"), data=b"alice only", headers=alice_h)
        alice = await _attach(http, gw.url, "alice-token")
        bob = await _attach(http, gw.url, "bob-token")
        url = f"{gw.url}/v1/shm/get"
        async with http.post(url, json={"session": bob, "keys": ["secret"]}, headers=bob_h) as r:
            assert (await r.json())["items"] == [{"key": "secret", "status": 404}]
        # Bob holding Alice's session id gets nothing either: it is not his session.
        async with http.post(url, json={"session": alice, "keys": ["secret"]}, headers=bob_h) as r:
            assert r.status == 404
        async with http.post(
            url, json={"session": alice, "keys": ["secret"]}, headers=alice_h
        ) as r:
            assert (await r.json())["items"][0]["status"] == 200
        async with http.post(f"{gw.url}/v1/shm/attach", json={}) as r:
            assert r.status == 401


async def test_shm_writes_count_against_the_tenant_quota(tmp_path: Path) -> None:
    alice = TenantConfig("alice", hashlib.sha256(b"alice-token").hexdigest(), quota_bytes=MiB)
    async with (
        running_gateway(tmp_path, tenants=(alice,)) as gw,
        KVGateClient(gw.url, token="alice-token") as kv,
    ):
        results = await kv.put_many({"a": payload("a", 600_000), "b": payload("b", 600_000)})
        assert kv.uses_shm
        assert results == [("a", 201), ("b", 201)]
        # Over her quota the tenant's own coldest block makes room, as for an HTTP PUT.
        assert await kv.get("a") is None
        assert await kv.get("b") == payload("b", 600_000)
        assert gw.hierarchy.tenant_bytes("alice") <= MiB


async def test_shm_rejects_malformed_control_calls(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    session = await _attach(http, gateway.url)
    url = gateway.url
    cases = [
        ("/v1/shm/get", {"session": session, "keys": "x"}, 400),
        ("/v1/shm/get", {"session": session, "keys": ["bad key"]}, 400),
        ("/v1/shm/get", {"session": "nope", "keys": ["k"]}, 404),
        ("/v1/shm/get", {"session": session, "keys": ["k"], "ttl_ms": -1}, 400),
        ("/v1/shm/reserve", {"session": session, "sizes": [-1]}, 400),
        ("/v1/shm/reserve", {"session": session, "sizes": [10 * MiB]}, 413),
        ("/v1/shm/reserve", {"session": session, "sizes": [4 * MiB] * 17}, 413),
        ("/v1/shm/commit", {"session": session, "lease": "nope", "keys": ["k"]}, 404),
        ("/v1/shm/release", {"session": session}, 400),
    ]
    for path, body, status in cases:
        async with http.post(url + path, json=body) as resp:
            assert resp.status == status, (path, body)
            assert "error" in await resp.json()


# -- zero-copy HTTP GET ----------------------------------------------------------------------


async def test_get_of_a_block_without_host_views_is_one_read_under_its_pin(
    gateway: RunningGateway, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GPU arena's pages have no host view: GET copies them out under the pin it already
    holds, counting one hit (a second lookup would count the read twice to the policy)."""
    from tiers.memory import ArenaPin

    monkeypatch.setattr(ArenaPin, "views", lambda self: None)
    data = payload("gpu-like", MiB)
    await http.put(gateway.block_url("gpu-like"), data=data)
    hbm = gateway.hierarchy.tiers[0]
    assert isinstance(hbm, ArenaTier)
    hits = hbm.stats().hits
    async with http.get(gateway.block_url("gpu-like")) as resp:
        assert resp.status == 200 and await resp.read() == data
        assert resp.headers["X-KV-Tier"] == "hbm"
    assert hbm.stats().hits == hits + 1
    assert hbm.pinned_blocks == 0


async def test_zero_copy_get_is_correct_under_concurrent_eviction(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    keys = [f"z:{i}" for i in range(12)]
    for key in keys:
        await http.put(gateway.block_url(key), data=payload(key, MiB))

    async def reader(n: int) -> int:
        checked = 0
        for i in range(n):
            key = keys[i % len(keys)]
            async with http.get(gateway.block_url(key)) as resp:
                if resp.status == 404:
                    continue
                body = await resp.read()
                assert body == payload(key, MiB)
                assert resp.headers["ETag"] == f'"{digest(body).hex()}"'
                checked += 1
        return checked

    async def churner() -> None:
        # Fresh blocks push the readers' blocks down the tiers (and their pages to new owners);
        # deletes free pages that readers may still be writing to the socket.
        for i in range(40):
            key = f"churn:{i}"
            await http.put(gateway.block_url(key), data=payload(key, MiB))
            if i % 3 == 0:
                await http.delete(gateway.block_url(keys[i % len(keys)]))
                await http.put(
                    gateway.block_url(keys[i % len(keys)]), data=payload(keys[i % len(keys)], MiB)
                )

    results = await asyncio.gather(*(reader(30) for _ in range(6)), churner())
    assert sum(r for r in results if isinstance(r, int)) > 0
    await gateway.hierarchy.quiesce()
    assert all(t.pinned_blocks == 0 for t in gateway.hierarchy.tiers if isinstance(t, ArenaTier))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
async def test_cuda_ipc_descriptor_round_trip(gateway: RunningGateway) -> None:
    """On a GPU host the HBM arena is advertised by CUDA IPC handle; a client in the gateway's
    own process (where CUDA refuses its own handles) reads the arena directly."""
    data = payload("gpu", MiB)
    async with KVGateClient(gateway.url) as kv:
        await kv.put("gpu", data)
        hbm = gateway.hierarchy.tiers[0]
        assert isinstance(hbm, ArenaTier)
        info = hbm.shared_segment()
        assert info is not None and info.kind == "cuda_ipc"
        assert gateway.hierarchy.locate("default/gpu") == "hbm"
        assert await kv.get_many(["gpu"]) == [data]
        assert kv.uses_shm
        dest = torch.zeros(2 * MiB, dtype=torch.uint8, device="cuda")
        assert await kv.get_many_into(["gpu"], [dest]) == [MiB]
        assert dest[:MiB].cpu().numpy().tobytes() == data and not dest[MiB:].any()


def test_own_process_cuda_arenas_are_found_by_handle_and_offset() -> None:
    """Two arenas carved from one CUDA allocation share its IPC memory handle: the offset tells
    them apart. Entries go with their arenas."""
    from tiers.shmseg import local_cuda, register_local_cuda

    handle = b"\x01" * 64
    first, second = torch.zeros(4), torch.zeros(4)
    register_local_cuda((0, handle, 16, 0, b"rc", 0, b"ev", True), first)
    register_local_cuda((0, handle, 16, 4096, b"rc", 1, b"ev", True), second)
    assert local_cuda((0, handle, 16, 0, b"other", 9, b"ev", True)) is first
    assert local_cuda((0, handle, 16, 4096, b"rc", 1, b"ev", True)) is second
    assert local_cuda((0, b"\x02" * 64, 16, 0, b"rc", 0, b"ev", True)) is None
    del first
    assert local_cuda((0, handle, 16, 0, b"rc", 0, b"ev", True)) is None


REPO_ROOT = Path(__file__).resolve().parents[1]
_IPC_READER = """
import asyncio, hashlib, json, sys
import torch
from gateway.client import KVGateClient

async def main() -> None:
    url, keys = sys.argv[1], sys.argv[2:]
    async with KVGateClient(url) as kv:
        got = await kv.get_many(keys)
        dest = [torch.zeros(2 << 20, dtype=torch.uint8, device="cuda") for _ in keys]
        sizes = await kv.get_many_into(keys, dest)
        into = [d[:n].cpu().numpy().tobytes() for d, n in zip(dest, sizes)]
        print(json.dumps({
            "shm": kv.uses_shm,
            "reason": kv.shm_fallback_reason,
            "get": [hashlib.sha256(b).hexdigest() for b in got],
            "into": [hashlib.sha256(b).hexdigest() for b in into],
        }))

asyncio.run(main())
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
async def test_cuda_ipc_reader_in_another_process(gateway: RunningGateway) -> None:
    """The real same-host case: another process opens the HBM arena by its CUDA IPC handle and
    copies blocks out of it, to host bytes and device to device into its own tensors."""
    keys = [f"ipc:{i}" for i in range(4)]
    async with KVGateClient(gateway.url, shm=False) as kv:
        for key in keys:
            await kv.put(key, payload(key, MiB))
    assert {gateway.hierarchy.locate(f"default/{k}") for k in keys} == {"hbm"}
    env = subprocess_env(REPO_ROOT)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _IPC_READER,
        gateway.url,
        *keys,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["shm"], result["reason"]
    want = [hashlib.sha256(payload(k, MiB)).hexdigest() for k in keys]
    assert result["get"] == want
    assert result["into"] == want
    await gateway.hierarchy.quiesce()
    hbm = gateway.hierarchy.tiers[0]
    assert isinstance(hbm, ArenaTier) and hbm.pinned_blocks == 0


async def test_shutdown_unlinks_the_arena_files_before_the_tiers_close(tmp_path: Path) -> None:
    async with running_gateway(tmp_path) as gw:
        paths = [s.path for s in gw.app[SHM].arena_segments if s.kind == "file"]
        assert paths
        gw.app[SHM].close()  # what the app's teardown does first
        for path in paths:
            with pytest.raises(FileNotFoundError):
                read_runs(path, ())


def test_segments_of_dead_gateways_are_swept(tmp_path: Path) -> None:
    stale = tmp_path / "kvgate-999999999-0123456789abcdef-dram"  # no such pid
    stale.write_bytes(b"x")
    live = ShmSegment.create("hbm", 4096, directory=tmp_path)
    try:
        from tiers.shmseg import sweep_stale

        assert sweep_stale(tmp_path) == 1
        assert not stale.exists()
        assert live.path.exists()
    finally:
        live.close()


async def test_a_lease_that_expires_while_its_commit_runs_is_not_freed_under_it(
    tmp_path: Path,
) -> None:
    """The deadline, a release or a detach during a commit used to free the regions being read
    (another reserve could reuse them) and end the commit in a 500."""
    from gateway.shm import ShmExchange, ShmSettings
    from tiers.clock import FakeClock

    clock = FakeClock()
    settings = ShmSettings(
        directory=tmp_path, staging_bytes=MiB, lease_ms=100, max_block_bytes=MiB, max_keys=64
    )
    exchange = ShmExchange(settings, clock=clock)
    try:
        session = exchange.attach("default")
        lease = exchange.reserve(session, [70_000] * 4, ttl_ms=100)
        staging = memoryview(session.staging.buffer)  # what the client writes into
        for i, (_, runs) in enumerate(lease.reserved):
            for a, b in runs:
                staging[a:b] = bytes([i + 1]) * (b - a)
        staging.release()
        stored: dict[str, bytes] = {}

        async def put(key: str, block: Block) -> dict[str, object]:
            if not stored:  # mid-commit: the deadline passes, the client releases, reserves
                clock.advance(1.0)
                assert exchange.sweep() == 0
                assert exchange.release(session, [lease.id]) == 0
                other = exchange.reserve(session, [70_000] * 4, ttl_ms=100)
                exchange.release(session, [other.id])
            stored[key] = bytes(block.data)
            await asyncio.sleep(0)
            return {"key": key, "status": 201}

        results = await exchange.commit(
            lease, ["a", "b", "c", "d"], put, dtype=None, expires_at=None
        )
        assert [r["status"] for r in results] == [201] * 4
        assert stored == {k: bytes([i + 1]) * 70_000 for i, k in enumerate("abcd")}
        assert not exchange._leases  # the commit ended its lease
    finally:
        exchange.close()


async def test_concurrent_first_reads_all_wait_for_the_one_attach(gateway: RunningGateway) -> None:
    """The first shared-memory call attaches; calls made meanwhile used to go over HTTP."""
    blocks = {f"c:{i}": payload(f"c:{i}", 70_000) for i in range(4)}
    async with KVGateClient(gateway.url) as writer:
        await writer.put_many(blocks)
    async with KVGateClient(gateway.url) as kv:
        over_http: list[object] = []
        batch_get = kv.batch_get

        async def counted(keys: list[str]) -> object:
            over_http.append(keys)
            return await batch_get(keys)

        kv.batch_get = counted  # type: ignore[method-assign,assignment]
        got = await asyncio.gather(*(kv.get_many([key]) for key in blocks))
        assert got == [[data] for data in blocks.values()]
        assert kv.uses_shm
        assert over_http == []


async def test_a_lease_is_not_swept_while_its_get_is_filling_it(tmp_path: Path) -> None:
    """A get awaits the tiers between keys; a sweep then (its deadline passed, or another
    call's sweep) used to end the lease half filled, releasing the pins already taken."""
    from gateway.shm import ShmExchange, ShmSettings
    from tiers.base import HeldBlock
    from tiers.clock import FakeClock
    from tiers.hierarchy import Hierarchy, PinnedHit

    clock = FakeClock()
    settings = ShmSettings(
        directory=tmp_path, staging_bytes=MiB, lease_ms=100, max_block_bytes=MiB, max_keys=64
    )
    exchange = ShmExchange(settings, clock=clock)
    data = {k: payload(k, 70_000) for k in ("a", "b")}

    class SlowStore:
        async def get_pinned(self, key: str) -> PinnedHit:
            if key == "b":  # between the two keys the deadline passes and a sweep runs
                clock.advance(1.0)
                assert exchange.sweep() == 0
                await asyncio.sleep(0)
            return PinnedHit(HeldBlock(Block.of(data[key])), "dram")

    try:
        session = exchange.attach("default")
        store = cast(Hierarchy, SlowStore())
        lease, items = await exchange.get(session, ["a", "b"], ["a", "b"], store, ttl_ms=100)
        assert exchange.active_leases == 1
        assert len(lease.staged) == 2
        staging = bytes(session.staging.buffer)
        for item, key in zip(items, ("a", "b"), strict=True):
            (offset, length), *rest = item["runs"]  # type: ignore[misc]
            assert not rest
            assert staging[offset : offset + length] == data[key]
        # Both regions still belong to the lease: a new allocation does not reuse them.
        other = exchange.reserve(session, [70_000], ttl_ms=100)
        taken = {a for runs in lease.staged for a, _ in runs}
        assert not taken & {a for _, runs in other.reserved for a, _ in runs}
        clock.advance(1.0)
        assert exchange.sweep() == 2  # once filled it expires as any lease
    finally:
        exchange.close()


async def test_a_get_that_fails_midway_ends_its_lease(tmp_path: Path) -> None:
    """A tier error on one key raises (the gateway answers it); the half-filled lease, whose id
    no client ever sees, is ended at once instead of holding staging space until it expires."""
    from gateway.shm import ShmExchange, ShmSettings
    from tiers.base import HeldBlock
    from tiers.clock import FakeClock
    from tiers.hierarchy import Hierarchy, PinnedHit

    clock = FakeClock()
    settings = ShmSettings(
        directory=tmp_path, staging_bytes=MiB, lease_ms=100, max_block_bytes=MiB, max_keys=64
    )
    exchange = ShmExchange(settings, clock=clock)

    class FailingStore:
        async def get_pinned(self, key: str) -> PinnedHit:
            if key == "b":
                raise RuntimeError("tier failed")
            return PinnedHit(HeldBlock(Block.of(b"x" * 70_000)), "dram")

    try:
        session = exchange.attach("default")
        with pytest.raises(RuntimeError, match="tier failed"):
            await exchange.get(
                session, ["a", "b"], ["a", "b"], cast(Hierarchy, FailingStore()), ttl_ms=100
            )
        assert exchange.active_leases == 0
        whole = exchange.reserve(session, [session.staging.size], ttl_ms=100)  # all of it free
        assert whole.reserved
    finally:
        exchange.close()
