"""Many timers on one: ``Deadlines.call_at`` is ``Clock.call_at``, for as many deadlines as
there are connections, on a single timer of the clock (armed for the earliest).

A loop timer costs a connection ~0.3 KiB (~0.6 KiB on uvloop: its handle, a libuv timer,
a copy of the context); a node's thousands of idle sockets each wait for their token's
expiry. Here a deadline costs one small object in a heap. Callbacks due together run in
deadline order, each on its own: one that raises is logged, and the others still run.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Callable
from typing import Final

from gateway.clock import Clock, Timer

log = logging.getLogger(__name__)

# A heap with more cancelled deadlines than live ones (and at least this many) is rebuilt: a
# cancelled deadline holds nothing of its owner, but the heap would otherwise only shrink as
# the deadlines pass.
_COMPACT_FROM: Final = 64


class _Deadline:
    __slots__ = ("_deadlines", "callback", "when")

    def __init__(self, when: float, callback: Callable[[], None], deadlines: Deadlines) -> None:
        self.when = when
        self.callback: Callable[[], None] | None = callback  # None once fired or cancelled
        self._deadlines = deadlines

    def __lt__(self, other: _Deadline) -> bool:
        return self.when < other.when

    def cancel(self) -> None:
        if self.callback is not None:
            self.callback = None
            self._deadlines._cancelled()


class Deadlines:
    """``call_at(when, callback)``: ``callback()`` once ``clock`` reaches ``when``, unless the
    returned timer is cancelled first."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._heap: list[_Deadline] = []
        self._dead = 0  # cancelled deadlines still in the heap
        self._timer: Timer | None = None
        self._armed = math.inf  # the deadline the clock's timer is set for

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        deadline = _Deadline(when, callback, self)
        heapq.heappush(self._heap, deadline)
        if when < self._armed:
            self._arm(when)
        return deadline

    def __len__(self) -> int:
        """Deadlines neither fired nor cancelled."""
        return len(self._heap) - self._dead

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed = when
        self._timer = self._clock.call_at(when, self._fire)

    def _fire(self) -> None:
        # (What the clock's timer was set for is due, even if it fired a hair early.)
        now = max(self._clock.now(), self._armed)
        self._timer, self._armed = None, math.inf
        while self._heap and self._heap[0].when <= now:  # (a callback may rebuild the heap)
            deadline = heapq.heappop(self._heap)
            callback, deadline.callback = deadline.callback, None
            if callback is None:
                self._dead -= 1
                continue
            try:
                callback()
            except Exception:
                log.exception("deadline callback failed")
        if self._heap and self._heap[0].when < self._armed:  # (a callback may have armed one)
            self._arm(self._heap[0].when)

    def _cancelled(self) -> None:
        self._dead += 1
        if self._dead >= _COMPACT_FROM and self._dead * 2 > len(self._heap):
            self._heap = [deadline for deadline in self._heap if deadline.callback is not None]
            heapq.heapify(self._heap)
            self._dead = 0
