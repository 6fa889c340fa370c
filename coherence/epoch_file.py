"""Fencing epochs in one small file: the :class:`~coherence.leases.TokenStore` of a gateway
with no disk tier (``disk_bytes = 0``), whose blocks do not outlive it but whose fencing tokens
must: a writer holding a token from before a restart must never find it valid again.

The file holds the last epoch handed out, as decimal text. Each epoch is made durable before it
is returned: written to a temporary file beside it, fsynced, renamed over it, and the directory
fsynced, so a crash leaves the old value or the new one, never a torn one. A file that cannot be
read as an epoch is refused (handing out epochs again from 1 would break fencing), as is one
that cannot be written.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import Executor
from pathlib import Path

from coherence.errors import CoherenceError

_MAX_BYTES = 64


class EpochFileError(CoherenceError):
    """The epoch file is unreadable or cannot be made durable."""


class FileTokenStore:
    def __init__(self, path: Path, *, executor: Executor | None = None) -> None:
        self.path = path
        self._executor = executor
        self._lock = asyncio.Lock()

    async def next_epoch(self) -> int:
        async with self._lock:  # one increment at a time: two would read the same value
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self._increment)

    def current(self) -> int:
        """The last epoch handed out (0 before the first)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise EpochFileError(f"cannot read the epoch file {self.path}: {exc}") from exc
        text = raw.decode("ascii", errors="replace").strip()
        if len(raw) > _MAX_BYTES or not text.isdigit():
            raise EpochFileError(
                f"the epoch file {self.path} does not hold an epoch ({raw[:_MAX_BYTES]!r}); "
                "fencing tokens cannot be handed out safely: restore it, or remove it only "
                "once no writer holds a token from this gateway"
            )
        return int(text)

    def _increment(self) -> int:
        epoch = self.current() + 1
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, f"{epoch}\n".encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise EpochFileError(f"cannot write the epoch file {self.path}: {exc}") from exc
        return epoch
