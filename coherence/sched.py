"""Injectable timers, so lease expiry and waiter timeouts fire on time without tests sleeping.

The lease table never polls: it asks a :class:`Scheduler` to call it back when a lease's
deadline or a waiter's timeout comes. In production that is the running event loop
(:class:`LoopScheduler`); in tests it is :class:`FakeScheduler`, which fires callbacks only when
the test moves a :class:`~tiers.clock.FakeClock` forward through it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from typing import Protocol

from tiers.clock import FakeClock


class Timer(Protocol):
    def cancel(self) -> None: ...


class Scheduler(Protocol):
    def call_later(self, delay_s: float, callback: Callable[[], None]) -> Timer:
        """Run ``callback`` once, ``delay_s`` seconds from now (on the clock the caller uses)."""
        ...


class LoopScheduler:
    """Timers on the running asyncio loop (``loop.call_later``), for use with ``SystemClock``."""

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> Timer:
        return asyncio.get_running_loop().call_later(max(0.0, delay_s), callback)


class _FakeTimer:
    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeScheduler:
    """Timers that fire only when :meth:`advance` (or :meth:`run_due`) is called.

    ``advance`` walks the clock from one due time to the next, so a callback observes the clock at
    exactly its due time, callbacks run in due order, and a callback scheduled by another callback
    fires in the same ``advance`` if it falls due within it.
    """

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self._heap: list[tuple[float, int, _FakeTimer, Callable[[], None]]] = []
        self._seq = itertools.count()

    def call_later(self, delay_s: float, callback: Callable[[], None]) -> Timer:
        timer = _FakeTimer()
        due = self.clock.monotonic() + max(0.0, delay_s)
        heapq.heappush(self._heap, (due, next(self._seq), timer, callback))
        return timer

    def pending(self) -> int:
        return sum(1 for entry in self._heap if not entry[2].cancelled)

    def run_due(self) -> int:
        """Fire every callback due at the current time; how many fired."""
        fired = 0
        now = self.clock.monotonic()
        while self._heap and self._heap[0][0] <= now:
            _, _, timer, callback = heapq.heappop(self._heap)
            if not timer.cancelled:
                timer.cancelled = True
                callback()
                fired += 1
        return fired

    def advance(self, seconds: float) -> int:
        """Move the clock forward by ``seconds``, firing callbacks as their times come."""
        if seconds < 0:
            raise ValueError("a clock does not go backwards")
        target = self.clock.monotonic() + seconds
        fired = 0
        # Pop by due time rather than re-reading the clock, so float rounding in
        # ``now + (due - now)`` can never leave a due callback unfired or spin the loop.
        while self._heap and self._heap[0][0] <= target:
            due, _, timer, callback = heapq.heappop(self._heap)
            if timer.cancelled:
                continue
            step = due - self.clock.monotonic()
            if step > 0:
                self.clock.advance(step)
            timer.cancelled = True
            callback()
            fired += 1
        rest = target - self.clock.monotonic()
        if rest > 0:
            self.clock.advance(rest)
        return fired
