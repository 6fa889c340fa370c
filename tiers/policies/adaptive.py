"""Prefix-aware LRU-2 that becomes prefix-aware LRU when a duel of two shadow caches says so.

``prefix-lru2`` ranks a block by its second-to-last access, so every block seen once goes
before any block seen twice. On repeated documents (the Mooncake trace) and at small capacity
that is right. In a multi-turn chat with room to keep whole conversations it is wrong twice:
the blocks seen once include every live session's newest suffix, which is the next turn's
prefix; and a session's previous think time, which the penultimate access encodes, does not
predict its next one. There plain recency wins (chat-1 at 10%: LRU 0.691, LRU-2 0.634). Which
ranking is better depends on the workload *and* on the capacity, and no per-block statistic
tried so far tells the two cases apart (docs/policies.md), so this policy measures it:

* **Two shadow caches, one per ranking** (miniature simulation, Waldspurger et al., ATC 2017;
  set dueling, Qureshi et al., ISCA 2007). Each holds keys only and replays the tier's accesses
  under one ranking, with the same chain clamp and the same access history as the live one, on
  a spatial sample of the keys: a key is sampled when the CRC-32 of its name is below a
  threshold, at rate R = min(1, ``sample_blocks`` / resident blocks), and a shadow holds R x the
  resident count. Each counts *prefix* hits: per request, sampled blocks hit before the first
  sampled miss. A shadow of about a thousand blocks follows the full cache's hit ratio closely
  (the miniature-simulation result), and the duel only needs the sign of a difference.
* **Switch only on evidence.** Per request (a request starts at depth 0), the difference d of
  the two shadows' prefix hits is added to decayed sums of d and d**2, and the live ranking
  changes when the other one leads by more than ``z`` standard errors: sum(d) > z sqrt(sum(d**2)),
  a self-normalised paired test that counts a request, not a block, as one observation (a
  request's blocks hit or miss together). The sums decay over as many accesses as the history
  remembers (``history_factor`` x the resident count): evidence is weighed over the span the
  policy can see anyway. The 2z standard errors between switching one way and back are the
  hysteresis that keeps noise from flapping the ranking.
* The live ranking starts as LRU-2 and stays so until the duel says otherwise, so wherever LRU
  is not clearly better this policy orders exactly like ``prefix-lru2``. As there, a rank is set
  when the block is touched: after a switch, blocks ranked under the old rule keep their rank
  until they are touched again (within about one turnover of the cache).

* **One decision per hierarchy.** Tiers that hand blocks down behave as one cache of their
  summed size when they rank alike, and which ranking wins depends on that size. So the top
  policy of a run of ``prefix-adaptive`` tiers leads them (:meth:`join_tiers`, called through
  :func:`tiers.policy.link_tiers` by the hierarchy and the simulator alike): its shadows are
  sized to the run's resident blocks, with an access history as long as the run's, and every
  tier of the run ranks by its verdict. Deciding tier by tier lost up to 11% to LRU on
  conversations over three tiers (docs/policies.md).

Accesses without ``depth``/``prev`` hints (no request to score them in) are left out of the
duel; with none at all the policy is ``prefix-lru2`` without the clamp.
O(log n) per access: the live heap, and for a sampled access a CRC-32 and one heap operation
in each shadow (heaps with lazy deletion, compacted at twice the live size).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence

from tiers.policies._ranking import AccessHistory, Ranking
from tiers.policy import Access, EvictionPolicy, TierGroupPolicy

_FULL = 1 << 32  # CRC-32 range: a threshold of _FULL samples every key


class _Verdict:
    """The live ranking, shared by a tier group's policies (:func:`tiers.policy.link_tiers`)."""

    __slots__ = ("recency",)

    def __init__(self) -> None:
        self.recency = False  # rank by the last access (LRU), else the penultimate (LRU-2)


class _Shadow:
    """A keys-only cache on the sampled keys under one ranking, scoring one request at a time."""

    __slots__ = ("hits", "intact", "order", "recency")

    def __init__(self, *, recency: bool) -> None:
        self.order = Ranking()
        self.recency = recency  # rank by the last access (LRU), else the penultimate (LRU-2)
        self.hits = 0  # prefix hits of the current request
        self.intact = True  # no sampled block of the current request has missed yet

    def start_request(self) -> None:
        self.hits = 0
        self.intact = True

    def access(
        self,
        key: str,
        last: float,
        penult: float,
        depth: int,
        prev: str | None,
        capacity: int,
    ) -> None:
        order = self.order
        if key in order.entries:
            if self.intact:
                self.hits += 1
        else:
            self.intact = False
            while len(order) >= capacity:
                gone = order.victim()
                if gone is None:
                    break
                del order.entries[gone]
        order.rank(key, last if self.recency else penult, last, depth, prev)


class AdaptivePrefixPolicy:
    name = "prefix-adaptive"

    def __init__(
        self,
        *,
        history_factor: int = 8,
        min_history: int = 1024,
        sample_blocks: int = 1024,
        z: float = 2.0,
    ) -> None:
        self._live = Ranking()
        self._verdict = _Verdict()  # the live ranking: LRU-2 until the duel says LRU
        self._below: list[EvictionPolicy] = []  # the tiers this one decides for (join_tiers)
        self._following = False  # another tier's policy decides (follow)
        self._history = AccessHistory(factor=history_factor, minimum=min_history)
        # The shadows of a group's leader simulate the group's size, so they need a history
        # as long as the group's; the live ranking keeps one sized to its own tier (join_tiers).
        self._shadow_history = self._history
        self._sample_blocks = sample_blocks
        self._threshold = _FULL  # sampled: crc32(key) < threshold; only ever lowered
        self._z2 = z * z
        self._lru2 = _Shadow(recency=False)
        self._lru = _Shadow(recency=True)
        # decayed sums over requests of d and d**2, d = LRU-2 shadow's hits - LRU shadow's
        self._sum = 0.0
        self._sumsq = 0.0
        self._request_accesses = 0
        self._last_key: str | None = None  # the previous access, to follow a request's chain
        self._sampled_prev: str | None = None  # the request's previous sampled block
        self.switches = 0

    @property
    def ranking(self) -> str:
        """The live ranking: ``"lru2"`` (second-to-last access) or ``"lru"`` (last access)."""
        return "lru" if self._verdict.recency else "lru2"

    @property
    def decides_for(self) -> int:
        """How many tiers below this one rank by its verdict (:meth:`join_tiers`)."""
        return len(self._below)

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, key: str) -> bool:
        return key in self._live.entries

    def join_tiers(self, below: Sequence[EvictionPolicy]) -> int:
        """Decide for the tiers below whose policies are of this kind (the run of them right
        under this one): the duel then simulates their summed size, and all of them rank by
        its verdict. This tier sees every access of theirs (a hit below is a miss here), so
        its stream is the group's."""
        if self._following:
            return 0
        for policy in below:
            if not (isinstance(policy, TierGroupPolicy) and policy.follow(self._verdict)):
                break
            self._below.append(policy)
        if self._below:
            h = self._history
            self._shadow_history = AccessHistory(factor=h.factor, minimum=h.minimum)
        return len(self._below)

    def follow(self, leader: object) -> bool:
        if not isinstance(leader, _Verdict) or self._below or leader is self._verdict:
            return False
        self._verdict = leader
        self._following = True
        return True

    def _resident(self) -> int:
        """Blocks held by this tier and those it decides for."""
        n = len(self._live)
        for policy in self._below:
            n += len(policy)
        return n

    def _record(self, access: Access) -> None:
        self._history.record(access.key, access.now, resident=len(self._live))

    def _rank(self, access: Access) -> None:
        last, penult = self._history.last_two(access.key, access.now)
        rank = last if self._verdict.recency else penult
        self._live.rank(access.key, rank, last, access.depth or 0, access.prev)

    def _end_request(self) -> None:
        if self._request_accesses:
            d = self._lru2.hits - self._lru.hits
            horizon = max(1, self._shadow_history.factor * self._resident())
            decay = math.exp(-self._request_accesses / horizon)
            self._sum = self._sum * decay + d
            self._sumsq = self._sumsq * decay + d * d
            verdict = self._verdict
            lead = self._sum if verdict.recency else -self._sum  # the other ranking's lead
            if lead > 0 and lead * lead > self._z2 * self._sumsq:
                verdict.recency = not verdict.recency
                self.switches += 1
        self._request_accesses = 0
        self._lru2.start_request()
        self._lru.start_request()

    def _duel(self, access: Access) -> None:
        """Replay one access (already in the live history) in the shadows, if its key is
        sampled."""
        if self._following:
            return  # the group's leader saw this access too, and duels for the group
        if access.depth is None:
            # No chain position, so no request to score (a read outside a looked-up request):
            # the duel sits it out, and such a read costs what it costs prefix-lru2.
            return
        key = access.key
        if access.depth == 0 or access.prev is None:
            self._end_request()
            self._sampled_prev = None
        elif access.prev != self._last_key:
            self._sampled_prev = None  # not the chain we were following: no clamp to guess
        self._last_key = key
        self._request_accesses += 1
        resident = self._resident()
        if self._shadow_history is not self._history:
            # A group's own history holds only what the shadows replay: reads outside a request
            # stay out of it, as they stay out of the duel, and cost nothing extra here.
            self._shadow_history.record(key, access.now, resident=resident)
        if resident > self._sample_blocks:
            self._threshold = min(self._threshold, (self._sample_blocks * _FULL) // resident)
        if zlib.crc32(key.encode()) >= self._threshold:
            return
        capacity = max(1, (resident * self._threshold) // _FULL)
        last, penult = self._shadow_history.last_two(key, access.now)
        depth = access.depth or 0
        prev = self._sampled_prev
        self._lru2.access(key, last, penult, depth, prev, capacity)
        self._lru.access(key, last, penult, depth, prev, capacity)
        self._sampled_prev = key

    def admit(self, access: Access) -> bool:
        return True

    def on_miss(self, access: Access) -> None:
        self._record(access)
        self._duel(access)

    def on_insert(self, access: Access) -> None:
        self._rank(access)

    def on_hit(self, access: Access) -> None:
        self._record(access)
        self._duel(access)
        if access.key in self._live.entries:
            self._rank(access)

    def on_remove(self, key: str) -> None:
        self._live.entries.pop(key, None)

    def victim(self, exclude: Callable[[str], bool] | None = None) -> str | None:
        return self._live.victim(exclude)
