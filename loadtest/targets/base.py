"""What a load-test target is: a small async byte store, plus optional capabilities.

Every target answers ``put``/``get``/``close``. Scenarios that need more ask for it with
``isinstance`` against the runtime-checkable capability protocols below (``SupportsLookup``,
``SupportsLeases``); a target without the capability is skipped for that scenario.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class TargetError(RuntimeError):
    """The target answered something no scenario expects (a 5xx, a protocol error)."""


class PutStatus(enum.Enum):
    STORED = "stored"
    EXISTS = "exists"  # first writer won already; nothing stored
    CONFLICT = "conflict"  # a lease held by someone else, or a stale lease token
    NO_ROOM = "no_room"


@dataclass(frozen=True, slots=True)
class GetResult:
    value: bytes | None
    """The bytes, or None on a miss."""
    tier: str
    """Which tier answered (kvgate's ``X-KV-Tier``); a peer answers with its own name."""


@dataclass(frozen=True, slots=True)
class Lease:
    lease_id: str
    token: str


class LeaseRefusal(enum.Enum):
    EXISTS = "exists"  # the block is stored already: read it
    HELD = "held"  # another writer holds the lease: wait for its commit


@runtime_checkable
class Target(Protocol):
    name: str

    async def put(self, key: str, value: bytes) -> PutStatus: ...

    async def get(self, key: str) -> GetResult: ...

    async def close(self) -> None: ...


@runtime_checkable
class SupportsLookup(Protocol):
    async def lookup(self, keys: Sequence[str]) -> int:
        """How many of ``keys``, from the first, are all present (the prefix hit count)."""
        ...


@runtime_checkable
class SupportsLeases(Protocol):
    async def acquire_lease(self, key: str, *, ttl_ms: int) -> Lease | LeaseRefusal: ...

    async def put_leased(self, key: str, value: bytes, *, token: str) -> PutStatus: ...

    async def get_waiting(self, key: str, *, wait_ms: int) -> GetResult:
        """A GET that waits up to ``wait_ms`` for an outstanding writer to commit."""
        ...

    async def release_lease(self, lease_id: str) -> None: ...
