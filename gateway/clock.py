"""Time as the gateway sees it: the one seam tests replace (with ``ManualClock``)."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch."""

    async def sleep_until(self, deadline: float) -> None:
        """Return once ``now() >= deadline``."""


class SystemClock:
    def now(self) -> float:
        return time.time()

    async def sleep_until(self, deadline: float) -> None:
        delay = deadline - time.time()
        if delay > 0:
            await asyncio.sleep(delay)


class ManualClock:
    """A clock that moves only when told to; sleepers wake when it passes their deadline."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = start
        self._changed = asyncio.Event()

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds
        self._changed.set()
        self._changed = asyncio.Event()

    async def sleep_until(self, deadline: float) -> None:
        while self._now < deadline:
            await self._changed.wait()
