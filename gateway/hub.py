"""Local subscriptions: one feed per workspace this node has interest in.

A feed follows the workspace log once (the backend hands it each batch: no task per
feed), applies each event to the node's presence replica, then hands the batch to every
local ``Subscriber``, which writes it to its connection's transport at once — one write
per batch, no task, queue or await — or, if that connection is behind, to its bounded
queue: a slow client overflows its own queue and is closed, and nobody else notices.
Each event is encoded at most once per wire format, whatever the number of subscribers.
SSE and WebSocket differ only in their ``Transport``'s encoding and close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client import Counter

from gateway.broker import BackendUnavailable, Broker, HistoryGone, Snapshot
from gateway.presence import Replica, Resource
from gateway.tasks import Backoff, stop
from gateway.transports import OVERFLOW, Transport
from protocol.envelope import (
    PRESENCE_JOINED,
    SYNC_RESET,
    SYNC_SNAPSHOT,
    ZERO,
    Envelope,
    EventId,
    WorkspaceKey,
)
from protocol.errors import format_timestamp

log = logging.getLogger(__name__)

SYSTEM_ACTOR: Final = {"type": "system", "id": "gateway"}
FEED_IDLE_SECONDS: Final = 60.0
APPLY_WAIT_SECONDS: Final = 2.0


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
class Resync:
    """The log lost history: a waiting subscriber gets ``sync.reset``, then this snapshot."""

    snapshot: Envelope


class Subscriber:
    """One workspace delivered to one connection: its replay, then its live events.

    The feed hands it each batch as it arrives (``deliver``, synchronous). Once live, it
    skips what the replay already gave and writes the rest, encoded once per encoding for
    the whole node, to its transport in one write. While its replay is read (``holding``),
    live events wait here, bounded: if they overflow, they are dropped and ``lagged`` is
    set, and the replay reads them again from the log. A history loss (``resync``) becomes
    ``sync.reset`` and the fresh snapshot. ``last_id`` is the last event id given to the
    transport (what a client resumes after).
    """

    __slots__ = (
        "_limit",
        "_live",
        "_skip_through",
        "_waiting",
        "delivered",
        "holding",
        "lagged",
        "last_id",
        "transport",
        "workspace",
    )

    def __init__(self, workspace: WorkspaceKey, transport: Transport, limit: int,
                 delivered: Counter) -> None:
        self.workspace = workspace
        self.transport = transport
        self.delivered = delivered  # the events_delivered counter of its transport kind
        self._limit = limit
        self._waiting: deque[Envelope | Resync] | None = deque()  # None once live
        self._live = False
        self.holding = False
        self.lagged = False
        # Events up to here were given by the replay; None once a newer one went through
        # (from then on the feed's order holds, and no id needs comparing).
        self._skip_through: EventId | None = None
        self.last_id = ""

    @property
    def closed(self) -> str | None:
        return self.transport.closed

    def close(self, reason: str) -> None:
        self.transport.close(reason)

    def deliver(self, batch: list[Envelope]) -> int:
        """Write (or, before ``go_live``, keep) a batch; returns the frames written."""
        if self._live:
            return self._write(batch)
        self._wait(batch)
        return 0

    def resync(self, snapshot: Envelope) -> None:
        if not self._live:
            self._wait((Resync(snapshot),))
            return
        reset = sync_envelope(self.workspace, SYNC_RESET, snapshot.id,
                              {"reason": "history_lost", "last_event_id": self.last_id})
        encoding = self.transport.encoding
        self._skip_through = snapshot.event_id
        self.last_id = snapshot.id
        self.transport.send(encoding.event(reset) + encoding.encoded(snapshot), 2)

    def drop(self) -> None:
        """Forget what waits (a replay starts over from a fresh snapshot)."""
        if self._waiting is not None:
            self._waiting.clear()
        self.lagged = False

    def go_live(self, cursor: EventId | None) -> None:
        """Write what waited (skipping what the replay gave up to ``cursor``), then every
        later batch as it comes."""
        self._skip_through = cursor
        self._live = True
        waiting, self._waiting = self._waiting or deque(), None
        batch: list[Envelope] = []
        while waiting and self.closed is None:
            item = waiting.popleft()
            if isinstance(item, Envelope):
                batch.append(item)
                continue
            if batch:
                self.delivered.inc(self._write(batch))
                batch = []
            self.resync(item.snapshot)
        if batch:
            self.delivered.inc(self._write(batch))

    async def replay(self, replay: Replay) -> bool:
        """Write ``replay`` a page at a time, each once the client has read the one before
        (a client resuming far back makes the node hold one page for it), then go live.
        False if the transport closed first."""
        transport = self.transport
        event = transport.encoding.event  # replayed envelopes may be retained: not cached
        async with contextlib.aclosing(replay.pages()) as pages:
            async for page in pages:
                if not await transport.paced(b"".join(event(envelope) for envelope in page)):
                    return False
                self.last_id = page[-1].id
                self.delivered.inc(len(page))
        self.go_live(replay.cursor)
        return True

    def _wait(self, items: Iterable[Envelope | Resync]) -> None:
        assert self._waiting is not None  # (not live)
        self._waiting.extend(items)
        if len(self._waiting) > self._limit:
            self._waiting.clear()
            if self.holding:
                self.lagged = True
            else:
                self.transport.close(OVERFLOW)

    def _write(self, batch: list[Envelope]) -> int:
        if self.transport.closed is not None:
            return 0  # (detached by its handler soon)
        skip = self._skip_through
        if skip is not None:
            start = 0
            while start < len(batch) and not is_after(batch[start], skip):
                start += 1  # already given by the replay
            if start == len(batch):
                return 0
            self._skip_through = None
            batch = batch[start:]
        encoded = self.transport.encoding.encoded
        self.last_id = batch[-1].id
        if len(batch) == 1:
            data = encoded(batch[0])
            frames = 1 if data else 0
        else:
            parts = [encoded(envelope) for envelope in batch]
            data = b"".join(parts)
            frames = len(parts) - parts.count(b"")
        if frames and self.transport.send(data, frames):
            return frames
        return 0


def is_after(envelope: Envelope, cursor: EventId | None) -> bool:
    """True when ``envelope`` comes after ``cursor`` (always, across epochs)."""
    if cursor is None:
        return True
    event_id = envelope.event_id
    return event_id.epoch != cursor.epoch or event_id.entry > cursor.entry


def _reached(target: EventId, position: EventId) -> bool:
    """Whether a replica at ``position`` has applied ``target`` (or never will: another epoch).
    A replica at the start of a log has applied nothing, of any epoch (the log may get its
    epoch with its first entry)."""
    if position.entry == ZERO:
        return target.epoch == position.epoch and target.entry == ZERO
    return target.epoch != position.epoch or target.entry <= position.entry


class Feed:
    """One workspace's log as seen by this node: its replica and local subscribers.

    It is the log's sink (``Broker.follow``): batches arrive in log order; when the log
    lost history the feed had not received, it resyncs from a fresh snapshot and every
    subscriber is reset to it."""

    def __init__(self, broker: Broker, workspace: WorkspaceKey, snapshot: Snapshot,
                 on_present: Callable[[WorkspaceKey, str], None] | None = None) -> None:
        self.workspace = workspace
        self._on_present = on_present
        self.replica = Replica(snapshot.members, snapshot.position)
        self._broker = broker
        self._subscribers: set[Subscriber] = set()
        self._waiters: list[tuple[EventId, asyncio.Future[None]]] = []
        self._resynced: list[asyncio.Future[None]] = []
        # Idle until something attaches: a feed made for a presence read is reaped too.
        self.idle_since: float | None = asyncio.get_running_loop().time()
        self._resyncing: asyncio.Task[None] | None = None
        self._following = broker.follow(workspace, snapshot.position, self)

    def snapshot_envelope(self) -> Envelope:
        """The replica's snapshot, as of its position (the parsed id every subscriber that starts
        there keeps until its first live event: the replica's own)."""
        position = self.replica.position
        return sync_envelope(
            self.workspace, SYNC_SNAPSHOT, str(position), self.replica.snapshot()
        ).known_at(position)

    def attach(self, subscriber: Subscriber) -> Envelope:
        """Start delivering to ``subscriber``; returns the snapshot its first event follows."""
        self._subscribers.add(subscriber)
        self.idle_since = None
        return self.snapshot_envelope()

    def detach(self, subscriber: Subscriber) -> None:
        self._subscribers.discard(subscriber)
        if not self._subscribers:
            self.idle_since = asyncio.get_running_loop().time()

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def presence(self, resource: Resource | None = None) -> dict[str, Any]:
        return self.replica.snapshot(resource)

    async def wait_applied(self, event_id: str) -> None:
        """Return once the replica has applied ``event_id`` (read-your-writes), or after
        ``APPLY_WAIT_SECONDS`` if the feed is stuck (the write itself has succeeded)."""
        target = EventId.parse(event_id)
        if _reached(target, self.replica.position):
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, waiter))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(waiter), APPLY_WAIT_SECONDS)

    async def reach_epoch(self, epoch: str) -> None:
        """Return once the replica is in ``epoch`` (a client's id showed the log has it),
        having asked the backend to read the log now (callers bound the wait)."""
        self._following.check()
        while self.replica.position.epoch != epoch:
            resynced: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._resynced.append(resynced)
            try:
                await resynced
            finally:  # given up (timed out): not kept until the next resync
                if resynced in self._resynced:
                    self._resynced.remove(resynced)

    def _wake_waiters(self) -> None:
        position = self.replica.position
        pending = []
        for target, waiter in self._waiters:
            if _reached(target, position):
                if not waiter.done():
                    waiter.set_result(None)
            else:
                pending.append((target, waiter))
        self._waiters = pending

    def deliver(self, batch: list[Envelope]) -> None:
        for envelope in batch:
            self.replica.apply(envelope)
            if envelope.type == PRESENCE_JOINED and self._on_present is not None:
                user_id = envelope.data.get("user_id")
                if isinstance(user_id, str):
                    self._on_present(self.workspace, user_id)
        written: dict[Counter, int] = {}  # one metrics update per kind of transport
        for subscriber in tuple(self._subscribers):
            frames = subscriber.deliver(batch)
            if frames:
                written[subscriber.delivered] = written.get(subscriber.delivered, 0) + frames
        for counter, frames in written.items():
            counter.inc(frames)
        self._wake_waiters()

    def history_gone(self) -> None:
        if self._resyncing is None or self._resyncing.done():
            self._resyncing = asyncio.get_running_loop().create_task(
                self._resync(), name=f"feed resync {self.workspace}")

    async def _resync(self) -> None:
        """A fresh snapshot (retried until the backend answers), every subscriber reset
        to it, and delivery again from the snapshot's position."""
        log.warning("workspace log lost history; resyncing", extra={"workspace": str(self.workspace)})
        backoff = Backoff(0.05, 2.0)
        while True:
            try:
                snapshot = await self._broker.presence_snapshot(self.workspace)
                break
            except Exception as exc:
                if not isinstance(exc, BackendUnavailable) and backoff.failed():
                    log.exception("feed resync failed; retrying", extra={"workspace": str(self.workspace)})
                await backoff.pause()
        self.replica = Replica(snapshot.members, snapshot.position)
        if self._on_present is not None:  # joins it may not have seen
            for user_id in tuple(self.replica.members):
                self._on_present(self.workspace, user_id)
        fresh = self.snapshot_envelope()
        for subscriber in tuple(self._subscribers):
            subscriber.resync(fresh)
        self._wake_waiters()
        resynced, self._resynced = self._resynced, []
        for waiter in resynced:
            if not waiter.done():
                waiter.set_result(None)
        self._following.move_to(snapshot.position)

    async def close(self) -> None:
        self._following.close()
        await stop(self._resyncing)
        for _, waiter in self._waiters:  # a caller waiting to read its write gives up, unharmed
            if not waiter.done():
                waiter.set_result(None)


class Hub:
    """The feeds of this node, created on first interest, closed when idle."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._feeds: dict[WorkspaceKey, Feed] = {}
        self._creating: dict[WorkspaceKey, asyncio.Lock] = {}
        # Told when a feed shows a user present (a join, or a resync's snapshot).
        self.on_present: Callable[[WorkspaceKey, str], None] | None = None

    async def feed(self, workspace: WorkspaceKey) -> Feed:
        feed = self._feeds.get(workspace)
        if feed is not None:
            return feed
        lock = self._creating.setdefault(workspace, asyncio.Lock())
        try:
            async with lock:
                feed = self._feeds.get(workspace)
                if feed is None:
                    snapshot = await self._broker.presence_snapshot(workspace)
                    # A creation under a newer lock (this one's creator failed) may have won.
                    feed = self._feeds.get(workspace)
                    if feed is None:
                        feed = self._feeds[workspace] = Feed(
                            self._broker, workspace, snapshot, self._present)
        finally:  # also when the snapshot failed: a lock per workspace ever asked is a leak
            if self._creating.get(workspace) is lock:
                del self._creating[workspace]
        return feed

    def _present(self, workspace: WorkspaceKey, user_id: str) -> None:
        if self.on_present is not None:
            self.on_present(workspace, user_id)

    def existing_feed(self, workspace: WorkspaceKey) -> Feed | None:
        return self._feeds.get(workspace)

    def member_count(self) -> int:
        """Members of every workspace this node follows (its replicas)."""
        return sum(len(feed.replica.members) for feed in self._feeds.values())

    def subscribers(self) -> list[Subscriber]:
        return [subscriber for feed in self._feeds.values() for subscriber in feed._subscribers]

    def close_all(self, reason: str) -> None:
        """Close every local subscriber's connection (drain)."""
        for subscriber in self.subscribers():
            subscriber.close(reason)

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


REPLAY_PAGE: Final = 32  # events: at most 32 x 64 KiB held for a client that does not read
# How long a resume with an id of a newer epoch than this node's feed waits for the feed to
# resync (it lags a data loss by its notification connection's reconnection, at most).
CATCH_UP_SECONDS: Final = 3.0


class Replay:
    """What a subscriber attached to ``feed`` (at ``snapshot``) receives
    before live events, a page at a time, at the client's pace: a client resuming far back
    never makes the node hold more than a page for it, and never overflows for it.

    Without ``since``: the snapshot. With a resumable ``since``: every retained event after
    it, up to the snapshot's position (later ones are live events, waiting in the subscriber).
    Otherwise — or if history goes while the replay is read — ``sync.reset`` and a snapshot.
    While the replay is read the subscriber is ``holding``: if live events overflow it, they are
    dropped and read from the log after the replay, until the replay has caught up with them.
    ``cursor`` is the position after everything given so far: live events up to it are
    duplicates."""

    def __init__(self, broker: Broker, feed: Feed, subscriber: Subscriber, snapshot: Envelope,
                 since: str | None) -> None:
        self._broker, self._feed, self._subscriber = broker, feed, subscriber
        self._workspace, self._snapshot, self._since = feed.workspace, snapshot, since
        self._until: EventId | None = snapshot.event_id
        self.cursor: EventId | None = self._until
        self.reset = False
        self._first: list[Envelope] = []
        self._more = False
        subscriber.holding = True

    async def start(self) -> Replay:
        """Read the first event (so ``reset`` is known before anything is sent; only one:
        a socket may start many replays before it reads any)."""
        if self._since is None:
            self._first = [self._snapshot]
            return self
        try:
            self.cursor = EventId.parse(self._since)
        except ValueError:
            self._first = self._reset(self._snapshot)
            return self
        if self.cursor.epoch != self._snapshot_epoch:
            await self._catch_up_with(self.cursor)
        self._first = await self._page(retry=False, limit=1)
        return self

    @property
    def _snapshot_epoch(self) -> str:
        return self._snapshot.event_id.epoch

    @property
    def snapshot(self) -> Envelope:
        """The snapshot the replay leads to (live events follow its position)."""
        return self._snapshot

    async def _catch_up_with(self, since: EventId) -> None:
        """``since`` is of another epoch than this node's feed. If the log has it, the feed
        has not yet seen the log's new epoch (a data loss moments ago): let it catch up, and
        lead the replay to its fresh snapshot, rather than reset a client that missed
        nothing (then reset it again when the feed resyncs)."""
        try:
            await self._broker.read_after(self._workspace, since, 1)
        except HistoryGone:
            return  # gone indeed: sync.reset
        try:
            async with asyncio.timeout(CATCH_UP_SECONDS):
                await self._feed.reach_epoch(since.epoch)
        except TimeoutError:
            return  # the feed is stuck: the resume is reset, and is never wrong
        self._subscriber.drop()  # live events of the old epoch, and the feed's Resync
        self._snapshot = self._feed.snapshot_envelope()
        self._until = self._snapshot.event_id

    def _reset(self, snapshot: Envelope) -> list[Envelope]:
        self.reset, self._more = True, False
        self.cursor = snapshot.event_id
        reset = sync_envelope(
            self._workspace, SYNC_RESET, snapshot.id,
            # Echoed for the client's logs: printable ASCII only (headers may carry any bytes).
            {"reason": "history_unavailable",
             "last_event_id": (self._since or "")[:128].encode("ascii", "replace").decode()},
        )
        return [reset, snapshot]

    async def _page(self, *, retry: bool = True, limit: int = REPLAY_PAGE) -> list[Envelope]:
        """The next page up to ``_until`` (to the log's end once it is None)."""
        assert self.cursor is not None
        if self.cursor == self._until:
            self._more = False
            return []
        try:
            page = await self._read(self.cursor, retry, limit)
        except HistoryGone:
            if self._until is None:  # live events were dropped: start over from now
                self._subscriber.drop()
                return self._reset(self._feed.snapshot_envelope())
            return self._reset(self._snapshot)
        self._more = len(page) >= limit
        kept = page if self._until is None else [e for e in page if not is_after(e, self._until)]
        if len(kept) < len(page):
            self._more = False
        if kept:
            self.cursor = EventId.parse(kept[-1].id)
        return kept

    async def _read(self, after: EventId, retry: bool, limit: int) -> list[Envelope]:
        """A page of the log; while the backend is unavailable, retried for as long as the
        subscriber is there (it has part of its replay: an error now would help nobody)."""
        backoff = Backoff(0.05, 2.0)
        while True:
            try:
                return await self._broker.read_after(self._workspace, after, limit)
            except BackendUnavailable:
                if not retry:
                    raise
            if self._subscriber.closed is not None:
                return []
            await backoff.pause()

    async def pages(self) -> AsyncGenerator[list[Envelope], None]:
        try:
            page, self._first = self._first, []
            while page:
                yield page
                page = await self._page() if self._more else []
            # Live events overflowed the subscriber meanwhile: read on from the log. The last
            # read starts after it holds again, so whatever it misses is queued there.
            while self._subscriber.lagged and self._subscriber.closed is None:
                self._subscriber.lagged = False
                self._until = None
                page = await self._page()
                if self._more:
                    self._subscriber.lagged = True  # a full page: there is more to read first
                if page:
                    yield page
        finally:
            self._subscriber.holding = False
