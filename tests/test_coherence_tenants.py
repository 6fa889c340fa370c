"""Tenant authentication (401/403, constant-time comparison) and quota planning."""

from __future__ import annotations

import contextlib
import hmac

import pytest

from coherence.errors import CoherenceConfigError, Forbidden, QuotaExceeded, Unauthorized
from coherence.tenants import (
    QuotaDecision,
    Tenant,
    TenantRegistry,
    hash_token,
    plan_quota,
    tenants_from_config,
)
from tiers.block import DEFAULT_TENANT

ALICE = Tenant("alice", hash_token("alice-secret"), quota_bytes=1000)
BOB = Tenant("bob", hash_token("bob-secret"))


def test_no_tenants_means_default_tenant_and_no_auth() -> None:
    reg = TenantRegistry()
    assert not reg.auth_required
    for header in (None, "", "Bearer whatever", "garbage"):
        assert reg.authenticate(header).name == DEFAULT_TENANT
    assert reg.get(DEFAULT_TENANT) is not None and reg.get("alice") is None


def test_valid_tokens_name_their_tenant() -> None:
    reg = TenantRegistry([ALICE, BOB])
    assert reg.authenticate("Bearer alice-secret") is ALICE
    assert reg.authenticate("bearer bob-secret") is BOB  # the scheme is case-insensitive
    assert reg.get("bob") is BOB


@pytest.mark.parametrize(
    "header", [None, "", "alice-secret", "Basic YWxpY2U6eA==", "Bearer", "Bearer ", "Bearer a b"]
)
def test_missing_or_malformed_header_is_401(header: str | None) -> None:
    reg = TenantRegistry([ALICE])
    with pytest.raises(Unauthorized) as exc:
        reg.authenticate(header)
    assert exc.value.http_status == 401


def test_overlong_token_is_401_not_hashed() -> None:
    reg = TenantRegistry([ALICE])
    with pytest.raises(Unauthorized):
        reg.authenticate("Bearer " + "a" * 100_000)


def test_wrong_token_is_403() -> None:
    reg = TenantRegistry([ALICE, BOB])
    with pytest.raises(Forbidden) as exc:
        reg.authenticate("Bearer mallory")
    assert exc.value.http_status == 403


def test_every_tenant_digest_is_compared_whatever_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    carol = Tenant("carol", hash_token("carol-secret"))
    reg = TenantRegistry([ALICE, BOB, carol])
    for header in ("Bearer alice-secret", "Bearer carol-secret", "Bearer nobody"):
        calls.clear()
        with contextlib.suppress(Forbidden):
            reg.authenticate(header)
        assert len(calls) == 3
        assert {b for _, b in calls} == {bytes.fromhex(t.token_sha256) for t in reg.tenants}


def test_config_is_validated() -> None:
    with pytest.raises(CoherenceConfigError):
        Tenant("bad/name", hash_token("x"))
    with pytest.raises(CoherenceConfigError):
        Tenant("alice", "not-hex")
    with pytest.raises(CoherenceConfigError):
        Tenant("alice", hash_token("x"), quota_bytes=-1)
    with pytest.raises(CoherenceConfigError):
        TenantRegistry([ALICE, Tenant("alice", hash_token("other"))])
    with pytest.raises(CoherenceConfigError):
        TenantRegistry([ALICE, Tenant("alias", ALICE.token_sha256)])


def test_tenants_from_toml_tables() -> None:
    digest = hash_token("alice-secret")
    got = tenants_from_config(
        {
            "alice": {"token_sha256": digest.upper(), "quota_bytes": 1 << 30},
            "bob": {"token_sha256": digest[::-1]},
        }
    )
    assert got == (Tenant("alice", digest, 1 << 30), Tenant("bob", digest[::-1], None))
    bads: list[dict[str, object]] = [
        {"alice": "x"},
        {"alice": {}},
        {"alice": {"token_sha256": digest, "quota": 5}},
        {"alice": {"token_sha256": digest, "quota_bytes": "5"}},
    ]
    for bad in bads:
        with pytest.raises(CoherenceConfigError):
            tenants_from_config(bad)


def test_quota_plan() -> None:
    assert plan_quota(BOB, used_bytes=10**12, incoming_bytes=10**9) == QuotaDecision(True, 0)
    assert plan_quota(ALICE, used_bytes=600, incoming_bytes=400) == QuotaDecision(True, 0)
    assert plan_quota(ALICE, used_bytes=900, incoming_bytes=300) == QuotaDecision(True, 200)
    # Only 100 of alice's bytes can go (the rest pinned or leased): no room now, 507.
    assert plan_quota(
        ALICE, used_bytes=900, incoming_bytes=300, evictable_bytes=100
    ) == QuotaDecision(False, 200)
    with pytest.raises(QuotaExceeded) as exc:
        plan_quota(ALICE, used_bytes=0, incoming_bytes=1001)
    assert exc.value.http_status == 507
