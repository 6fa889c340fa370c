"""Who is asking: the request context, resolved once per request by one replaceable function.

With no tenants configured (the embedded default) everyone is the default tenant, no credentials
needed. With tenants, :func:`bearer_resolver` maps ``Authorization: Bearer TOKEN`` to the tenant
whose ``token_sha256`` matches (``coherence.tenants`` does the constant-time check). Handlers
only ever call the resolver and :meth:`RequestContext.scope`, so quotas, leases or another auth
scheme (issue 3) plug in here without touching them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from aiohttp import web

from coherence.tenants import Tenant, TenantRegistry
from gateway.config import TenantConfig
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


def bearer_resolver(tenants: Sequence[TenantConfig]) -> ContextResolver:
    """``Authorization: Bearer TOKEN`` -> its tenant, via :class:`coherence.tenants.TenantRegistry`
    (401 without a well-formed bearer token, 403 for a token no tenant has)."""
    registry = TenantRegistry(Tenant(t.name, t.token_sha256, t.quota_bytes) for t in tenants)
    contexts = {
        t.name: RequestContext(tenant=t.name, quota_bytes=t.quota_bytes) for t in registry.tenants
    }

    async def resolve(request: web.Request) -> RequestContext:
        return contexts[registry.authenticate(request.headers.get("Authorization")).name]

    return resolve


def resolver_for(tenants: Sequence[TenantConfig]) -> ContextResolver:
    return bearer_resolver(tenants) if tenants else single_tenant_resolver
