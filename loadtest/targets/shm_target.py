"""kvgate through its same-host shared-memory data plane (``KVGateClient.get_many``/``put_many``).

The scenarios call ``get``/``put`` one key per worker; this target gathers the calls that are
waiting at the same moment into ``/v1/shm/get`` (or reserve + commit) calls of up to
``max_batch`` blocks each -- the batches serving frontends send when each loads a prefix's
blocks together -- so the per-call control cost is shared, while the bytes move by memcpy
through /dev/shm. The calls go out concurrently: with one call for every waiting worker, each
waits for all, and the gateway staging a batch and the client copying one out take turns
instead of overlapping (docs/benchmarks.md, "Batch size of the shared-memory calls").
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from gateway.client import KVGateClient
from loadtest.targets.base import GetResult, PutStatus, TargetError

_PUT_STATUS = {201: PutStatus.STORED, 200: PutStatus.EXISTS, 507: PutStatus.NO_ROOM}


class KvgateShmTarget:
    def __init__(
        self, base_url: str, *, concurrency: int, max_batch: int = 4, name: str = "kvgate-shm"
    ) -> None:
        self.name = name
        self._kv = KVGateClient(base_url, shm=True, max_connections=concurrency)
        self._max_batch = max_batch
        self._gets: list[tuple[str, asyncio.Future[bytes | None]]] = []
        self._puts: list[tuple[str, bytes, asyncio.Future[int]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def check(self) -> None:
        """Fail loudly when the shared-memory path is not in use (it would measure HTTP)."""
        await self._kv.get_many([])
        if not self._kv.uses_shm:
            raise TargetError(f"{self.name}: no shared memory: {self._kv.shm_fallback_reason}")

    async def get(self, key: str) -> GetResult:
        future: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self._gets.append((key, future))
        if len(self._gets) == 1:
            asyncio.get_running_loop().call_soon(self._flush_gets)
        value = await future
        return GetResult(value, "shm")

    async def put(self, key: str, value: bytes) -> PutStatus:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._puts.append((key, value, future))
        if len(self._puts) == 1:
            asyncio.get_running_loop().call_soon(self._flush_puts)
        status = await future
        try:
            return _PUT_STATUS[status]
        except KeyError:
            raise TargetError(f"kvgate-shm PUT {key}: status {status}") from None

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _flush_gets(self) -> None:
        while self._gets:
            batch, self._gets = self._gets[: self._max_batch], self._gets[self._max_batch :]
            self._spawn(self._run_gets(batch))

    def _flush_puts(self) -> None:
        while self._puts:
            batch, self._puts = self._puts[: self._max_batch], self._puts[self._max_batch :]
            self._spawn(self._run_puts(batch))

    async def _run_gets(self, batch: list[tuple[str, asyncio.Future[bytes | None]]]) -> None:
        try:
            values = await self._kv.get_many([key for key, _ in batch])
        except Exception as exc:  # every waiter sees the failure
            for _, future in batch:
                future.set_exception(exc)
            return
        for (_, future), value in zip(batch, values, strict=True):
            future.set_result(value)

    async def _run_puts(self, batch: list[tuple[str, bytes, asyncio.Future[int]]]) -> None:
        try:
            results = await self._kv.put_many([(key, value) for key, value, _ in batch])
        except Exception as exc:
            for _, _, future in batch:
                future.set_exception(exc)
            return
        for (_, _, future), (_, status) in zip(batch, results, strict=True):
            future.set_result(status)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._kv.close()
