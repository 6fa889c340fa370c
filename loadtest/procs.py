"""Servers the harness starts itself: each in its own process group, always stopped.

Every server binds to 127.0.0.1 on a free port and runs in a fresh session, so stopping it
kills the whole group (a server that forks helpers leaves nothing behind).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp


class ServerStartError(RuntimeError):
    """A server the harness started died or never became ready."""


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ManagedProcess:
    name: str
    proc: asyncio.subprocess.Process
    log_path: Path

    def log_tail(self, limit: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    async def stop(self, *, grace_s: float = 5.0) -> None:
        if self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), grace_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()


@contextlib.asynccontextmanager
async def managed(
    name: str,
    argv: Sequence[str],
    *,
    ready: Callable[[], Awaitable[bool]],
    workdir: Path,
    timeout_s: float = 30.0,
    env: dict[str, str] | None = None,
) -> AsyncIterator[ManagedProcess]:
    """Start ``argv`` in its own session, wait until ``ready()`` answers True, stop it on exit."""
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            cwd=workdir,
            env=env,
            start_new_session=True,
        )
    server = ManagedProcess(name, proc, log_path)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            if proc.returncode is not None:
                raise ServerStartError(
                    f"{name} exited with {proc.returncode}:\n{server.log_tail()}"
                )
            if await ready():
                break
            if loop.time() > deadline:
                raise ServerStartError(
                    f"{name} not ready after {timeout_s:.0f}s:\n{server.log_tail()}"
                )
            # Polling readiness of a child process is the one place a short sleep is right.
            await asyncio.sleep(0.05)
        yield server
    finally:
        await server.stop()


async def tcp_open(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def http_ok(url: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session,
                session.get(url) as resp,
            ):
                return resp.status == 200
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False

    return check


@contextlib.asynccontextmanager
async def scratch_dir(prefix: str) -> AsyncIterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- the servers ---------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def dict_server(*, max_bytes: int) -> AsyncIterator[str]:
    """The bare aiohttp dict server (loadtest.dict_server); yields its base URL."""
    port = free_port()
    async with (
        scratch_dir("kvgate-dict-") as tmp,
        managed(
            "dict-server",
            [
                sys.executable,
                "-m",
                "loadtest.dict_server",
                "--port",
                str(port),
                "--max-bytes",
                str(max_bytes),
            ],
            ready=http_ok(f"http://127.0.0.1:{port}/healthz"),
            workdir=tmp,
            env=_env_with_repo_on_path(),
        ),
    ):
        yield f"http://127.0.0.1:{port}"


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


@contextlib.asynccontextmanager
async def redis_server(*, max_bytes: int) -> AsyncIterator[str]:
    """redis-server on loopback, no persistence, LRU-bounded; yields a redis:// URL."""
    binary = redis_server_binary()
    if binary is None:
        raise ServerStartError("redis-server not found (scripts/peers.sh install)")
    port = free_port()
    argv = [
        binary,
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "yes",
        "--maxmemory",
        str(max_bytes),
        "--maxmemory-policy",
        "allkeys-lru",
        # 1 MiB values are over the default proto-max-bulk-len only from 512 MiB; the
        # client output buffer limit matters more: keep the normal class unlimited.
        "--client-output-buffer-limit",
        "normal 0 0 0",
    ]
    async with (
        scratch_dir("kvgate-redis-") as tmp,
        managed(
            "redis-server", [*argv, "--dir", str(tmp)], ready=lambda: tcp_open(port), workdir=tmp
        ),
    ):
        yield f"redis://127.0.0.1:{port}/0"


def mooncake_master_binary() -> str | None:
    # The pip package installs mooncake_master next to the interpreter.
    beside = Path(sys.executable).parent / "mooncake_master"
    if beside.exists():
        return str(beside)
    return shutil.which("mooncake_master")


@dataclass(frozen=True)
class MooncakeEndpoints:
    master_addr: str
    metadata_url: str


@contextlib.asynccontextmanager
async def mooncake_master() -> AsyncIterator[MooncakeEndpoints]:
    """mooncake_master on loopback with its built-in HTTP metadata server (no etcd)."""
    binary = mooncake_master_binary()
    if binary is None:
        raise ServerStartError("mooncake_master not found (scripts/peers.sh install)")
    rpc_port, meta_port, metrics_port = free_port(), free_port(), free_port()
    async with scratch_dir("kvgate-mooncake-") as tmp:
        argv = [
            binary,
            "--rpc_address=127.0.0.1",
            f"--rpc_port={rpc_port}",
            f"--metrics_port={metrics_port}",
            "--enable_http_metadata_server=true",
            "--http_metadata_server_host=127.0.0.1",
            f"--http_metadata_server_port={meta_port}",
            # A read leases the object for this long and blocks its eviction; the default
            # (10 s) makes a PUT-heavy run fill the segment and fail.
            "--default_kv_lease_ttl=200",
            "--logtostderr=true",
        ]

        async def ready() -> bool:
            return await tcp_open(rpc_port) and await tcp_open(meta_port)

        async with managed("mooncake-master", argv, ready=ready, workdir=tmp):
            yield MooncakeEndpoints(
                master_addr=f"127.0.0.1:{rpc_port}",
                metadata_url=f"http://127.0.0.1:{meta_port}/metadata",
            )


PREFAULT_WAIT_S = 30.0
"""How long a started kvgate may page its arenas in before the measurement starts anyway."""


@dataclass(frozen=True)
class KvgateSizes:
    hbm_bytes: str = "256MiB"
    dram_bytes: str = "512MiB"
    disk_bytes: str = "2GiB"


@contextlib.asynccontextmanager
async def kvgate_server(
    *,
    sizes: KvgateSizes,
    extra_args: Sequence[str] = (),
    settings: Mapping[str, str] | None = None,
    timeout_s: float = 60.0,
) -> AsyncIterator[str]:
    """``python -m gateway.cli serve`` on a free port with a scratch data dir; yields its URL.
    ``settings`` are extra ``KVGATE_*`` environment settings of that server only.

    It is ready once ``/readyz`` answers and its host arenas are paged in (the gateway logs
    that, tiers.arena ``prefault``): a measurement started earlier would share the CPU with the
    paging in."""
    port = free_port()
    async with scratch_dir("kvgate-serve-") as tmp:
        argv = [
            sys.executable,
            "-m",
            "gateway.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--data-dir",
            str(tmp / "data"),
            "--hbm-bytes",
            sizes.hbm_bytes,
            "--dram-bytes",
            sizes.dram_bytes,
            "--disk-bytes",
            sizes.disk_bytes,
            *extra_args,
        ]
        # Here, not at the top: tiers.arena brings torch, which most of the harness never needs.
        from gateway.config import load_config
        from tiers.arena import PREFAULT_ENDED

        serving = http_ok(f"http://127.0.0.1:{port}/readyz")
        # Read as the gateway reads its settings: the same names, the same spellings of false.
        prefault = load_config(environ=dict(settings or {})).prefault
        give_up_at: float | None = None

        async def ready() -> bool:
            nonlocal give_up_at
            if not await serving():
                return False
            if not prefault or PREFAULT_ENDED in (tmp / "kvgate.log").read_text(errors="replace"):
                return True
            now = asyncio.get_running_loop().time()
            give_up_at = give_up_at or now + PREFAULT_WAIT_S
            if now < give_up_at:
                return False
            print(
                f"warning: kvgate's arenas still paging in after {PREFAULT_WAIT_S:.0f} s; "
                "measuring anyway",
                file=sys.stderr,
            )
            return True

        async with managed(
            "kvgate",
            argv,
            ready=ready,
            workdir=tmp,
            timeout_s=timeout_s,
            env={**_env_with_repo_on_path(), **(settings or {})},
        ):
            yield f"http://127.0.0.1:{port}"


def _env_with_repo_on_path() -> dict[str, str]:
    """The child imports this checkout's packages whatever its working directory."""
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH", "")) if p)
    return env


def mooncake_client_binary() -> str | None:
    beside = Path(sys.executable).parent / "mooncake_client"
    if beside.exists():
        return str(beside)
    return shutil.which("mooncake_client")


@contextlib.asynccontextmanager
async def mooncake_segment_holder(
    endpoints: MooncakeEndpoints, *, segment_bytes: int
) -> AsyncIterator[None]:
    """A standalone ``mooncake_client`` process that contributes the store's memory, so the
    benchmark client's reads and writes cross a TCP hop instead of staying in-process."""
    binary = mooncake_client_binary()
    if binary is None:
        raise ServerStartError("mooncake_client not found (scripts/peers.sh install)")
    port = free_port()
    async with scratch_dir("kvgate-mooncake-client-") as tmp:
        argv = [
            binary,
            "--host=127.0.0.1",
            f"--port={port}",
            f"--global_segment_size={segment_bytes}",
            f"--master_server_address={endpoints.master_addr}",
            f"--metadata_server={endpoints.metadata_url}",
            "--protocol=tcp",
            "--logtostderr=true",
        ]
        async with managed(
            "mooncake-client", argv, ready=lambda: tcp_open(port), workdir=tmp, timeout_s=30
        ):
            yield
