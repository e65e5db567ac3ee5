"""The Broker: the seam between the gateway and where workspace logs live.

A workspace log is an ordered, retained sequence of events. Presence changes are
applied to the backend's per-user records and appended to the log as one atomic
step, so concurrent changes (from any node) yield exactly one event per
transition. Every node builds its presence replica from ``presence_snapshot``
plus the entries after it (``follow``).

Implementations: ``broker_memory.MemoryBroker`` (one node, in process) and
``broker_redis.RedisBroker`` (Redis Streams, many nodes); ``app.backend_for`` picks one.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.presence import PresenceChange, UserRecord
from protocol.envelope import Envelope, EventId, WorkspaceKey


class HistoryGone(Exception):
    """The id cannot be resumed from: it is older than retained history, of another
    epoch (the log was lost and restarted), or not an id this log ever issued."""


class BackendUnavailable(Exception):
    """The backend cannot be reached now; callers answer 503 and retry later."""


class BackendRefused(Exception):
    """The backend is set up in a way the gateway cannot run on safely (``start``): the
    message says what to change."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Members of a workspace, consistent with the log up to and including ``position``."""

    members: dict[str, dict[str, Any]]
    position: EventId


@dataclass(frozen=True, slots=True)
class PresenceOutcome:
    record: UserRecord | None
    events: tuple[Envelope, ...]


def publisher_key(actor: dict[str, Any], idempotency_key: str) -> str:
    """An idempotency key as a backend keeps it: scoped to its publisher (the actor), so
    nobody gets another publisher's event back by sending its key."""
    return json.dumps([actor.get("type"), actor.get("id"), idempotency_key],
                      separators=(",", ":"), ensure_ascii=True)


class Broker(Protocol):
    node_id: str

    async def start(self) -> None:
        """Connect and start background work; raises ``BackendUnavailable``."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Return if the backend is reachable and accepting writes; else raise ``BackendUnavailable``."""

    def require_current(self) -> None:
        """Raise ``BackendUnavailable`` if this node may be cut off from the shared log, so
        that what it replicated from it may be out of date (a partition)."""

    async def append(
        self, workspace: WorkspaceKey, event_type: str, actor: dict[str, Any], data: dict[str, Any],
        idempotency_key: str | None = None,
    ) -> Envelope:
        """Append one published event to the workspace log and return it with its id.

        With ``idempotency_key``: if the workspace saw that key from the same publisher
        (``publisher_key``) within the idempotency TTL, append nothing and return the
        envelope appended then (atomically: of two concurrent calls with one key, one appends
        and the other gets its envelope)."""

    async def change_presence(
        self, workspace: WorkspaceKey, user_id: str, change: PresenceChange
    ) -> PresenceOutcome:
        """Apply ``change`` to the user's record and append the events of the transition,
        atomically with respect to every other change of that workspace."""

    async def presence_snapshot(self, workspace: WorkspaceKey) -> Snapshot: ...

    async def read_after(
        self, workspace: WorkspaceKey, after: EventId, limit: int = 256
    ) -> list[Envelope]:
        """The first ``limit`` retained events after ``after``, in order (a page: read on
        from the last one); ``HistoryGone`` if some were not retained or ``after`` is not
        of this log."""

    def follow(self, workspace: WorkspaceKey, after: EventId, sink: LogSink) -> Following:
        """Deliver to ``sink`` the events after ``after``, then every new one, in order, until
        closed; ``sink.history_gone`` when the log lost entries the sink had not received."""

    async def sweep(self) -> int:
        """Apply ``prune`` to every record whose time is up; returns how many changed."""

    async def put_ticket(self, ticket: str, payload: dict[str, Any], ttl: float) -> None: ...

    async def take_ticket(self, ticket: str) -> dict[str, Any] | None:
        """The ticket's payload, once: a second take (or an expired ticket) gives None."""

    def on_reassert(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Register what to call when this node's sessions in the backend may have been lost
        or removed (its heartbeat lapsed, the backend came back, or lost its data); the
        callback re-asserts what the node still holds (``presence.restore``)."""

    async def bound_to_node(self) -> set[tuple[WorkspaceKey, str]]:
        """The (workspace, user) pairs whose records hold sessions or streams of this node."""


class LogSink(Protocol):
    """Where a followed log's events go (a hub feed)."""

    def deliver(self, batch: list[Envelope]) -> None:
        """Events after the previous batch, in log order. Must not block."""

    def history_gone(self) -> None:
        """The log lost history after the last event delivered: nothing more is delivered
        until ``Following.move_to`` names a position in a fresh snapshot."""


class Following(Protocol):
    def move_to(self, position: EventId) -> None:
        """Deliver again, from ``position`` (of a fresh snapshot, after ``history_gone``)."""

    def check(self) -> None:
        """Read the log soon, notified or not (a client showed an id of a newer epoch)."""

    def close(self) -> None: ...


class _QueueSink:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[list[Envelope] | None] = asyncio.Queue()

    def deliver(self, batch: list[Envelope]) -> None:
        self.queue.put_nowait(batch)

    def history_gone(self) -> None:
        self.queue.put_nowait(None)


async def tail(broker: Broker, workspace: WorkspaceKey, after: EventId) -> AsyncIterator[list[Envelope]]:
    """``follow`` as an iterator of batches (for tools and tests: unbounded buffering);
    raises ``HistoryGone`` when the log lost entries not yet delivered."""
    sink = _QueueSink()
    following = broker.follow(workspace, after, sink)
    try:
        while True:
            batch = await sink.queue.get()
            if batch is None:
                raise HistoryGone(str(after))
            if batch:
                after = EventId.parse(batch[-1].id)
                yield batch
    finally:
        following.close()
