"""Stopping background tasks without swallowing the caller's own cancellation."""

from __future__ import annotations

import asyncio
from typing import Final

RECANCEL_AFTER: Final = 1.0  # seconds a cancelled task may take before it is asked again


async def stop(task: asyncio.Task[object] | None) -> None:
    """Cancel ``task`` and wait for it to end.

    The task's ``CancelledError`` is expected and absorbed; a cancellation of the *caller*
    that arrives while it waits propagates (never swallowed). A task still running a
    second after being cancelled is cancelled again, and so on: a library call can absorb a
    cancellation (redis-py on Python 3.11 does), and a task that then waits on something
    else would otherwise never end.
    """
    if task is None or task.done():
        return
    current = asyncio.current_task()
    pending_before = current.cancelling() if current is not None else 0
    task.cancel()
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=RECANCEL_AFTER)
            if done:
                break
            task.cancel()
        await task
    except asyncio.CancelledError:
        if current is not None and current.cancelling() > pending_before:
            raise


def raise_if_cancelled() -> None:
    """Raise ``CancelledError`` if the current task was asked to stop.

    For loops that catch a library's errors and go on: redis-py can turn a cancellation
    that arrives mid-command into a connection error, and a loop that retries on those
    would then never stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def pause(seconds: float) -> None:
    """``asyncio.sleep`` for retry and beat loops: a stop requested while the loop was in a
    library call that absorbed it takes effect here (``raise_if_cancelled``)."""
    raise_if_cancelled()
    await asyncio.sleep(seconds)


class Backoff:
    """Capped exponential waits for a retry loop that logs once per change of state.

    ``failed()`` is true on the first failure of a run (log it then), ``pause()`` waits the
    current delay and doubles it up to ``cap``; ``recovered()`` is true on the first
    success after failures (log that) and starts the delays over."""

    def __init__(self, first: float = 0.1, cap: float = 2.0) -> None:
        if first <= 0 or cap < first:
            raise ValueError("need 0 < first <= cap")
        self._first, self._cap = first, cap
        self._delay = first
        self.failing = False

    @property
    def next_delay(self) -> float:
        return self._delay

    def failed(self) -> bool:
        first, self.failing = not self.failing, True
        return first

    def recovered(self) -> bool:
        was, self.failing = self.failing, False
        self._delay = self._first
        return was

    async def pause(self) -> None:
        delay, self._delay = self._delay, min(self._delay * 2, self._cap)
        await pause(delay)
