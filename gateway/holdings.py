"""What this node holds, so that it can re-assert it when the backend may have lost it.

The backend's records are the truth every node reads; this is the node's own memory of
the part of that truth it is responsible for: its open SSE streams and its WebSocket
sessions (node-bound), and the REST session it last saw for those users (an open stream
keeps it alive, so it is restored with the stream). After a heartbeat lapse, a reaping by peers,
an outage or a data loss, the node makes the records match this (``presence.restore``).

A ``Gate`` keeps re-assertion and ordinary presence changes of this node apart: a
re-assertion sets absolute values (stream counts) that an increment made meanwhile
would otherwise double or lose.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.presence import REST_SESSION, Resource, Session, UserRecord
from protocol.envelope import WorkspaceKey


@dataclass(slots=True)
class Holding:
    actor: dict[str, Any]
    streams: int = 0  # open streams the backend's record counts for this node
    sessions: dict[str, Resource | None] = field(default_factory=dict)
    rest: Session | None = None
    # Open streams of a user who was not present when they opened: a stream only keeps a
    # REST session alive, so none is written until the user is present (``promote``).
    deferred: int = 0

    def held(self) -> tuple[int, Mapping[str, Resource | None], Session | None]:
        return self.streams, dict(self.sessions), self.rest

    def empty(self) -> bool:
        return not self.streams and not self.sessions and not self.deferred


class LocalHoldings:
    """(workspace, user) -> what this node holds for that user there."""

    def __init__(self) -> None:
        self._items: dict[tuple[WorkspaceKey, str], Holding] = {}

    def _get(self, workspace: WorkspaceKey, user_id: str, actor: dict[str, Any]) -> Holding:
        holding = self._items.get((workspace, user_id))
        if holding is None:
            holding = self._items[(workspace, user_id)] = Holding(actor)
        else:
            holding.actor = actor
        return holding

    def get(self, workspace: WorkspaceKey, user_id: str) -> Holding | None:
        return self._items.get((workspace, user_id))

    def _forget_if_empty(self, workspace: WorkspaceKey, user_id: str) -> None:
        holding = self._items.get((workspace, user_id))
        if holding is not None and holding.empty():
            del self._items[(workspace, user_id)]

    def stream_opened(self, workspace: WorkspaceKey, user_id: str, actor: dict[str, Any]) -> None:
        self._get(workspace, user_id, actor).streams += 1

    def stream_deferred(self, workspace: WorkspaceKey, user_id: str, actor: dict[str, Any]) -> None:
        self._get(workspace, user_id, actor).deferred += 1

    def close_deferred(self, workspace: WorkspaceKey, user_id: str) -> bool:
        """Close a deferred stream of the user if there is one (nothing to write then)."""
        holding = self._items.get((workspace, user_id))
        if holding is None or not holding.deferred:
            return False
        holding.deferred -= 1
        self._forget_if_empty(workspace, user_id)
        return True

    def promote(self, workspace: WorkspaceKey, user_id: str) -> int:
        """The user is present: their deferred streams count as written from now on (the
        caller writes them); how many."""
        holding = self._items.get((workspace, user_id))
        if holding is None:
            return 0
        count, holding.deferred = holding.deferred, 0
        holding.streams += count
        return count

    def stream_closed(self, workspace: WorkspaceKey, user_id: str) -> None:
        holding = self._items.get((workspace, user_id))
        if holding is not None:
            holding.streams = max(0, holding.streams - 1)
            self._forget_if_empty(workspace, user_id)

    def session_held(
        self, workspace: WorkspaceKey, user_id: str, actor: dict[str, Any], session_id: str,
        viewing: Resource | None = None,
    ) -> None:
        holding = self._get(workspace, user_id, actor)
        if viewing is not None or session_id not in holding.sessions:
            holding.sessions[session_id] = viewing

    def session_released(self, workspace: WorkspaceKey, user_id: str, session_id: str) -> None:
        holding = self._items.get((workspace, user_id))
        if holding is not None:
            holding.sessions.pop(session_id, None)
            self._forget_if_empty(workspace, user_id)

    def saw(self, workspace: WorkspaceKey, user_id: str, record: UserRecord | None) -> None:
        """Remember the user's REST session as a change made through this node left it
        (only for users this node holds something for: see ``presence.restore``)."""
        holding = self._items.get((workspace, user_id))
        if holding is not None:
            holding.rest = record.session(REST_SESSION) if record is not None else None

    def keys(self) -> set[tuple[WorkspaceKey, str]]:
        """The pairs the backend should show something of (not deferred streams alone)."""
        return {key for key, holding in self._items.items()
                if holding.streams or holding.sessions}

    def __len__(self) -> int:
        return len(self._items)


class Gate:
    """Many ``shared`` holders at once, or one ``exclusive`` holder alone (it waits for the
    shared ones to finish, and new shared ones wait for it). Nothing awaits on release, so
    a cancelled holder always releases."""

    def __init__(self) -> None:
        self._shared = 0
        self._exclusive = False
        self._open = asyncio.Event()
        self._open.set()
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        while self._exclusive:
            await self._open.wait()
        self._shared += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._shared -= 1
            if not self._shared:
                self._idle.set()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        while self._exclusive:
            await self._open.wait()
        self._exclusive = True
        self._open.clear()
        try:
            while self._shared:
                await self._idle.wait()
            yield
        finally:
            self._exclusive = False
            self._open.set()
