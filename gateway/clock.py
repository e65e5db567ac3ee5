"""Time as the gateway sees it: the one seam tests replace (with ``ManualClock``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch."""

    async def sleep_until(self, deadline: float) -> None:
        """Return once ``now() >= deadline``."""

    def call_at(self, deadline: float, callback: Callable[[], None]) -> Timer:
        """Call ``callback`` once ``now() >= deadline`` (a timer, not a task), unless cancelled."""


class SystemClock:
    """The process's clock: the wall clock by default; ``SystemClock(time.monotonic)`` is one
    that never steps when the wall clock is set (its zero is arbitrary: see ``AlignedClock``)."""

    def __init__(self, read: Callable[[], float] = time.time) -> None:
        self._read = read

    def now(self) -> float:
        return self._read()

    async def sleep_until(self, deadline: float) -> None:
        delay = deadline - self._read()
        if delay > 0:
            await asyncio.sleep(delay)

    def call_at(self, deadline: float, callback: Callable[[], None]) -> Timer:
        return asyncio.get_running_loop().call_later(max(0.0, deadline - self._read()), callback)


class _ManualTimer:
    __slots__ = ("callback", "cancelled", "deadline")

    def __init__(self, deadline: float, callback: Callable[[], None]) -> None:
        self.deadline, self.callback, self.cancelled = deadline, callback, False

    def cancel(self) -> None:
        self.cancelled = True

    def fire(self) -> None:
        if not self.cancelled:
            self.callback()


class ManualClock:
    """A clock that moves only when told to; sleepers wake when it passes their deadline."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = start
        self._changed = asyncio.Event()
        self._timers: list[_ManualTimer] = []

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds
        self._changed.set()
        self._changed = asyncio.Event()
        due = [timer for timer in self._timers if timer.deadline <= self._now]
        self._timers = [timer for timer in self._timers
                        if timer.deadline > self._now and not timer.cancelled]
        for timer in due:
            asyncio.get_running_loop().call_soon(timer.fire)

    async def sleep_until(self, deadline: float) -> None:
        while self._now < deadline:
            await self._changed.wait()

    def call_at(self, deadline: float, callback: Callable[[], None]) -> Timer:
        timer = _ManualTimer(deadline, callback)
        if deadline <= self._now:
            asyncio.get_running_loop().call_soon(timer.fire)
        else:
            self._timers.append(timer)
        return timer


class AlignedClock:
    """``local`` moved onto a reference clock shared by every node (Redis's ``TIME``): what
    one node writes as a deadline, another compares with its own ``now()``.

    The offset is measured by ``align`` (the reference read between ``sent`` and
    ``received`` on ``local``) and then kept, so the local clock's moves (a ``ManualClock``
    advanced by a test) still move this one; ``align`` again to re-measure. On a monotonic
    ``local`` a step of the wall clock moves nothing."""

    def __init__(self, local: Clock) -> None:
        self.local = local
        self.offset = 0.0  # reference - local, seconds

    def align(self, reference: float, sent: float, received: float) -> None:
        """Take the reference as read halfway through the round trip (error ≤ half of it)."""
        self.offset = reference - (sent + received) / 2

    def now(self) -> float:
        return self.local.now() + self.offset

    async def sleep_until(self, deadline: float) -> None:
        await self.local.sleep_until(deadline - self.offset)

    def call_at(self, deadline: float, callback: Callable[[], None]) -> Timer:
        return self.local.call_at(deadline - self.offset, callback)
