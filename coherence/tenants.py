"""Tenants: who is calling (bearer-token auth) and how many bytes they may keep (quota).

Tokens are never stored, only their SHA-256 (``token_sha256`` in the config). Authentication
hashes the presented token and compares the digest with *every* tenant's digest using
``hmac.compare_digest``, without stopping at a match, so the time taken says nothing about which
tenant (if any) the token belongs to.

With no tenants configured there is one tenant, ``tiers.block.DEFAULT_TENANT``, and no auth.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from coherence.errors import CoherenceConfigError, Forbidden, QuotaExceeded, Unauthorized
from tiers.block import DEFAULT_TENANT

_NAME = re.compile(r"[A-Za-z0-9._:@-]{1,64}")  # like a key: never contains tiers.block.TENANT_SEP
_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")
# RFC 6750 b64token, bounded so a huge header cannot make us hash megabytes.
_BEARER = re.compile(r"Bearer +([A-Za-z0-9._~+/-]{1,4096}=*) *", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    token_sha256: str  # lowercase hex SHA-256 of the bearer token; "" for the default tenant
    quota_bytes: int | None = None  # bytes over all tiers; None for no quota

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise CoherenceConfigError(f"tenant name {self.name!r} must match {_NAME.pattern}")
        if self.token_sha256 and not _HEX_SHA256.fullmatch(self.token_sha256):
            raise CoherenceConfigError(f"tenant {self.name}: token_sha256 must be 64 hex digits")
        if self.quota_bytes is not None and (
            isinstance(self.quota_bytes, bool)
            or not isinstance(self.quota_bytes, int)
            or self.quota_bytes < 0
        ):
            raise CoherenceConfigError(f"tenant {self.name}: quota_bytes must be an int >= 0")


DEFAULT = Tenant(DEFAULT_TENANT, "")


def hash_token(token: str) -> str:
    """The ``token_sha256`` to configure for a bearer token."""
    return hashlib.sha256(token.encode()).hexdigest()


def tenants_from_config(table: Mapping[str, object]) -> tuple[Tenant, ...]:
    """The ``[tenants.NAME]`` tables of the TOML config as tenants (raises on bad config)."""
    tenants = []
    for name, entry in table.items():
        if not isinstance(entry, Mapping):
            raise CoherenceConfigError(f"[tenants.{name}] must be a table")
        unknown = set(entry) - {"token_sha256", "quota_bytes"}
        if unknown:
            raise CoherenceConfigError(f"[tenants.{name}]: unknown keys {sorted(unknown)}")
        token = entry.get("token_sha256")
        if not isinstance(token, str) or not token:
            raise CoherenceConfigError(f"[tenants.{name}] needs token_sha256")
        quota = entry.get("quota_bytes")
        if quota is not None and (isinstance(quota, bool) or not isinstance(quota, int)):
            raise CoherenceConfigError(f"[tenants.{name}]: quota_bytes must be an integer")
        tenants.append(Tenant(str(name), token.lower(), quota))
    return tuple(tenants)


class TenantRegistry:
    """The configured tenants; with none, the default tenant and no authentication."""

    def __init__(self, tenants: Iterable[Tenant] = ()) -> None:
        self._tenants = tuple(tenants)
        self._by_name = {t.name: t for t in self._tenants}
        if len(self._by_name) != len(self._tenants):
            raise CoherenceConfigError("tenant names must be unique")
        if any(not t.token_sha256 for t in self._tenants):
            raise CoherenceConfigError("every configured tenant needs a token_sha256")
        if len({t.token_sha256 for t in self._tenants}) != len(self._tenants):
            raise CoherenceConfigError("two tenants share a token")
        self._digests = tuple((bytes.fromhex(t.token_sha256), t) for t in self._tenants)

    @property
    def auth_required(self) -> bool:
        return bool(self._tenants)

    @property
    def tenants(self) -> tuple[Tenant, ...]:
        return self._tenants or (DEFAULT,)

    def get(self, name: str) -> Tenant | None:
        if not self._tenants:
            return DEFAULT if name == DEFAULT.name else None
        return self._by_name.get(name)

    def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant an ``Authorization`` header names.

        Without tenants configured: the default tenant, whatever the header. Otherwise
        :class:`Unauthorized` (401) for a missing or malformed header, :class:`Forbidden` (403)
        for a well-formed bearer token that matches no tenant.
        """
        if not self._tenants:
            return DEFAULT
        if authorization is None:
            raise Unauthorized("an Authorization: Bearer token is required")
        match = _BEARER.fullmatch(authorization)
        if match is None:
            raise Unauthorized("the Authorization header must be 'Bearer <token>'")
        presented = hashlib.sha256(match.group(1).encode()).digest()
        found: Tenant | None = None
        for digest, tenant in self._digests:
            # Every digest is compared, match or not, so timing does not reveal which matched.
            if hmac.compare_digest(presented, digest):
                found = tenant
        if found is None:
            raise Forbidden("the bearer token matches no tenant")
        return found


# --- quota --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QuotaDecision:
    """How a put of ``incoming`` bytes fits the tenant's quota.

    ``evict_bytes`` is how much of the tenant's OWN data the hierarchy must evict first (0 when
    it fits as is); other tenants' blocks are never evicted on this tenant's account.
    """

    fits: bool
    evict_bytes: int


def plan_quota(
    tenant: Tenant, *, used_bytes: int, incoming_bytes: int, evictable_bytes: int | None = None
) -> QuotaDecision:
    """Whether a put of ``incoming_bytes`` fits ``tenant``'s quota given ``used_bytes`` now.

    ``evictable_bytes`` (default: all of ``used_bytes``) is how much of the tenant's data could
    be evicted now (pinned or leased blocks cannot). ``fits=False`` means no room now (507);
    :class:`QuotaExceeded` (507) means never, whatever is evicted.
    """
    if used_bytes < 0 or incoming_bytes < 0:
        raise ValueError("byte counts cannot be negative")
    quota = tenant.quota_bytes
    if quota is None:
        return QuotaDecision(True, 0)
    if incoming_bytes > quota:
        raise QuotaExceeded(
            f"a {incoming_bytes}-byte block can never fit tenant {tenant.name}'s {quota}-byte quota"
        )
    over = used_bytes + incoming_bytes - quota
    if over <= 0:
        return QuotaDecision(True, 0)
    evictable = used_bytes if evictable_bytes is None else min(evictable_bytes, used_bytes)
    return QuotaDecision(over <= evictable, over)
