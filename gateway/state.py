"""What the app keeps between requests: one object under one ``web.AppKey``."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

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
    hierarchy: Hierarchy | None = None

    @property
    def ready(self) -> bool:
        return self.hierarchy is not None

    @property
    def store(self) -> Hierarchy:
        hierarchy = self.hierarchy
        if hierarchy is None:
            raise Unavailable("the tiers are not open (starting up or shutting down)")
        return hierarchy


STATE = web.AppKey("kvgate_state", GatewayState)
