"""Private shared-memory sessions (``shm_isolation``): with tenants configured a session maps no
arena and no named file, only its own sealed staging segment, handed over as a descriptor."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from gateway.client import KVGateClient
from gateway.config import ConfigError, GatewayConfig, TenantConfig, validate
from gateway.errors import Unavailable
from gateway.fdpass import TICKET_TTL_S, FdHandoff, HandoffError, receive_fd
from gateway.shm import SHM, ShmExchange, ShmSettings
from gateway.shm_client import ShmSession
from tests.conftest import running_gateway, subprocess_env
from tiers.clock import FakeClock
from tiers.shmseg import ShmSegment

ROOT = Path(__file__).resolve().parents[1]
KiB = 1024
MiB = 1024 * KiB


def tenant(name: str, token: str) -> TenantConfig:
    return TenantConfig(name, hashlib.sha256(token.encode()).hexdigest())


TENANTS = (tenant("alice", "alice-token"), tenant("bob", "bob-token"))


def blob(key: str, size: int) -> bytes:
    seed = hashlib.sha256(key.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


async def attach(http: aiohttp.ClientSession, url: str, token: str) -> dict[str, object]:
    headers = {"Authorization": f"Bearer {token}"}
    async with http.post(f"{url}/v1/shm/attach", json={}, headers=headers) as resp:
        assert resp.status == 201
        body: dict[str, object] = await resp.json()
        return body


def shm_files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


async def test_a_tenant_session_maps_no_arena_and_no_named_segment(tmp_path: Path) -> None:
    shm_dir = tmp_path / "shm"
    shm_dir.mkdir()
    async with (
        running_gateway(tmp_path / "data", tenants=TENANTS, shm_dir=str(shm_dir)) as gw,
        aiohttp.ClientSession() as http,
    ):
        alice_h = {"Authorization": "Bearer alice-token"}
        data = blob("secret", 300 * KiB)
        async with http.put(gw.block_url("secret"), data=data, headers=alice_h) as resp:
            assert resp.status == 201
        arenas = {seg.name for seg in gw.app[SHM].arena_segments}
        assert arenas  # the arenas are in shared memory: the gateway could have offered them
        before = shm_files(shm_dir)
        body = await attach(http, gw.url, "alice-token")
        segments = body["segments"]
        assert isinstance(segments, list) and len(segments) == 1
        (staging,) = segments
        assert staging["kind"] == "fd" and staging["writable"] is True
        assert staging["name"] not in arenas
        assert shm_files(shm_dir) == before  # the staging segment has no name to open
        mapped = await asyncio.to_thread(ShmSession.from_attach, body)
        try:
            async with http.post(
                f"{gw.url}/v1/shm/get",
                json={"session": body["session"], "keys": ["secret"]},
                headers=alice_h,
            ) as resp:
                (item,) = (await resp.json())["items"]
            # The block sits in an arena, yet the read is a copy into the session's own segment.
            assert item["status"] == 200 and item["segment"] == staging["name"]
            assert mapped.read(item["segment"], item["runs"]) == data
        finally:
            mapped.close()


async def test_tenant_clients_put_and_get_through_private_sessions(tmp_path: Path) -> None:
    async with (
        running_gateway(tmp_path, tenants=TENANTS) as gw,
        KVGateClient(gw.url, token="alice-token") as alice,
        KVGateClient(gw.url, token="bob-token") as bob,
    ):
        blocks = {f"k{i}": blob(f"a{i}", 200 * KiB + i) for i in range(4)}
        assert await alice.put_many(blocks) == [(k, 201) for k in blocks]
        assert alice.uses_shm, alice.shm_fallback_reason
        assert await alice.get_many(list(blocks)) == list(blocks.values())
        assert await bob.get_many(["k0"]) == [None]
        assert bob.uses_shm, bob.shm_fallback_reason


def test_a_ticket_is_redeemed_once_and_not_after_it_expires() -> None:
    clock = FakeClock()
    handoff = FdHandoff(Path("/nonexistent"), clock=clock)
    ticket = handoff.issue(lambda: 7)
    assert handoff.redeem("not-a-ticket") is None
    assert handoff.redeem(ticket) == 7
    assert handoff.redeem(ticket) is None
    late = handoff.issue(lambda: 7)
    clock.advance(TICKET_TTL_S)
    assert handoff.redeem(late) is None
    assert handoff.pending == 0
    gone = handoff.issue(lambda: -1)  # the session closed before its client came
    assert handoff.redeem(gone) is None


async def test_the_socket_hands_the_descriptor_only_for_a_live_ticket(tmp_path: Path) -> None:
    segment = ShmSegment.create_private("staging", 64 * KiB)
    handoff = FdHandoff(tmp_path, clock=FakeClock())
    await handoff.start()
    try:
        ticket = handoff.issue(lambda: segment.fd)
        with pytest.raises(HandoffError, match="refused"):
            await asyncio.to_thread(receive_fd, str(handoff.path), "forged")
        fd = await asyncio.to_thread(receive_fd, str(handoff.path), ticket)
        try:
            assert os.fstat(fd).st_size == 64 * KiB
            segment.buffer[:5] = b"hello"
            assert os.pread(fd, 5, 0) == b"hello"  # the very same memory
            # Sealed: the client can neither shrink it under the gateway (SIGBUS there) nor grow it.
            for size in (0, 128 * KiB):
                with pytest.raises(PermissionError):
                    os.ftruncate(fd, size)
        finally:
            os.close(fd)
        with pytest.raises(HandoffError):  # redeemed already
            await asyncio.to_thread(receive_fd, str(handoff.path), ticket)
    finally:
        await handoff.close()
        segment.close()
    assert not handoff.path.exists()


def test_one_tenant_cannot_take_every_session(tmp_path: Path) -> None:
    settings = ShmSettings(
        directory=tmp_path,
        staging_bytes=64 * KiB,
        lease_ms=1000,
        max_block_bytes=MiB,
        max_keys=16,
        max_tenant_sessions=2,
    )
    exchange = ShmExchange(
        settings, clock=FakeClock(), handoff=FdHandoff(tmp_path, clock=FakeClock())
    )
    try:
        exchange.attach("alice")
        exchange.attach("alice")
        with pytest.raises(Unavailable, match="its most"):
            exchange.attach("alice")
        exchange.attach("bob")
    finally:
        exchange.close()


def test_shm_isolation_setting() -> None:
    assert not GatewayConfig().shm_private
    assert GatewayConfig(tenants=TENANTS).shm_private
    assert not GatewayConfig(tenants=TENANTS, shm_isolation="shared").shm_private
    assert GatewayConfig(shm_isolation="private").shm_private
    with pytest.raises(ConfigError, match="shm_isolation"):
        validate(GatewayConfig(shm_isolation="open"))


async def test_shared_isolation_with_tenants_is_explicit_and_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="kvgate.shm"):
        async with (
            running_gateway(tmp_path, tenants=TENANTS, shm_isolation="shared") as gw,
            aiohttp.ClientSession() as http,
        ):
            body = await attach(http, gw.url, "alice-token")
            kinds = [seg["kind"] for seg in body["segments"]]  # type: ignore[union-attr]
            assert kinds.count("file") >= 2  # the arena(s) and the staging file
    assert "all tenants' blocks" in caplog.text


_OTHER_UID_CLIENT = """
import asyncio, json, os, sys
from gateway.client import KVGateClient
import concurrent.futures.thread, gateway.shm_client, gateway.fdpass, tiers.shmseg  # noqa: E401
# imported as root (the interpreter lives under /root), then drop to nobody
os.setgid(65534)
os.setuid(65534)
url, arena = sys.argv[1], sys.argv[2]

async def main():
    out = {}
    try:
        open(arena, "rb")
        out["arena"] = "opened"
    except PermissionError:
        out["arena"] = "denied"
    async with KVGateClient(url, token="bob-token") as kv:
        out["put"] = await kv.put_many({"mine": b"b" * 100000})
        out["get"] = [len(v or b"") for v in await kv.get_many(["mine", "secret"])]
        out["shm"] = kv.uses_shm
        out["why"] = kv.shm_fallback_reason
    print(json.dumps(out))

asyncio.run(main())
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client under another uid")
async def test_a_client_of_another_uid_uses_its_own_segment_and_cannot_open_the_arena(
    tmp_path: Path,
) -> None:
    async with (
        running_gateway(tmp_path, tenants=TENANTS) as gw,
        aiohttp.ClientSession() as http,
    ):
        alice_h = {"Authorization": "Bearer alice-token"}
        await http.put(gw.block_url("secret"), data=blob("s", 50_000), headers=alice_h)
        arena = gw.app[SHM].arena_segments[0]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _OTHER_UID_CLIENT,
            gw.url,
            arena.path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=subprocess_env(ROOT),
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        result = json.loads(out)
    assert result["arena"] == "denied"
    assert result["shm"] is True, result["why"]
    assert result["put"] == [["mine", 201]]
    assert result["get"] == [100000, 0]  # alice's block is not bob's, under any key
