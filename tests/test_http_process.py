"""The real CLI in a subprocess: graceful SIGTERM + restart, and SIGKILL under write load."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import torch

from tests.conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]
URL_RE = re.compile(r"kvgate serving on (http://[^\s;]+)")
SMALL = ["--hbm-bytes", "8MiB", "--dram-bytes", "16MiB", "--disk-bytes", "512MiB"]


def content(key: str, size: int, *, writer: int = 0) -> bytes:
    """Bytes derived from (key, writer): a reader can tell which write it got, or a torn one."""
    seed = hashlib.sha256(f"{key}|{writer}".encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


@dataclass
class Server:
    proc: asyncio.subprocess.Process
    url: str
    log: list[str] = field(default_factory=list)
    drain: asyncio.Task[None] | None = None
    logged: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def until_logged(self, text: str) -> None:
        async with self.logged:
            await asyncio.wait_for(
                self.logged.wait_for(lambda: any(text in line for line in self.log)), 60
            )

    async def wait(self) -> int:
        code = await asyncio.wait_for(self.proc.wait(), 60)
        if self.drain is not None:
            await self.drain
        return code


async def start_server(data_dir: Path, *extra: str) -> Server:
    env = subprocess_env(REPO, PYTHONUNBUFFERED="1")
    env = {k: v for k, v in env.items() if not k.startswith("KVGATE_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "serve",
        "--port",
        "0",
        "--data-dir",
        str(data_dir),
        *SMALL,
        *extra,
        cwd=REPO,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    log: list[str] = []
    while True:
        raw = await asyncio.wait_for(proc.stderr.readline(), 120)
        if not raw:
            raise AssertionError("server exited before serving:\n" + "".join(log))
        line = raw.decode(errors="replace")
        log.append(line)
        match = URL_RE.search(line)
        if match:
            break
    server = Server(proc, match.group(1), log)

    async def drain() -> None:
        assert proc.stderr is not None
        async for raw_line in proc.stderr:
            log.append(raw_line.decode(errors="replace"))
            async with server.logged:
                server.logged.notify_all()

    server.drain = asyncio.create_task(drain())
    return server


@contextlib.asynccontextmanager
async def serving(data_dir: Path, *extra: str) -> AsyncIterator[Server]:
    server = await start_server(data_dir, *extra)
    try:
        yield server
    finally:
        if server.proc.returncode is None:
            server.proc.kill()
            await server.wait()


async def test_sigterm_exits_0_and_a_restart_serves_every_block(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    blocks = {f"g:{i}": content(f"g:{i}", 64 * 1024 * (1 + i % 16)) for i in range(40)}
    async with serving(data_dir) as server:
        hbm_device = "cuda" if torch.cuda.is_available() else "cpu"
        assert any(f"tiers: hbm (device {hbm_device}" in line for line in server.log), server.log
        async with aiohttp.ClientSession() as http:
            for key, data in blocks.items():
                async with http.put(f"{server.url}/v1/blocks/{key}", data=data) as resp:
                    assert resp.status == 201
            async with http.get(f"{server.url}/v1/stats") as resp:
                tiers = {t["name"]: t["blocks"] for t in (await resp.json())["tiers"]}
            assert tiers["hbm"] > 0 and tiers["hbm"] < len(blocks)
        server.proc.send_signal(signal.SIGTERM)
        assert await server.wait() == 0, "".join(server.log)
        assert any("stopped cleanly" in line for line in server.log)

    async with serving(data_dir) as server, aiohttp.ClientSession() as http:
        for key, data in blocks.items():
            async with http.get(f"{server.url}/v1/blocks/{key}") as resp:
                assert resp.status == 200, key
                assert await resp.read() == data
        server.proc.send_signal(signal.SIGINT)
        assert await server.wait() == 0


@pytest.mark.parametrize("mode", ["--no-write-through", "--write-through"])
async def test_sigkill_under_write_load_leaves_no_torn_block(tmp_path: Path, mode: str) -> None:
    data_dir = tmp_path / "data"
    writers = 6
    per_writer = 40
    candidates: dict[str, set[bytes]] = {}
    acked: set[str] = set()
    enough = asyncio.Event()

    def plan(writer: int) -> list[tuple[str, bytes]]:
        writes = []
        for i in range(per_writer):
            # Every third key is contended: all writers race on it with their own bytes.
            key = f"shared:{i}" if i % 3 == 0 else f"w{writer}:{i}"
            data = content(key, 32 * 1024 * (1 + (i * 7 + writer) % 24), writer=writer)
            candidates.setdefault(key, set()).add(data)
            writes.append((key, data))
        return writes

    plans = [plan(w) for w in range(writers)]

    async def write(url: str, http: aiohttp.ClientSession, writes: list[tuple[str, bytes]]) -> None:
        for key, data in writes:
            try:
                async with http.put(f"{url}/v1/blocks/{key}", data=data) as resp:
                    assert resp.status in (200, 201)
                    acked.add(key)
            except (aiohttp.ClientError, ConnectionError):
                return  # the server is gone
            if len(acked) >= writers * per_writer // 3:
                enough.set()

    async with serving(data_dir, mode) as server, aiohttp.ClientSession() as http:
        tasks = [asyncio.create_task(write(server.url, http, p)) for p in plans]
        await asyncio.wait_for(enough.wait(), 120)
        server.proc.kill()  # SIGKILL, mid-write
        assert await server.wait() == -signal.SIGKILL
        await asyncio.gather(*tasks)
    assert 0 < len(acked) < len(candidates)

    async with serving(data_dir, mode) as server, aiohttp.ClientSession() as http:
        served = 0
        for key, options in candidates.items():
            async with http.get(f"{server.url}/v1/blocks/{key}") as resp:
                if resp.status == 404:
                    assert key not in acked or mode == "--no-write-through", key
                    continue
                assert resp.status == 200
                assert await resp.read() in options, f"{key}: torn or foreign bytes"
                served += 1
        assert served > 0  # blocks demoted (or written through) to disk survive
        if mode == "--write-through":
            assert served >= len(acked)
        server.proc.send_signal(signal.SIGTERM)
        assert await server.wait() == 0


def _half_sent(kind: str, body: bytes) -> tuple[bytes, bytes]:
    """A request as (what is sent before SIGTERM, the rest), asking for a ``100 Continue``."""
    if kind == "lease":
        head = (
            "POST /v1/leases HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        return head + body[:5], body[5:]
    if kind == "chunked":
        head = (
            b"PUT /v1/blocks/late HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        half = len(body) // 2
        first = b"%x\r\n%s\r\n" % (half, body[:half])
        rest = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body) - half, body[half:])
        return head + first, rest
    head = (
        "PUT /v1/blocks/late HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body[: len(body) // 2], body[len(body) // 2 :]


@pytest.mark.parametrize("kind", ["put-unlanded", "chunked", "lease"])
async def test_a_body_still_arriving_at_sigterm_is_answered(tmp_path: Path, kind: str) -> None:
    """aiohttp stops reading every connection at shutdown; the request in flight is finished."""
    data_dir = tmp_path / "data"
    extra: list[str] = []
    if kind == "put-unlanded":
        (tmp_path / "kvgate.toml").write_text("land_puts = false\n")
        extra = ["--config", str(tmp_path / "kvgate.toml")]
    body = b'{"key": "late", "ttl_ms": 30000}' if kind == "lease" else content("late", 4 << 20)
    first, rest = _half_sent(kind, body)
    async with serving(data_dir, *extra) as server:
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(first)
        await writer.drain()
        # The request is in progress once its handler is asked to read the body.
        assert (await asyncio.wait_for(reader.readline(), 30)).startswith(b"HTTP/1.1 100")
        assert await reader.readline() == b"\r\n"
        server.proc.send_signal(signal.SIGTERM)
        await server.until_logged("draining")
        writer.write(rest)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 30)
        writer.close()
        expected = (b"201", b"503") if kind == "lease" else (b"201",)
        assert status_line, "the request in flight got no answer"
        assert status_line.split(b" ")[1] in expected, status_line
        assert await server.wait() == 0, "".join(server.log)
    if kind == "lease":
        return
    async with serving(data_dir) as server, aiohttp.ClientSession() as http:
        async with http.get(f"{server.url}/v1/blocks/late") as resp:
            assert resp.status == 200
            assert await resp.read() == body
        server.proc.send_signal(signal.SIGTERM)
        assert await server.wait() == 0


@pytest.mark.parametrize("landed", [True, False])
async def test_a_body_unfinished_at_the_drain_deadline_gets_503(
    tmp_path: Path, landed: bool
) -> None:
    """A PUT body that never completes is answered at the deadline. Without that, a landed one
    (received past aiohttp's stream) waited out a second timeout and its connection was cut,
    and an ordinary one was cut without an answer."""
    body = content("slow", 8 << 20)
    head = f"PUT /v1/blocks/slow HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n\r\n"
    (tmp_path / "kvgate.toml").write_text(f"land_puts = {str(landed).lower()}\n")
    extra = ["--config", str(tmp_path / "kvgate.toml"), "--shutdown-timeout-s", "1"]
    async with serving(tmp_path / "data", *extra) as server:
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(head.encode() + body[: 1 << 20])
        await writer.drain()
        # One more round trip on another connection: by then the server has read the head.
        async with aiohttp.ClientSession() as http, http.get(f"{server.url}/healthz") as resp:
            assert resp.status == 200
        server.proc.send_signal(signal.SIGTERM)
        status_line = await asyncio.wait_for(reader.readline(), 30)
        writer.close()
        assert status_line, "the request in flight got no answer"
        assert status_line.split(b" ")[1] == b"503", status_line
        assert await server.wait() == 0, "".join(server.log)
        assert any("answered 503" in line for line in server.log) == landed


async def test_a_ram_only_server_says_so_and_spills_nothing_on_shutdown(tmp_path: Path) -> None:
    async with serving(tmp_path / "data", "--disk-bytes", "0") as server:
        await server.until_logged("no disk tier (disk_bytes = 0)")
        async with aiohttp.ClientSession() as http:
            async with http.put(f"{server.url}/v1/blocks/k", data=b"x" * 1000) as resp:
                assert resp.status == 201
            async with http.get(f"{server.url}/v1/stats") as resp:
                assert [t["name"] for t in (await resp.json())["tiers"]] == ["hbm", "dram"]
        server.proc.send_signal(signal.SIGTERM)
        assert await server.wait() == 0, "".join(server.log)
    text = "".join(server.log)
    assert "shutting down: finishing requests" in text and "spilling" not in text
    assert not (tmp_path / "data" / "blocks.lmdb").exists()
