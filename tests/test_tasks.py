"""Stopping a background task never swallows the stopper's own cancellation."""

from __future__ import annotations

import asyncio

import pytest

from gateway.tasks import Backoff, stop


async def test_stop_absorbs_the_tasks_cancellation():
    task = asyncio.create_task(asyncio.sleep(60))
    await stop(task)
    assert task.cancelled()


async def test_stop_lets_the_callers_cancellation_through():
    async def stubborn() -> None:  # takes a while to wind down after cancel()
        try:
            await asyncio.sleep(60)
        finally:
            await asyncio.shield(asyncio.sleep(0.2))

    inner = asyncio.create_task(stubborn())
    stopper = asyncio.create_task(stop(inner))
    await asyncio.sleep(0.05)
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper


async def test_stop_ends_a_task_that_absorbed_its_cancellation():
    wake = asyncio.Event()

    async def absorbs_once() -> None:  # as a library call that swallows CancelledError
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            pass
        await wake.wait()  # would wait forever after one cancel()

    task = asyncio.create_task(absorbs_once())
    await asyncio.sleep(0)
    await asyncio.wait_for(stop(task), 5)
    assert task.cancelled()


async def test_backoff_doubles_to_its_cap_logs_once_and_starts_over_after_a_success():
    backoff = Backoff(0.001, 0.004)
    assert backoff.failed() and not backoff.failed()  # only the first failure is news
    delays = []
    for _ in range(4):
        delays.append(backoff.next_delay)
        await backoff.pause()
    assert delays == [0.001, 0.002, 0.004, 0.004]
    assert backoff.recovered() and not backoff.recovered()
    assert backoff.next_delay == 0.001
    with pytest.raises(ValueError):
        Backoff(0.5, 0.1)
