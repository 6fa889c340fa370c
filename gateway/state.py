"""What the app keeps between requests: one object under one ``web.AppKey``."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from coherence.pins import PinTable
from gateway.coherent import Coherence
from gateway.config import GatewayConfig
from gateway.context import ContextResolver
from gateway.errors import Unavailable
from tiers.clock import Clock
from tiers.hierarchy import Hierarchy


@dataclass(slots=True)
class GatewayState:
    config: GatewayConfig
    clock: Clock
    resolve: ContextResolver
    pins: PinTable
    hierarchy: Hierarchy | None = None
    coherence: Coherence | None = None

    @property
    def ready(self) -> bool:
        return self.hierarchy is not None and self.coherence is not None

    @property
    def store(self) -> Hierarchy:
        hierarchy = self.hierarchy
        if hierarchy is None:
            raise Unavailable("the tiers are not open (starting up or shutting down)")
        return hierarchy

    @property
    def coherent(self) -> Coherence:
        """Leases, pins and quotas over the hierarchy (open once the lease table is)."""
        layer = self.coherence
        if layer is None:
            raise Unavailable("the lease table is not open (starting up or shutting down)")
        return layer


STATE = web.AppKey("kvgate_state", GatewayState)
