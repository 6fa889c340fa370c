"""Read pins: bounded, expiring, accounted, O(1) to check."""

from __future__ import annotations

import pytest

from coherence.errors import BadRequest, CoherenceConfigError
from coherence.pins import PinTable
from tiers.clock import FakeClock


def make(**kwargs: int) -> tuple[FakeClock, PinTable]:
    clock = FakeClock()
    return clock, PinTable(clock=clock, **kwargs)


def test_pin_excludes_until_deadline_then_expires_lazily() -> None:
    clock, pins = make(default_ttl_ms=100)
    assert not pins.is_pinned("t/a")
    pins.pin("t/a", 10, tier="hbm")
    assert pins.is_pinned("t/a")
    clock.advance(0.099)
    assert pins.is_pinned("t/a")
    clock.advance(0.001)
    assert not pins.is_pinned("t/a")
    assert pins.pinned_bytes() == 0 and pins.pinned_bytes("hbm") == 0


def test_ttl_is_bounded_by_max() -> None:
    clock, pins = make(default_ttl_ms=100, max_ttl_ms=500)
    pins.pin("t/a", 1, ttl_ms=10**9)
    clock.advance(0.5)
    assert not pins.is_pinned("t/a")
    for bad in (0, -5):
        with pytest.raises(BadRequest):
            pins.pin("t/b", 1, ttl_ms=bad)
    with pytest.raises(CoherenceConfigError):
        PinTable(default_ttl_ms=600, max_ttl_ms=500)


def test_bytes_are_accounted_per_tier_and_drained_on_expiry() -> None:
    clock, pins = make(default_ttl_ms=100)
    pins.pin("t/a", 10, tier="hbm")
    pins.pin("t/b", 20, tier="dram", ttl_ms=300)
    pins.pin("t/c", 5)
    assert pins.pinned_bytes() == 35
    assert (pins.pinned_bytes("hbm"), pins.pinned_bytes("dram")) == (10, 20)
    clock.advance(0.1)
    # Nobody asked about t/a or t/c: the totals still drop when their deadlines pass.
    assert pins.pinned_bytes() == 20 and len(pins) == 1
    pins.moved("t/b", "hbm")
    assert (pins.pinned_bytes("hbm"), pins.pinned_bytes("dram")) == (20, 0)
    clock.advance(0.2)
    assert pins.expire_due() == 1
    assert pins.pinned_bytes() == 0


def test_several_holders_keep_the_latest_deadline_and_unpin_by_count() -> None:
    clock, pins = make(default_ttl_ms=100)
    first = pins.pin("t/a", 10)
    assert first is not None
    clock.advance(0.05)
    second = pins.pin("t/a", 10, ttl_ms=200)
    assert second is not None
    assert pins.pinned_bytes() == 10  # one block, counted once
    pins.unpin(first)
    assert pins.is_pinned("t/a")
    clock.advance(0.1)  # past the first deadline, inside the second
    assert pins.is_pinned("t/a")
    pins.unpin(second)
    assert not pins.is_pinned("t/a")
    assert pins.pinned_bytes() == 0


def test_a_stale_handle_cannot_unpin_a_newer_pin() -> None:
    clock, pins = make(default_ttl_ms=100)
    old = pins.pin("t/a", 1)
    assert old is not None
    clock.advance(0.1)
    fresh = pins.pin("t/a", 1)
    assert fresh is not None and fresh != old
    pins.unpin(old)
    assert pins.is_pinned("t/a")
    pins.unpin(fresh)
    pins.unpin(fresh)  # idempotent
    assert not pins.is_pinned("t/a")


def test_hold_unpins_on_exit_even_on_error() -> None:
    _, pins = make()
    with pytest.raises(RuntimeError), pins.hold("t/a", 3) as handle:
        assert handle is not None and pins.is_pinned("t/a")
        raise RuntimeError("read failed")
    assert not pins.is_pinned("t/a")
    assert pins.pinned_bytes() == 0


def test_cap_refuses_new_pins_but_not_extra_holders() -> None:
    _, pins = make(max_pinned_bytes=100)
    assert pins.pin("t/a", 60) is not None
    assert pins.pin("t/b", 50) is None
    assert not pins.is_pinned("t/b")
    assert pins.pin("t/a", 60) is not None  # already pinned: costs nothing more
    assert pins.pin("t/c", 40) is not None
    assert pins.pinned_bytes() == 100


def test_drop_forgets_a_deleted_block() -> None:
    _, pins = make()
    pins.pin("t/a", 7, tier="disk")
    assert pins.drop("t/a") is True
    assert pins.drop("t/a") is False
    assert not pins.is_pinned("t/a") and pins.pinned_bytes("disk") == 0
