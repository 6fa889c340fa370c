"""Who is asking: the request context, resolved once per request by one replaceable function.

Today there is one tenant and no auth (the embedded default). Issue 3 plugs bearer-token auth in
here: a :data:`ContextResolver` that reads ``Authorization``, maps the token's SHA-256 to a
tenant and raises :class:`gateway.errors.Unauthorized` / :class:`gateway.errors.Forbidden`.
Handlers only ever call the resolver and :meth:`RequestContext.scope`, so nothing else changes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from tiers.block import DEFAULT_TENANT, scoped_key


@dataclass(frozen=True, slots=True)
class RequestContext:
    tenant: str

    def scope(self, key: str) -> str:
        """The hierarchy's key for the client's ``key``: tenants never see each other's blocks."""
        return scoped_key(self.tenant, key)


ContextResolver = Callable[[web.Request], Awaitable[RequestContext]]

DEFAULT_CONTEXT = RequestContext(tenant=DEFAULT_TENANT)


async def single_tenant_resolver(request: web.Request) -> RequestContext:
    """No tenants configured: everyone is the default tenant, no credentials needed."""
    return DEFAULT_CONTEXT
