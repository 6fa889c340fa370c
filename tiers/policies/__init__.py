"""The built-in eviction/admission policies beyond plain LRU (registered by tiers.policy).

``belady`` is not registered: it needs the whole future (a trace) and only the simulator
builds it, as the yardstick.
"""

from __future__ import annotations

from tiers.policies.adaptive import AdaptivePrefixPolicy
from tiers.policies.belady import BeladyPolicy, FutureOracle
from tiers.policies.chain import ChainLRUPolicy
from tiers.policies.prefix import PrefixLRU2Policy
from tiers.policies.s3fifo import ChainS3FIFOPolicy
from tiers.policies.tinylfu import WTinyLFUPolicy
from tiers.policies.ttl import TTLPolicy

BUILTIN = {
    ChainLRUPolicy.name: ChainLRUPolicy,
    PrefixLRU2Policy.name: PrefixLRU2Policy,
    WTinyLFUPolicy.name: WTinyLFUPolicy,
    TTLPolicy.name: TTLPolicy,
    ChainS3FIFOPolicy.name: ChainS3FIFOPolicy,
    AdaptivePrefixPolicy.name: AdaptivePrefixPolicy,
}

__all__ = [
    "BUILTIN",
    "AdaptivePrefixPolicy",
    "BeladyPolicy",
    "ChainLRUPolicy",
    "ChainS3FIFOPolicy",
    "FutureOracle",
    "PrefixLRU2Policy",
    "TTLPolicy",
    "WTinyLFUPolicy",
]
