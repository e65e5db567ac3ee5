"""``Deadlines``: many timers on one timer of the clock, each firing at its time, in order."""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref
from collections.abc import Callable

import pytest

from gateway.clock import ManualClock, Timer
from gateway.deadlines import Deadlines


class CountingClock(ManualClock):
    """A manual clock that counts the timers asked of it."""

    def __init__(self) -> None:
        super().__init__()
        self.timers = 0

    def call_at(self, deadline: float, callback: Callable[[], None]) -> Timer:
        self.timers += 1
        return super().call_at(deadline, callback)


async def advance(clock: ManualClock, seconds: float) -> None:
    clock.advance(seconds)
    await asyncio.sleep(0)  # (the manual clock's timers fire from the loop)


async def test_each_fires_at_its_time_in_order_on_one_clock_timer() -> None:
    clock = CountingClock()
    deadlines = Deadlines(clock)
    start = clock.now()
    fired: list[int] = []
    for n in (5, 1, 3, 2, 4, 3):
        deadlines.call_at(start + n, lambda n=n: fired.append(n))  # type: ignore[misc]
    assert clock.timers == 2  # armed for 5, then again for 1 (earlier); never for later ones
    assert len(deadlines) == 6
    await advance(clock, 0.5)
    assert fired == []
    await advance(clock, 2.0)
    assert fired == [1, 2]
    await advance(clock, 10.0)
    assert fired == [1, 2, 3, 3, 4, 5]
    assert len(deadlines) == 0
    assert clock.timers == 3  # once more, after the first fire, for the earliest left (3)


async def test_a_cancelled_deadline_never_fires_and_a_fired_one_cancels_quietly() -> None:
    clock = ManualClock()
    deadlines = Deadlines(clock)
    fired: list[str] = []
    first = deadlines.call_at(clock.now() + 1, lambda: fired.append("first"))
    second = deadlines.call_at(clock.now() + 2, lambda: fired.append("second"))
    first.cancel()
    first.cancel()
    assert len(deadlines) == 1
    await advance(clock, 5)
    assert fired == ["second"]
    second.cancel()  # (fired already: nothing happens)
    assert len(deadlines) == 0


async def test_one_callback_failing_does_not_stop_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ManualClock()
    deadlines = Deadlines(clock)
    fired: list[str] = []

    def fail() -> None:
        raise RuntimeError("boom")

    deadlines.call_at(clock.now() + 1, fail)
    deadlines.call_at(clock.now() + 1, lambda: fired.append("after"))
    with caplog.at_level(logging.ERROR, logger="gateway.deadlines"):
        await advance(clock, 1)
    assert fired == ["after"]
    assert "deadline callback failed" in caplog.text


async def test_a_deadline_added_by_a_callback_fires_too() -> None:
    clock = ManualClock()
    deadlines = Deadlines(clock)
    fired: list[str] = []
    deadlines.call_at(clock.now() + 1, lambda: deadlines.call_at(
        clock.now() + 1, lambda: fired.append("later")))
    await advance(clock, 1)
    assert fired == []
    await advance(clock, 1)
    assert fired == ["later"]


class Owner:
    def due(self) -> None:
        raise AssertionError("cancelled: never called")


async def test_cancelled_deadlines_keep_nothing_of_their_owners() -> None:
    """An ended socket's deadline may be hours away: cancelling it lets its owner go at once,
    and the heap does not grow with the deadlines cancelled before their time."""
    clock = ManualClock()
    deadlines = Deadlines(clock)
    kept = [deadlines.call_at(clock.now() + 7200 + n, lambda: None) for n in range(10)]
    owners = []
    for n in range(1000):
        owner = Owner()
        deadlines.call_at(clock.now() + 3600 + n, owner.due).cancel()
        owners.append(weakref.ref(owner))
        del owner
    gc.collect()
    assert all(ref() is None for ref in owners)
    assert len(deadlines) == len(kept)
    assert len(deadlines._heap) < 100  # rebuilt without the cancelled ones
    await advance(clock, 3600 + 1000)  # the cancelled ones' times pass: nothing is called
