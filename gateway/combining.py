"""Writes to one key, combined: one batch at a time per key, later arrivals together.

Many concurrent writers of one record (one user's tabs, a service identity's streams, a
mass reconnect) would otherwise race each other by compare-and-set. Here the first call
for a key starts a writer; calls that arrive while it writes wait and go, together and in
arrival order, into its next batch. Each caller gets its own result (or the batch's
exception). A caller that gave up before its batch started is left out of it. With a
``limit``, a batch takes at most that many items; the rest go in the next one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from gateway.tasks import stop

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
R = TypeVar("R")


class Combiner(Generic[K, T, R]):
    """``submit(key, item)`` runs ``write(key, items)`` for batches of items of one key,
    never two batches of one key at once; ``write`` returns one result per item."""

    def __init__(self, write: Callable[[K, list[T]], Awaitable[list[R]]],
                 limit: int | None = None) -> None:
        if limit is not None and limit < 1:
            raise ValueError("limit must be positive")
        self._write = write
        self._limit = limit
        self._queued: dict[K, list[tuple[T, asyncio.Future[R]]]] = {}
        self._writers: set[asyncio.Task[None]] = set()

    async def submit(self, key: K, item: T) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        queued = self._queued.get(key)
        if queued is None:
            queued = self._queued[key] = []
            writer = loop.create_task(self._drain(key, queued), name="combined writes")
            self._writers.add(writer)
            writer.add_done_callback(self._writers.discard)
        queued.append((item, future))
        return await future

    @property
    def keys_busy(self) -> int:
        return len(self._queued)

    async def close(self) -> None:
        """Stop every writer; callers still waiting get ``CancelledError``."""
        for writer in list(self._writers):
            await stop(writer)
        for queued in self._queued.values():  # of writers cancelled before they ever ran
            for _, future in queued:
                future.cancel()
        self._queued.clear()

    async def _drain(self, key: K, queued: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            while True:
                queued[:] = [(item, future) for item, future in queued if not future.done()]
                batch = queued[:self._limit]
                del queued[:self._limit]  # (a limited batch leaves the rest to the next, in order)
                if not batch:
                    return
                try:
                    results = await self._write(key, [item for item, _ in batch])
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                except BaseException:
                    for _, future in batch:
                        future.cancel()
                    raise
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:
            for _, future in queued:
                future.cancel()
            self._queued.pop(key, None)
