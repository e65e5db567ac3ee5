"""The Broker: the seam between the gateway and where workspace logs live.

A workspace log is an ordered, retained sequence of events. Presence changes are
applied to the backend's per-user records and appended to the log as one atomic
step, so concurrent changes (from any node) yield exactly one event per
transition. Every node builds its presence replica from ``presence_snapshot``
plus the entries after it (``tail``).

Implementations: ``broker_memory.MemoryBroker`` (one node, in process) and
``broker_redis.RedisBroker`` (Redis Streams, many nodes).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from gateway.presence import PresenceChange, UserRecord
from protocol.envelope import Envelope, EventId, WorkspaceKey

if TYPE_CHECKING:
    from gateway.clock import Clock
    from gateway.config import Settings


class HistoryGone(Exception):
    """The id cannot be resumed from: it is older than retained history, of another
    epoch (the log was lost and restarted), or not an id this log ever issued."""


class BackendUnavailable(Exception):
    """The backend cannot be reached now; callers answer 503 and retry later."""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Members of a workspace, consistent with the log up to and including ``position``."""

    members: dict[str, dict[str, Any]]
    position: EventId


@dataclass(frozen=True, slots=True)
class PresenceOutcome:
    record: UserRecord | None
    events: tuple[Envelope, ...]


class Broker(Protocol):
    node_id: str

    async def start(self) -> None:
        """Connect and start background work; raises ``BackendUnavailable``."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Return if the backend is reachable and accepting writes; else raise ``BackendUnavailable``."""

    async def append(
        self, workspace: WorkspaceKey, event_type: str, actor: dict[str, Any], data: dict[str, Any]
    ) -> Envelope:
        """Append one published event to the workspace log and return it with its id."""

    async def change_presence(
        self, workspace: WorkspaceKey, user_id: str, change: PresenceChange
    ) -> PresenceOutcome:
        """Apply ``change`` to the user's record and append the events of the transition,
        atomically with respect to every other change of that workspace."""

    async def presence_snapshot(self, workspace: WorkspaceKey) -> Snapshot: ...

    async def read_after(self, workspace: WorkspaceKey, after: EventId) -> list[Envelope]:
        """Every retained event after ``after``, in order; ``HistoryGone`` if some were
        not retained or ``after`` is not of this log."""

    def tail(self, workspace: WorkspaceKey, after: EventId) -> AsyncIterator[list[Envelope]]:
        """Batches of events after ``after`` as they are appended, forever (blocking reads).
        Raises ``HistoryGone`` if the log lost entries the reader had not read."""

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


def broker_for(url: str | None, **kwargs: Any) -> Broker:
    """A backend chosen by URL scheme: none or ``memory://`` embedded, ``redis://`` / ``rediss://``."""
    if url is None or url.startswith("memory://"):
        from gateway.broker_memory import MemoryBroker

        return MemoryBroker(**kwargs)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from gateway.broker_redis import RedisBroker

        return RedisBroker(url, **kwargs)
    raise ValueError("unsupported backend URL scheme (use redis:// or memory://)")


def broker_from_settings(settings: Settings, clock: Clock) -> Broker:
    """The backend ``settings`` configure (``redis_url``; embedded when unset)."""
    return broker_for(
        settings.redis_url,
        node_id=settings.node_id,
        clock=clock,
        history_max_len=settings.history_max_len,
        history_max_age=settings.history_max_age,
        node_timeout=settings.node_timeout,
        disconnect_grace=settings.disconnect_grace,
        key_prefix=settings.redis_key_prefix,
    )
