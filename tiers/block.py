"""The unit every tier stores: bytes plus a little metadata that travels with them."""

from __future__ import annotations

from dataclasses import dataclass

import xxhash

# Internal keys join the tenant and the client's key with a byte that client keys cannot
# contain (they match [A-Za-z0-9._:@-]), so two tenants' keys never collide in any tier.
TENANT_SEP = "/"
DEFAULT_TENANT = "default"


def scoped_key(tenant: str, key: str) -> str:
    return f"{tenant}{TENANT_SEP}{key}"


def client_key(scoped: str) -> str:
    """The key as its tenant's client named it: what messages back to that client may say."""
    tenant, sep, key = scoped.partition(TENANT_SEP)
    return key if sep else tenant


def tenant_of(scoped: str) -> str:
    """The tenant a scoped key belongs to; ``""`` for a key that is not scoped (where
    :func:`split_key` would take the whole key for the tenant)."""
    tenant, sep, _ = scoped.partition(TENANT_SEP)
    return tenant if sep else ""


def split_key(scoped: str) -> tuple[str, str]:
    tenant, _, key = scoped.partition(TENANT_SEP)
    return tenant, key


def digest(data: bytes | bytearray | memoryview) -> bytes:
    """xxh3-128 of the block bytes: the ETag and the disk checksum."""
    return xxhash.xxh3_128_digest(data)


def hasher() -> xxhash.xxh3_128:
    """:func:`digest` fed piece by piece (``update``, then ``digest``): the same value.

    A body hashed as it is received is hashed while its bytes are still in the CPU cache,
    at a fraction of the cost of hashing the whole block afterwards (docs/perf.md).
    """
    return xxhash.xxh3_128()


@dataclass(frozen=True, slots=True)
class BlockMeta:
    """What is known about a block besides its bytes.

    ``dtype``/``shape`` are optional hints from the writer (``X-KV-Dtype``/``X-KV-Shape``); the
    disk codec uses the dtype's width for byte-grouping. ``expires_at`` is wall-clock seconds
    (``X-KV-TTL``), ``None`` for no expiry.
    """

    size: int
    digest: bytes
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    expires_at: float | None = None

    @property
    def etag(self) -> str:
        return f'"{self.digest.hex()}"'

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


@dataclass(frozen=True, slots=True)
class Block:
    data: bytes | memoryview
    meta: BlockMeta

    @classmethod
    def of(
        cls,
        data: bytes | memoryview,
        *,
        dtype: str | None = None,
        shape: tuple[int, ...] | None = None,
        expires_at: float | None = None,
        known_digest: bytes | None = None,
    ) -> Block:
        """``known_digest``: :func:`digest` of ``data``, when the caller has it already (from
        :func:`hasher` while receiving); taken as given."""
        return cls(
            data,
            BlockMeta(
                size=len(data),
                digest=digest(data) if known_digest is None else known_digest,
                dtype=dtype,
                shape=shape,
                expires_at=expires_at,
            ),
        )
