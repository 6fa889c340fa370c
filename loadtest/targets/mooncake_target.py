"""Mooncake Store through its Python client (``MooncakeDistributedStore``), TCP transport.

The client is synchronous (pybind11); calls run on a thread pool sized to the workers, as
the package's own ``MooncakeDistributedStoreAsync`` does with the default executor.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from loadtest.targets.base import GetResult, PutStatus, TargetError

T = TypeVar("T")


def mooncake_available() -> bool:
    try:
        return importlib.util.find_spec("mooncake.store") is not None
    except ModuleNotFoundError:
        return False


class MooncakeTarget:
    def __init__(self, store: Any, pool: ThreadPoolExecutor, *, name: str = "mooncake") -> None:
        self.name = name
        self._store = store
        self._pool = pool

    @classmethod
    async def connect(
        cls,
        *,
        master_addr: str,
        metadata_url: str,
        concurrency: int,
        segment_bytes: int,
        buffer_bytes: int,
        name: str = "mooncake",
    ) -> MooncakeTarget:
        """``segment_bytes`` is the memory this client contributes to the store; 0 makes it a
        pure client of segments held elsewhere (a ``mooncake_client`` process)."""
        module: Any = importlib.import_module("mooncake.store")
        store = module.MooncakeDistributedStore()
        pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="mooncake")
        loop = asyncio.get_running_loop()
        rc = await loop.run_in_executor(
            pool,
            lambda: store.setup(
                "127.0.0.1", metadata_url, segment_bytes, buffer_bytes, "tcp", "", master_addr
            ),
        )
        if rc != 0:
            pool.shutdown(wait=False)
            raise TargetError(f"MooncakeDistributedStore.setup failed with {rc}")
        return cls(store, pool, name=name)

    async def _call(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    async def put(self, key: str, value: bytes) -> PutStatus:
        rc: int = await self._call(lambda: self._store.put(key, value))
        if rc != 0:
            # Mooncake answers a negative error code; a full segment is the usual one.
            return PutStatus.NO_ROOM
        return PutStatus.STORED

    async def get(self, key: str) -> GetResult:
        value: bytes = await self._call(lambda: self._store.get(key))
        # The client answers b"" for a miss; blocks are never empty here.
        return GetResult(value or None, self.name)

    async def lookup(self, keys: Sequence[str]) -> int:
        present: list[int] = await self._call(lambda: self._store.batch_is_exist(list(keys)))
        hits = 0
        for found in present:
            if found != 1:
                break
            hits += 1
        return hits

    async def close(self) -> None:
        await self._call(self._store.close)
        self._pool.shutdown(wait=True)
