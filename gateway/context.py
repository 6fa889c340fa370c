"""Who is asking: the request context, resolved once per request by one replaceable function.

With no tenants configured (the embedded default) everyone is the default tenant, no credentials
needed. With tenants, :func:`bearer_resolver` maps ``Authorization: Bearer TOKEN`` to the tenant
whose ``token_sha256`` matches. Handlers only ever call the resolver and
:meth:`RequestContext.scope`, so quotas, leases or another auth scheme (issue 3) plug in here
without touching them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from aiohttp import web

from gateway.config import TenantConfig
from gateway.errors import Unauthorized
from tiers.block import DEFAULT_TENANT, scoped_key


@dataclass(frozen=True, slots=True)
class RequestContext:
    tenant: str
    quota_bytes: int | None = None

    def scope(self, key: str) -> str:
        """The hierarchy's key for the client's ``key``: tenants never see each other's blocks."""
        return scoped_key(self.tenant, key)


ContextResolver = Callable[[web.Request], Awaitable[RequestContext]]

DEFAULT_CONTEXT = RequestContext(tenant=DEFAULT_TENANT)


async def single_tenant_resolver(request: web.Request) -> RequestContext:
    """No tenants configured: everyone is the default tenant, no credentials needed."""
    return DEFAULT_CONTEXT


_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="kvgate"'}


def bearer_resolver(tenants: Sequence[TenantConfig]) -> ContextResolver:
    """``Authorization: Bearer TOKEN`` -> the tenant whose ``token_sha256`` is SHA-256(TOKEN)."""
    by_digest = {
        t.token_sha256: RequestContext(tenant=t.name, quota_bytes=t.quota_bytes) for t in tenants
    }

    async def resolve(request: web.Request) -> RequestContext:
        header = request.headers.get("Authorization")
        if header is None:
            raise Unauthorized("this server needs Authorization: Bearer TOKEN", headers=_CHALLENGE)
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("expected Authorization: Bearer TOKEN", headers=_CHALLENGE)
        ctx = by_digest.get(hashlib.sha256(token.encode("utf-8", "replace")).hexdigest())
        if ctx is None:
            raise Unauthorized("unknown bearer token", headers=_CHALLENGE)
        return ctx

    return resolve


def resolver_for(tenants: Sequence[TenantConfig]) -> ContextResolver:
    return bearer_resolver(tenants) if tenants else single_tenant_resolver
