"""``AlignedClock``: a node's clock moved onto the reference every node shares (Redis's
``TIME``), as the Redis backend uses it for every cross-node deadline (docs/redis.md, "Clocks")."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.clock import AlignedClock, ManualClock, SystemClock


async def test_the_reference_is_taken_halfway_through_the_round_trip_and_then_followed() -> None:
    local = ManualClock(start=1_000.0)
    aligned = AlignedClock(local)
    # Redis said 5_000.0 while the node's clock went from 1_000.0 to 1_000.2.
    aligned.align(5_000.0, 1_000.0, 1_000.2)
    local.advance(0.2)
    assert aligned.now() == pytest.approx(5_000.1)
    local.advance(30)  # the local clock moves (a test advances it): the aligned one with it
    assert aligned.now() == pytest.approx(5_030.1)
    fired: list[float] = []
    aligned.call_at(5_040.1, lambda: fired.append(aligned.now()))
    local.advance(9.9)
    await asyncio.sleep(0)
    assert fired == []
    local.advance(0.5)
    await asyncio.sleep(0)
    assert fired == [pytest.approx(5_040.5)]


async def test_on_the_monotonic_clock_it_reads_epoch_seconds_and_sleeps_in_real_time() -> None:
    # (That a wall clock step then moves nothing: tests/multinode/test_clock_skew.py, "stepped".)
    aligned = AlignedClock(SystemClock(time.monotonic))
    sent = aligned.local.now()
    aligned.align(time.time(), sent, aligned.local.now())
    assert abs(aligned.now() - time.time()) < 1.0  # epoch seconds (the monotonic zero is boot)
    began = aligned.now()
    await aligned.sleep_until(began + 0.05)
    assert aligned.now() >= began + 0.05
