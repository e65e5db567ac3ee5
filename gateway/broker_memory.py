"""The embedded single-node backend: workspace logs and presence records in process.

A workspace's log is forgotten once nothing needs it: no follower, no presence record, no
idempotency key still remembered, and every entry past ``history_max_age`` (or none ever
appended; reads create nothing). A later reader gets a fresh log; a client resuming from
an id of the forgotten one gets ``sync.reset``, which is what it would have got anyway once
the entries expired. Sweeping visits only workspaces with presence records that are due.
"""

from __future__ import annotations

import asyncio
import heapq
import secrets
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from gateway.broker import (
    Following,
    HistoryGone,
    LogSink,
    PresenceOutcome,
    Snapshot,
    publisher_key,
)
from gateway.clock import Clock, SystemClock
from gateway.presence import (
    PendingEvent,
    PresenceChange,
    UserRecord,
    bound_nodes,
    prune,
    transition,
)
from protocol.envelope import ZERO, EntryId, Envelope, EventId, WorkspaceKey
from protocol.errors import format_timestamp


@dataclass(slots=True)
class _Log:
    workspace: WorkspaceKey | None = None  # None: an empty log made for a read, never kept
    entries: deque[tuple[EntryId, Envelope]] = field(default_factory=deque)
    last: EntryId = ZERO
    # Highest entry id removed by retention (ZERO: nothing removed yet).
    trimmed_through: EntryId = ZERO
    records: dict[str, UserRecord] = field(default_factory=dict)
    followers: set[_Follower] = field(default_factory=set)
    # Idempotency key -> (forgotten at, the envelope its publish appended), oldest first.
    published: OrderedDict[str, tuple[float, Envelope]] = field(default_factory=OrderedDict)
    # When nothing in the log is needed any more (its last entry expired, its last key is
    # forgotten), unless followers or records hold it; and whether the broker's forget
    # queue holds it (once at most).
    forget_at: float = 0.0
    queued: bool = False


class _Follower:
    """A sink following one log: handed each event as it is appended (after catching up)."""

    __slots__ = ("_broker", "closed", "cursor", "live", "log", "sink")

    def __init__(self, broker: MemoryBroker, log: _Log, cursor: EventId, sink: LogSink) -> None:
        self._broker, self.log, self.cursor, self.sink = broker, log, cursor, sink
        self.live = False  # caught up: appends are delivered as they happen
        self.closed = False

    def move_to(self, position: EventId) -> None:
        self.cursor, self.live = position, False
        asyncio.get_running_loop().call_soon(self._broker._catch_up, self)

    def check(self) -> None:
        """Nothing to do: appends are delivered as they happen."""

    def close(self) -> None:
        self.closed = True
        self.log.followers.discard(self)
        self._broker._release(self.log)


class MemoryBroker:
    """Everything in one process. Its epoch is new on every start, so ids handed out by a
    previous process are answered with ``sync.reset`` rather than a silent gap."""

    def __init__(
        self,
        *,
        node_id: str = "memory",
        clock: Clock | None = None,
        history_max_len: int = 10_000,
        history_max_age: float = 86_400.0,
        idempotency_ttl: float = 300.0,
    ) -> None:
        self.node_id = node_id
        self.epoch = secrets.token_hex(4)
        self._clock = clock or SystemClock()
        self._max_len = history_max_len
        self._max_age_ms = int(history_max_age * 1000)
        self._idempotency_ttl = idempotency_ttl
        self._logs: dict[WorkspaceKey, _Log] = {}
        self._forget: list[tuple[float, int, _Log]] = []  # heap, by forget_at
        self._queued = 0
        # Workspace -> the earliest time a presence record of it may change by itself.
        self._expiring: dict[WorkspaceKey, float] = {}
        self._tickets: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    def require_current(self) -> None:
        """Always current: the log is in this process."""

    def _log(self, workspace: WorkspaceKey) -> _Log:
        log = self._logs.get(workspace)
        if log is None:
            log = self._logs[workspace] = _Log(workspace)
        return log

    def _existing(self, workspace: WorkspaceKey) -> _Log:
        """The workspace's log for a read: an empty one (not kept) if it has none."""
        return self._logs.get(workspace) or _Log()

    def _keep_until(self, log: _Log, moment: float) -> None:
        """The log is needed at least until ``moment``: queue it to be looked at then."""
        log.forget_at = max(log.forget_at, moment)
        if not log.queued:
            log.queued = True
            self._queued += 1
            heapq.heappush(self._forget, (log.forget_at, self._queued, log))

    def _forgettable(self, log: _Log, now: float) -> bool:
        return not log.followers and not log.records and log.forget_at <= now

    def _release(self, log: _Log) -> None:
        """A follower left: forget the log now if nothing else needs it."""
        if self._forgettable(log, self._clock.now()):
            self._drop(log)

    def _drop(self, log: _Log) -> None:
        if log.workspace is not None and self._logs.get(log.workspace) is log:
            del self._logs[log.workspace]

    def _forget_expired(self, now: float) -> None:
        """Forget the logs whose time came and that nothing holds (O(logs due))."""
        while self._forget and self._forget[0][0] <= now:
            _, _, log = heapq.heappop(self._forget)
            log.queued = False
            if log.workspace is None or self._logs.get(log.workspace) is not log:  # forgotten
                continue
            if log.forget_at > now:  # used again since it was queued
                self._keep_until(log, log.forget_at)
            elif self._forgettable(log, now):
                self._drop(log)
            # else followers or records hold it: the last of them to go forgets it

    def _position(self, log: _Log) -> EventId:
        return EventId(self.epoch, log.last)

    def _append(self, workspace: WorkspaceKey, log: _Log, pending: PendingEvent) -> Envelope:
        now = self._clock.now()
        ms = int(now * 1000)
        entry = EntryId(ms, 0) if ms > log.last.ms else EntryId(log.last.ms, log.last.seq + 1)
        envelope = Envelope(
            id=str(EventId(self.epoch, entry)),
            type=pending.type,
            org_id=workspace.org_id,
            workspace_id=workspace.workspace_id,
            actor=pending.actor,
            data=pending.data,
            timestamp=format_timestamp(datetime.fromtimestamp(now, UTC)),
        )
        log.entries.append((entry, envelope))
        log.last = entry
        self._trim(log, ms)
        self._keep_until(log, now + self._max_age_ms / 1000)
        if log.followers:
            # A copy: encodings the feed caches on what it delivers must not stay pinned
            # to the retained history.
            delivered = replace(envelope)
            for follower in tuple(log.followers):  # a sink may close its following
                if follower.live:
                    follower.cursor = EventId(self.epoch, entry)
                    follower.sink.deliver([delivered])
        return envelope

    def _trim(self, log: _Log, now_ms: int) -> None:
        oldest_kept = now_ms - self._max_age_ms
        while log.entries and (
            len(log.entries) > self._max_len or log.entries[0][0].ms < oldest_kept
        ):
            log.trimmed_through = log.entries.popleft()[0]

    async def append(
        self, workspace: WorkspaceKey, event_type: str, actor: dict[str, Any], data: dict[str, Any],
        idempotency_key: str | None = None,
    ) -> Envelope:
        log = self._log(workspace)
        if idempotency_key is None:
            return self._append(workspace, log, PendingEvent(event_type, actor, data))
        now = self._clock.now()
        while log.published and next(iter(log.published.values()))[0] <= now:
            log.published.popitem(last=False)
        key = publisher_key(actor, idempotency_key)
        earlier = log.published.get(key)
        if earlier is not None:
            return replace(earlier[1])
        envelope = self._append(workspace, log, PendingEvent(event_type, actor, data))
        log.published[key] = (now + self._idempotency_ttl, envelope)
        self._keep_until(log, now + self._idempotency_ttl)
        return envelope

    async def change_presence(
        self, workspace: WorkspaceKey, user_id: str, change: PresenceChange
    ) -> PresenceOutcome:
        # No await between read and write: atomic on the event loop.
        log = self._log(workspace)
        before = log.records.get(user_id)
        after = change.apply(before, self._clock.now())
        if after is None:
            log.records.pop(user_id, None)
        else:
            log.records[user_id] = after
            expiry = after.next_expiry()
            due = self._expiring.get(workspace)
            if expiry is not None and (due is None or expiry < due):
                self._expiring[workspace] = expiry  # only ever earlier: the sweep makes it exact
        events = tuple(
            self._append(workspace, log, pending)
            for pending in transition(before, after, change.reason)
        )
        return PresenceOutcome(after, events)

    async def presence_snapshot(self, workspace: WorkspaceKey) -> Snapshot:
        log = self._existing(workspace)
        members = {}
        for user_id, record in log.records.items():
            member = record.member()
            if member is not None:
                members[user_id] = member
        return Snapshot(members, self._position(log))

    def _after(self, log: _Log, after: EventId, limit: int | None = None) -> list[Envelope]:
        if after.epoch != self.epoch or after.entry > log.last:
            raise HistoryGone(str(after))
        if after.entry < log.trimmed_through:
            raise HistoryGone(str(after))
        if self._max_age_ms and log.entries:
            self._trim(log, int(self._clock.now() * 1000))
            if after.entry < log.trimmed_through:
                raise HistoryGone(str(after))
        newer = []
        for entry, envelope in reversed(log.entries):  # O(new events), not O(history)
            if entry <= after.entry:
                break
            # A copy: encodings cached on a delivered envelope must not stay pinned to history.
            newer.append(replace(envelope))
        newer.reverse()
        return newer if limit is None else newer[:limit]

    async def read_after(
        self, workspace: WorkspaceKey, after: EventId, limit: int = 256
    ) -> list[Envelope]:
        return self._after(self._existing(workspace), after, max(1, limit))

    def follow(self, workspace: WorkspaceKey, after: EventId, sink: LogSink) -> Following:
        follower = _Follower(self, self._log(workspace), after, sink)
        follower.log.followers.add(follower)
        asyncio.get_running_loop().call_soon(self._catch_up, follower)
        return follower

    def _catch_up(self, follower: _Follower) -> None:
        """Deliver what was appended after the follower's cursor, then go live (no await in
        between: nothing is appended meanwhile)."""
        if follower.closed or follower.live:
            return
        try:
            batch = self._after(follower.log, follower.cursor)
        except HistoryGone:
            follower.sink.history_gone()
            return
        follower.live = True
        if batch:
            follower.cursor = EventId.parse(batch[-1].id)
            follower.sink.deliver(batch)

    async def sweep(self) -> int:
        """Prune the presence records that are due (only workspaces with one due are
        visited), and forget the logs nothing needs any more."""
        now = self._clock.now()
        changed = 0
        for workspace, due in list(self._expiring.items()):
            if due > now:
                continue
            log = self._logs.get(workspace)
            records = log.records if log is not None else {}
            for user_id, record in list(records.items()):
                expiry = record.next_expiry()
                if expiry is not None and expiry <= now:
                    await self.change_presence(workspace, user_id, prune())
                    changed += 1
            soonest = min((expiry for record in records.values()
                           if (expiry := record.next_expiry()) is not None), default=None)
            if soonest is None:
                del self._expiring[workspace]
            else:
                self._expiring[workspace] = soonest
        self._forget_expired(now)
        return changed

    async def put_ticket(self, ticket: str, payload: dict[str, Any], ttl: float) -> None:
        now = self._clock.now()
        while self._tickets and next(iter(self._tickets.values()))[0] <= now:
            self._tickets.popitem(last=False)
        self._tickets[ticket] = (now + ttl, payload)

    async def take_ticket(self, ticket: str) -> dict[str, Any] | None:
        item = self._tickets.pop(ticket, None)
        if item is None or item[0] <= self._clock.now():
            return None
        return item[1]

    def on_reassert(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Nothing in process is ever lost behind this node's back: never called."""

    async def bound_to_node(self) -> set[tuple[WorkspaceKey, str]]:
        return {
            (workspace, user_id)
            for workspace, log in self._logs.items()
            for user_id, record in log.records.items()
            if self.node_id in bound_nodes(record)
        }
