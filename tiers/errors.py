"""The one exception tree of the ``tiers`` package.

A miss is ``None`` and no room is a :class:`~tiers.base.PutOutcome`; exceptions are for misuse
and for faults. Callers above the hierarchy see only these types: backend exceptions (LMDB,
zstd, torch) are translated at the tier boundary with ``raise ... from exc``.
"""

from __future__ import annotations


class TierError(Exception):
    """Base of every error raised by ``tiers``."""


class TierConfigError(TierError):
    """A tier was configured with impossible values (misuse: raised at construction)."""


class BlockTooLarge(TierError):
    """A block can never fit this tier or hierarchy, whatever is evicted."""


class CorruptBlock(TierError):
    """Stored bytes failed their integrity check; the block must not be served."""


class TierIOError(TierError):
    """The backing store failed (disk full, LMDB error, device error)."""


class TierClosed(TierError):
    """The tier was used after :meth:`close`."""
