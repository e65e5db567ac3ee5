"""Stopping background tasks without swallowing the caller's own cancellation."""

from __future__ import annotations

import asyncio


async def stop(task: asyncio.Task[object] | None) -> None:
    """Cancel ``task`` and wait for it to end.

    The task's ``CancelledError`` is expected and absorbed; a cancellation of the *caller*
    that arrives while it waits propagates (never swallowed).
    """
    if task is None or task.done():
        return
    current = asyncio.current_task()
    pending_before = current.cancelling() if current is not None else 0
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        if current is not None and current.cancelling() > pending_before:
            raise
