"""Count-min frequency sketch with periodic halving (the "TinyLFU" frequency estimator).

Four rows of 4-bit-range counters (saturating at 15) in one ``bytearray``; conservative update
(only the smallest counters grow) keeps over-estimates low. Every ``sample_factor * width``
increments all counters are halved, so the sketch forgets: frequency is measured over a sliding
window of recent history, which is what lets a once-popular prefix fall out of favour.

The width grows with the number of keys the owner holds (:meth:`ensure_capacity`), because a
policy does not know its tier's capacity in blocks, only how many blocks it holds right now.
"""

from __future__ import annotations

import xxhash

_ROWS = 4
_MAX = 15
_HALVE = bytes(i >> 1 for i in range(256))


class FrequencySketch:
    __slots__ = ("_additions", "_mask", "_sample", "_sample_factor", "_table", "_width")

    def __init__(self, width: int = 256, *, sample_factor: int = 10) -> None:
        w = 16
        while w < width:
            w <<= 1
        self._width = w
        self._mask = w - 1
        self._table = bytearray(_ROWS * w)
        self._sample_factor = sample_factor
        self._sample = sample_factor * w
        self._additions = 0

    @property
    def width(self) -> int:
        return self._width

    def ensure_capacity(self, keys: int) -> None:
        """Widen (by doubling, keeping counts) so ``keys`` keys do not crowd the counters."""
        w = self._width
        if keys <= w:
            return
        old = self._table
        while w < keys:
            # Slot j of the wider row is slot j & (old_w - 1) of the narrower: copying keeps every
            # estimate an upper bound of the true count, as count-min requires.
            new = bytearray(_ROWS * w * 2)
            for row in range(_ROWS):
                src = old[row * w : (row + 1) * w]
                new[row * 2 * w : row * 2 * w + w] = src
                new[row * 2 * w + w : (row + 1) * 2 * w] = src
            old = new
            w *= 2
        self._table = old
        self._width = w
        self._mask = w - 1
        self._sample = self._sample_factor * w

    def _slots(self, key: str) -> tuple[int, int, int, int]:
        h = xxhash.xxh64_intdigest(key.encode())
        lo = h & 0xFFFFFFFF
        hi = (h >> 32) | 1
        m = self._mask
        w = self._width
        return (
            lo & m,
            w + ((lo + hi) & m),
            2 * w + ((lo + 2 * hi) & m),
            3 * w + ((lo + 3 * hi) & m),
        )

    def estimate(self, key: str) -> int:
        t = self._table
        a, b, c, d = self._slots(key)
        return min(t[a], t[b], t[c], t[d])

    def increment(self, key: str) -> int:
        """Count one occurrence; returns the new estimate."""
        t = self._table
        slots = self._slots(key)
        a, b, c, d = slots
        low = min(t[a], t[b], t[c], t[d])
        if low < _MAX:
            for s in slots:
                if t[s] == low:
                    t[s] = low + 1
            low += 1
        self._additions += 1
        if self._additions >= self._sample:
            self._table = bytearray(self._table.translate(_HALVE))
            self._additions //= 2
        return low
