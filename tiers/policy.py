"""Eviction and admission policies: small strategy objects.

The same objects drive the live tiers (through :class:`tiers.hierarchy.Hierarchy`) and the
offline trace simulator (``kvgate replay --simulate``), so what is tuned offline is what runs.
A policy only orders keys; it never touches bytes or budgets (the ledger does that).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from tiers.errors import TierConfigError


@dataclass(frozen=True, slots=True)
class Access:
    """One event a policy learns from.

    ``depth`` is the block's position in its prefix chain (0 for the first block of a prompt)
    and ``prev`` the key before it, when the caller knows them (lookups and trace replay do):
    a prefix block is worthless once any block before it is gone, which prefix-aware policies
    exploit. Every field past ``key`` is optional; policies degrade gracefully without them.
    """

    key: str
    size: int = 1
    now: float = 0.0
    depth: int | None = None
    prev: str | None = None
    ttl: float | None = None
    """Seconds the block may be served (``X-KV-TTL``); policies without expiry ignore it."""


@runtime_checkable
class EvictionPolicy(Protocol):
    name: str

    def admit(self, access: Access) -> bool:
        """Whether a block not yet in the tier may enter it (admission control)."""
        ...

    def on_insert(self, access: Access) -> None:
        """The block entered the tier."""
        ...

    def on_hit(self, access: Access) -> None:
        """The block, present in the tier, was read."""
        ...

    def on_miss(self, access: Access) -> None:
        """The block was asked for and was not in the tier (frequency sketches count these)."""
        ...

    def on_remove(self, key: str) -> None:
        """The block left the tier (evicted, demoted, promoted, deleted or expired)."""
        ...

    def victim(self, exclude: Callable[[str], bool] | None = None) -> str | None:
        """The key to evict next, skipping those ``exclude`` rejects; ``None`` when none is."""
        ...

    def __len__(self) -> int: ...


class LRUPolicy:
    """Least recently used; admits everything."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[str, None] = OrderedDict()

    def admit(self, access: Access) -> bool:
        return True

    def on_insert(self, access: Access) -> None:
        self._order[access.key] = None
        self._order.move_to_end(access.key)

    def on_hit(self, access: Access) -> None:
        if access.key in self._order:
            self._order.move_to_end(access.key)

    def on_miss(self, access: Access) -> None:
        return None

    def on_remove(self, key: str) -> None:
        self._order.pop(key, None)

    def victim(self, exclude: Callable[[str], bool] | None = None) -> str | None:
        for key in self._order:
            if exclude is None or not exclude(key):
                return key
        return None

    def __len__(self) -> int:
        return len(self._order)


@runtime_checkable
class TierGroupPolicy(Protocol):
    """A policy that can decide together with the policies of the tiers below it.

    The tiers of a hierarchy hand blocks down on eviction, so as a whole they behave like one
    cache of their summed size *if* they rank alike; a choice made per tier, each on its own
    capacity and on the part of the stream it sees, can rank them differently (docs/policies.md).
    """

    def join_tiers(self, below: Sequence[EvictionPolicy]) -> int:
        """Lead the policies of ``below`` (top first) that :meth:`follow` this one, stopping at
        the first that does not; returns how many follow."""
        ...

    def follow(self, leader: object) -> bool:
        """Take decisions from ``leader`` (what a leader of this kind passes); ``False`` if this
        policy cannot follow it."""
        ...


def link_tiers(policies: Sequence[EvictionPolicy]) -> None:
    """Group a hierarchy's policies (top tier first) that decide together: each run of tiers
    whose policies can follow the first of the run is led by it. The live hierarchy and the
    simulator both call this, so a tier group behaves the same offline and live."""
    i = 0
    while i < len(policies):
        policy = policies[i]
        i += 1
        if isinstance(policy, TierGroupPolicy):
            i += policy.join_tiers(policies[i:])


PolicyFactory = Callable[[], EvictionPolicy]

_REGISTRY: dict[str, PolicyFactory] = {"lru": LRUPolicy}
# At or above every other online policy at every point measured, on the Mooncake trace and on
# generated multi-turn chat (docs/policies.md).
DEFAULT_POLICY = "prefix-adaptive"
TIMING_ENV_VAR = "TIERS_POLICY_TIMING"  # not KVGATE_*: the gateway rejects unknown ones
"""Names a JSON file: policies are then timed per call and the report written at exit."""
_builtins_loaded = False


def _load_builtins() -> None:
    # The built-in policies live in tiers.policies, which imports this module for Access;
    # loading them on first use keeps the import graph acyclic.
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    from tiers.policies import BUILTIN

    for name, factory in BUILTIN.items():
        _REGISTRY.setdefault(name, factory)


def register_policy(name: str, factory: PolicyFactory) -> None:
    _load_builtins()
    _REGISTRY[name] = factory


def policy_names() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def make_policy(name: str | None = None) -> EvictionPolicy:
    _load_builtins()
    key = name or DEFAULT_POLICY
    try:
        factory = _REGISTRY[key]
    except KeyError:
        raise TierConfigError(
            f"unknown eviction policy {key!r}; choose one of {', '.join(policy_names())}"
        ) from None
    policy = factory()
    if os.environ.get(TIMING_ENV_VAR):
        # Opt-in measurement of the live tiers (tiers/policies/timing.py); off by default and
        # then free: the bare policy is returned and no call is wrapped.
        from tiers.policies.timing import maybe_wrap

        return maybe_wrap(policy)
    return policy
