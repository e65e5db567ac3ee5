"""Local subscriptions: one feed per workspace this node has interest in.

A feed tails the workspace log once, applies each event to the node's presence
replica, then offers it to every local subscriber's bounded ``Outbox`` without
awaiting any of them: a slow client overflows its own outbox and is closed,
and nobody else notices. Each event is encoded at most once per encoding
(``encoded``), whatever the number of subscribers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from gateway.broker import BackendUnavailable, Broker, HistoryGone, Snapshot
from gateway.presence import Replica, Resource
from gateway.tasks import stop
from protocol.envelope import (
    SYNC_RESET,
    SYNC_SNAPSHOT,
    Envelope,
    EventId,
    WorkspaceKey,
)
from protocol.errors import format_timestamp

log = logging.getLogger(__name__)

SYSTEM_ACTOR: Final = {"type": "system", "id": "gateway"}
FEED_IDLE_SECONDS: Final = 60.0
APPLY_WAIT_SECONDS: Final = 2.0


def encoded(envelope: Envelope, name: str, encode: Callable[[Envelope], bytes]) -> bytes:
    """``encode(envelope)``, computed once per envelope and encoding name."""
    cached = envelope._encoded.get(name)
    if cached is None:
        cached = envelope._encoded[name] = encode(envelope)
    return cached


def sync_envelope(
    workspace: WorkspaceKey, event_type: str, position: str, data: dict[str, Any]
) -> Envelope:
    """A ``sync.*`` event: not a log entry; its id is the log position it refers to."""
    return Envelope(
        id=position,
        type=event_type,
        org_id=workspace.org_id,
        workspace_id=workspace.workspace_id,
        actor=dict(SYSTEM_ACTOR),
        data=data,
        timestamp=format_timestamp(),
    )


@dataclass(frozen=True, slots=True)
class Closed:
    """The outbox is closed: ``overflow``, ``timeout``, ``token_expired``, ``drain``, ..."""

    reason: str


@dataclass(frozen=True, slots=True)
class Resync:
    """The log lost history this subscriber may not have seen: reset, then this snapshot."""

    snapshot: Envelope


OutItem = Envelope | Resync | Closed


class Outbox:
    """A subscriber's bounded queue. ``offer`` never blocks; overflow closes the outbox.

    Once closed, ``next`` answers ``Closed`` at once (queued items are dropped: the
    client resumes from the last id it received).
    """

    def __init__(self, limit: int, on_close: Callable[[str], None] | None = None) -> None:
        self._items: deque[Envelope | Resync] = deque()
        self._limit = limit
        self._ready = asyncio.Event()
        self.closed: Closed | None = None
        self._on_close = on_close

    def offer(self, item: Envelope | Resync) -> bool:
        if self.closed is not None:
            return False
        if len(self._items) >= self._limit:
            self.close("overflow")
            return False
        self._items.append(item)
        self._ready.set()
        return True

    def close(self, reason: str) -> None:
        if self.closed is not None:
            return
        self.closed = Closed(reason)
        self._items.clear()
        self._ready.set()
        if self._on_close is not None:
            self._on_close(reason)

    async def next(self) -> OutItem:
        while True:
            if self.closed is not None:
                return self.closed
            if self._items:
                return self._items.popleft()
            self._ready.clear()
            await self._ready.wait()

    def ready(self, limit: int) -> list[Envelope | Resync]:
        """Up to ``limit`` queued items, without waiting (for batching writes)."""
        if self.closed is not None:
            return []
        count = min(limit, len(self._items))
        return [self._items.popleft() for _ in range(count)]

    def __len__(self) -> int:
        return len(self._items)


def is_after(envelope: Envelope, cursor: EventId | None) -> bool:
    """True when ``envelope`` comes after ``cursor`` (always, across epochs)."""
    if cursor is None:
        return True
    event_id = EventId.parse(envelope.id)
    return event_id.epoch != cursor.epoch or event_id.entry > cursor.entry


class Feed:
    """One workspace's log as seen by this node: its replica and local subscribers."""

    def __init__(self, broker: Broker, workspace: WorkspaceKey, snapshot: Snapshot) -> None:
        self.workspace = workspace
        self.replica = Replica(snapshot.members, snapshot.position)
        self._broker = broker
        self._outboxes: set[Outbox] = set()
        self._waiters: list[tuple[EventId, asyncio.Future[None]]] = []
        # Idle until something attaches: a feed made for a presence read is reaped too.
        self.idle_since: float | None = asyncio.get_running_loop().time()
        self._task = asyncio.create_task(self._run(), name=f"feed {workspace}")

    def snapshot_envelope(self) -> Envelope:
        return sync_envelope(
            self.workspace, SYNC_SNAPSHOT, str(self.replica.position), self.replica.snapshot()
        )

    def attach(self, outbox: Outbox) -> Envelope:
        """Start delivering to ``outbox``; returns the snapshot its first event follows."""
        self._outboxes.add(outbox)
        self.idle_since = None
        return self.snapshot_envelope()

    def detach(self, outbox: Outbox) -> None:
        self._outboxes.discard(outbox)
        if not self._outboxes:
            self.idle_since = asyncio.get_running_loop().time()

    @property
    def subscriber_count(self) -> int:
        return len(self._outboxes)

    def presence(self, resource: Resource | None = None) -> dict[str, Any]:
        return self.replica.snapshot(resource)

    async def wait_applied(self, event_id: str) -> None:
        """Return once the replica has applied ``event_id`` (read-your-writes), or after
        ``APPLY_WAIT_SECONDS`` if the feed is stuck (the write itself has succeeded)."""
        target = EventId.parse(event_id)
        if target.epoch != self.replica.position.epoch or target.entry <= self.replica.position.entry:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, waiter))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(waiter), APPLY_WAIT_SECONDS)

    def _wake_waiters(self) -> None:
        position = self.replica.position
        pending = []
        for target, waiter in self._waiters:
            if target.epoch != position.epoch or target.entry <= position.entry:
                if not waiter.done():
                    waiter.set_result(None)
            else:
                pending.append((target, waiter))
        self._waiters = pending

    def _deliver(self, batch: list[Envelope]) -> None:
        outboxes = tuple(self._outboxes)  # offer() may close (and detach) an outbox
        for envelope in batch:
            self.replica.apply(envelope)
            for outbox in outboxes:
                outbox.offer(envelope)
        self._wake_waiters()

    async def _resync(self) -> None:
        snapshot = await self._broker.presence_snapshot(self.workspace)
        self.replica = Replica(snapshot.members, snapshot.position)
        resync = Resync(self.snapshot_envelope())
        for outbox in tuple(self._outboxes):
            outbox.offer(resync)
        self._wake_waiters()

    async def _run(self) -> None:
        delay = 0.05
        failing = False
        while True:
            try:
                async for batch in self._broker.tail(self.workspace, self.replica.position):
                    self._deliver(batch)
                    if failing:
                        log.info("feed reading again", extra={"workspace": str(self.workspace)})
                        failing, delay = False, 0.05
            except HistoryGone:
                log.warning("workspace log lost history; resyncing",
                            extra={"workspace": str(self.workspace)})
                with contextlib.suppress(BackendUnavailable):
                    await self._resync()
            except BackendUnavailable:
                if not failing:
                    log.warning("feed cannot read the backend; retrying",
                                extra={"workspace": str(self.workspace)})
                    failing = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            except Exception:
                # A bug or an entry nobody foresaw must not silence the workspace for good.
                if not failing:
                    log.exception("feed failed; retrying", extra={"workspace": str(self.workspace)})
                    failing = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def close(self) -> None:
        await stop(self._task)
        for _, waiter in self._waiters:  # a caller waiting to read its write gives up, unharmed
            if not waiter.done():
                waiter.set_result(None)


class Hub:
    """The feeds of this node, created on first interest, closed when idle."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._feeds: dict[WorkspaceKey, Feed] = {}
        self._creating: dict[WorkspaceKey, asyncio.Lock] = {}

    async def feed(self, workspace: WorkspaceKey) -> Feed:
        feed = self._feeds.get(workspace)
        if feed is not None:
            return feed
        lock = self._creating.setdefault(workspace, asyncio.Lock())
        async with lock:
            feed = self._feeds.get(workspace)
            if feed is None:
                snapshot = await self._broker.presence_snapshot(workspace)
                feed = self._feeds[workspace] = Feed(self._broker, workspace, snapshot)
        self._creating.pop(workspace, None)
        return feed

    def existing_feed(self, workspace: WorkspaceKey) -> Feed | None:
        return self._feeds.get(workspace)

    def member_count(self) -> int:
        """Members of every workspace this node follows (its replicas)."""
        return sum(len(feed.replica.members) for feed in self._feeds.values())

    def outboxes(self) -> list[Outbox]:
        return [outbox for feed in self._feeds.values() for outbox in feed._outboxes]

    def close_all(self, reason: str) -> None:
        """Close every local subscriber (drain)."""
        for outbox in self.outboxes():
            outbox.close(reason)

    async def reap_idle(self, idle_seconds: float = FEED_IDLE_SECONDS) -> None:
        now = asyncio.get_running_loop().time()
        for workspace, feed in list(self._feeds.items()):
            if feed.idle_since is not None and now - feed.idle_since >= idle_seconds:
                del self._feeds[workspace]
                await feed.close()

    async def close(self) -> None:
        feeds, self._feeds = list(self._feeds.values()), {}
        for feed in feeds:
            await feed.close()


async def replay_or_reset(
    broker: Broker, feed: Feed, snapshot: Envelope, since: str | None
) -> tuple[list[Envelope], EventId | None]:
    """What a subscriber attached at ``snapshot`` receives first, and the cursor after it.

    Without ``since``: the snapshot. With a resumable ``since``: every retained event
    after it (live events the outbox already holds are skipped by the cursor).
    Otherwise: ``sync.reset`` and the snapshot.
    """
    if since is None:
        return [snapshot], EventId.parse(snapshot.id)
    try:
        cursor = EventId.parse(since)
        replay = await broker.read_after(feed.workspace, cursor)
    except (ValueError, HistoryGone):
        reset = sync_envelope(
            feed.workspace, SYNC_RESET, snapshot.id,
            # Echoed for the client's logs: printable ASCII only (headers may carry any bytes).
            {"reason": "history_unavailable",
             "last_event_id": since[:128].encode("ascii", "replace").decode()},
        )
        return [reset, snapshot], EventId.parse(snapshot.id)
    if replay:
        cursor = EventId.parse(replay[-1].id)
    return replay, cursor
