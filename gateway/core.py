"""The transport-neutral operations every handler (REST, SSE, WebSocket) calls.

Handlers parse and respond; this object authorizes, changes presence, publishes
and keeps the read-your-writes promise: once a call that changed presence
returns, this node's snapshot shows the change.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from gateway.auth import (
    EVENTS_PUBLISH,
    PRESENCE_WRITE,
    SYNC_READ,
    Identity,
    TokenVerifier,
    new_ticket,
)
from gateway.broker import BackendUnavailable, Broker, PresenceOutcome
from gateway.clock import Clock
from gateway.config import Settings
from gateway.holdings import Gate, LocalHoldings
from gateway.hub import Hub
from gateway.metrics import Metrics
from gateway.presence import (
    PresenceChange,
    Resource,
    Session,
    caller_view,
    rest_leave,
    rest_touch,
    restore,
    session_join,
    session_leave,
    session_linger,
    session_viewing,
    stream_closed,
    stream_opened,
)
from gateway.tasks import Backoff, stop
from protocol.codecs import JSON
from protocol.envelope import Envelope, WorkspaceKey
from protocol.errors import ApiError, authentication_failed


@dataclass(slots=True)
class Gateway:
    settings: Settings
    clock: Clock
    broker: Broker
    hub: Hub
    verifier: TokenVerifier
    metrics: Metrics
    draining: bool = False
    # What this node holds (streams, sockets), to re-assert it when the backend lost it.
    holdings: LocalHoldings = field(default_factory=LocalHoldings)
    gate: Gate = field(default_factory=Gate)
    _reassert_task: asyncio.Task[None] | None = None
    # Deferred stream holds being written, by (workspace, user).
    _promotions: dict[tuple[WorkspaceKey, str], asyncio.Task[None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.metrics.presence_members.set_function(self.hub.member_count)
        self.metrics.presence_sessions.set_function(lambda: len(self.holdings))
        self.hub.on_present = self._present

    @property
    def node_id(self) -> str:
        return self.settings.node_id

    # -- identity -----------------------------------------------------------------

    def identify(self, token: str, workspace: WorkspaceKey, permission: str) -> Identity:
        identity = self.verifier.verify(token)
        identity.authorize(workspace, permission)
        return identity

    async def issue_ticket(self, identity: Identity, workspace: WorkspaceKey) -> dict[str, Any]:
        """A single-use stream ticket bound to this user and workspace."""
        identity.authorize(workspace, SYNC_READ)
        ticket = new_ticket()
        payload = asdict(identity)
        payload["workspaces"] = sorted(identity.workspaces) if identity.workspaces else None
        payload["permissions"] = sorted(identity.permissions)
        payload["bound_to"] = [workspace.org_id, workspace.workspace_id]
        await self.broker.put_ticket(ticket, payload, self.settings.ticket_ttl)
        return {"ticket": ticket, "expires_in": int(self.settings.ticket_ttl)}

    async def redeem_ticket(self, ticket: str, workspace: WorkspaceKey) -> Identity:
        """The identity a ticket stands for; 401 if unknown, used, expired or for another workspace."""
        payload = await self.broker.take_ticket(ticket) if len(ticket) <= 128 else None
        if payload is None or payload.pop("bound_to") != [workspace.org_id, workspace.workspace_id]:
            raise authentication_failed()
        workspaces = payload["workspaces"]
        identity = Identity(
            user_id=payload["user_id"],
            org_id=payload["org_id"],
            workspaces=None if workspaces is None else frozenset(workspaces),
            permissions=frozenset(payload["permissions"]),
            display=tuple(tuple(pair) for pair in payload["display"]),  # type: ignore[misc]
            kind=payload["kind"],
            expires_at=payload["expires_at"],
        )
        if identity.expires_at + self.settings.jwt_leeway < self.clock.now():
            raise authentication_failed()
        identity.authorize(workspace, SYNC_READ)
        return identity

    # -- presence ---------------------------------------------------------------

    async def _change(
        self, workspace: WorkspaceKey, identity: Identity, change: PresenceChange,
        *, held: Callable[[], None] | None = None, released: Callable[[], None] | None = None,
    ) -> PresenceOutcome:
        """Apply ``change``. ``held`` records what this node now holds (once the change is
        made); ``released`` what it holds no more (whatever the outcome: a failed write is
        corrected by a re-assertion, scheduled here)."""
        async with self.gate.shared():
            try:
                with self.metrics.backend_latency.labels("presence").time():
                    outcome = await self.broker.change_presence(workspace, identity.user_id, change)
            except BaseException:
                if released is not None:
                    released()
                if held is not None or released is not None:
                    # The write may have happened though its answer was lost: make the
                    # backend match what this node really holds.
                    self.reassert_soon()
                raise
            if held is not None:
                held()
            if released is not None:
                released()
            self.holdings.saw(workspace, identity.user_id, outcome.record)
        if outcome.events:
            feed = self.hub.existing_feed(workspace)
            if feed is not None:
                await feed.wait_applied(outcome.events[-1].id)
        return outcome

    async def rest_join(self, identity: Identity, workspace: WorkspaceKey) -> dict[str, Any]:
        change = rest_touch(identity.user_id, identity.actor, self.node_id, self.settings.presence_ttl)
        return caller_view(identity.user_id, (await self._change(workspace, identity, change)).record)

    async def rest_viewing(
        self, identity: Identity, workspace: WorkspaceKey, resource: Resource
    ) -> dict[str, Any]:
        change = rest_touch(identity.user_id, identity.actor, self.node_id,
                            self.settings.presence_ttl, viewing=resource)
        return caller_view(identity.user_id, (await self._change(workspace, identity, change)).record)

    async def rest_leave(self, identity: Identity, workspace: WorkspaceKey) -> dict[str, Any]:
        outcome = await self._change(workspace, identity, rest_leave())
        return caller_view(identity.user_id, outcome.record)

    async def session_join(
        self, identity: Identity, workspace: WorkspaceKey, session_id: str
    ) -> dict[str, Any]:
        change = session_join(identity.user_id, identity.actor, session_id, self.node_id)
        outcome = await self._change(workspace, identity, change, held=lambda: (
            self.holdings.session_held(workspace, identity.user_id, identity.actor, session_id)))
        return caller_view(identity.user_id, outcome.record)

    async def session_viewing(
        self, identity: Identity, workspace: WorkspaceKey, session_id: str, resource: Resource
    ) -> dict[str, Any]:
        change = session_viewing(identity.user_id, identity.actor, session_id, self.node_id, resource)
        outcome = await self._change(workspace, identity, change, held=lambda: (
            self.holdings.session_held(workspace, identity.user_id, identity.actor, session_id,
                                       resource)))
        return caller_view(identity.user_id, outcome.record)

    async def session_leave(
        self, identity: Identity, workspace: WorkspaceKey, session_id: str, reason: str = "leave"
    ) -> dict[str, Any]:
        outcome = await self._change(
            workspace, identity, session_leave(session_id, reason),
            released=lambda: self.holdings.session_released(workspace, identity.user_id, session_id),
        )
        return caller_view(identity.user_id, outcome.record)

    async def session_linger(
        self, identity: Identity, workspace: WorkspaceKey, session_id: str
    ) -> None:
        """Keep a draining socket's session for ``disconnect_grace`` (no leave/join flicker)."""
        await self._change(
            workspace, identity, session_linger(session_id, self.settings.disconnect_grace),
            released=lambda: self.holdings.session_released(workspace, identity.user_id, session_id),
        )

    async def stream_opened(self, identity: Identity, workspace: WorkspaceKey) -> None:
        """Hold the user's REST session while the stream is open. A user who is not present
        has none to hold: the hold is deferred (no backend write, so opening a stream costs
        what a WebSocket subscription does) until the feed shows the user present."""
        feed = self.hub.existing_feed(workspace)
        if feed is not None and identity.user_id not in feed.replica.members:
            self.holdings.stream_deferred(workspace, identity.user_id, identity.actor)
            return
        await self._change(
            workspace, identity, stream_opened(identity.user_id, identity.actor, self.node_id),
            held=lambda: self.holdings.stream_opened(workspace, identity.user_id, identity.actor),
        )

    async def stream_closed(self, identity: Identity, workspace: WorkspaceKey) -> None:
        if self.holdings.close_deferred(workspace, identity.user_id):
            return
        promotion = self._promotions.get((workspace, identity.user_id))
        if promotion is not None:  # its +1 goes first, or a -1 could precede it
            await asyncio.wait([promotion])
        with contextlib.suppress(BackendUnavailable):  # corrected by the re-assertion it schedules
            await self._change(
                workspace, identity, stream_closed(self.node_id, self.settings.disconnect_grace),
                released=lambda: self.holdings.stream_closed(workspace, identity.user_id),
            )

    def _present(self, workspace: WorkspaceKey, user_id: str) -> None:
        """The feed shows ``user_id`` present (joined, or in a fresh snapshot): write the
        holds of their deferred streams, so that their REST session lives while they stream."""
        holding = self.holdings.get(workspace, user_id)
        if holding is None or not holding.deferred:
            return
        count = self.holdings.promote(workspace, user_id)  # at once: a close now writes -1
        key = (workspace, user_id)
        previous = self._promotions.get(key)
        task = asyncio.get_running_loop().create_task(
            self._write_promoted(workspace, user_id, holding.actor, count, previous),
            name=f"stream hold {workspace}")
        self._promotions[key] = task
        task.add_done_callback(
            lambda done: self._promotions.pop(key) if self._promotions.get(key) is done else None)

    async def _write_promoted(self, workspace: WorkspaceKey, user_id: str,
                              actor: dict[str, Any], count: int,
                              previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        try:
            async with self.gate.shared():
                for _ in range(count):
                    outcome = await self.broker.change_presence(
                        workspace, user_id, stream_opened(user_id, actor, self.node_id))
                    self.holdings.saw(workspace, user_id, outcome.record)  # as _change does
        except Exception:
            # The holdings already count them: a re-assertion writes what they say.
            self.reassert_soon()

    async def reassert(self) -> None:
        """Make the backend show exactly what this node holds: its open streams and sockets
        (and the REST sessions those streams keep alive); bindings to this node that it no
        longer holds are removed. Every difference is an event in the log, as any change.
        Called after a heartbeat lapse, a backend outage or data loss, and after a failed
        release. Raises ``BackendUnavailable`` (the caller retries)."""
        async with self.gate.exclusive():
            pairs = self.holdings.keys() | await self.broker.bound_to_node()
            for workspace, user_id in sorted(pairs, key=lambda pair: (str(pair[0]), pair[1])):
                holding = self.holdings.get(workspace, user_id)
                actor = holding.actor if holding is not None else {"type": "user", "id": user_id}
                held = holding.held if holding is not None else _holds_nothing
                await self.broker.change_presence(
                    workspace, user_id, restore(user_id, actor, self.node_id, held)
                )

    def reassert_soon(self) -> None:
        """Re-assert in the background, retrying with capped backoff until it succeeds."""
        if self._reassert_task is None or self._reassert_task.done():
            self._reassert_task = asyncio.create_task(self._reassert_until_done(),
                                                      name="presence re-assert")

    async def _reassert_until_done(self) -> None:
        backoff = Backoff(0.1, 5.0)
        while True:
            try:
                await self.reassert()
                return
            except BackendUnavailable:
                await backoff.pause()

    async def close(self) -> None:
        task, self._reassert_task = self._reassert_task, None
        await stop(task)
        for promotion in tuple(self._promotions.values()):
            await stop(promotion)

    async def presence(
        self, workspace: WorkspaceKey, resource: Resource | None = None
    ) -> dict[str, Any]:
        """Members from this node's replica of the log; ``BackendUnavailable`` (503) while
        the node cannot vouch that the replica is current (cut off from Redis)."""
        self.broker.require_current()
        feed = await self.hub.feed(workspace)
        return feed.presence(resource)

    # -- events -----------------------------------------------------------------

    async def publish(
        self, identity: Identity, workspace: WorkspaceKey, event_type: str, data: dict[str, Any],
        *, idempotency_key: str | None = None,
    ) -> Envelope:
        """Append a published event. ``data`` is already known to be portable (the WebSocket
        checks each whole frame, REST its body); only its size is checked here."""
        identity.authorize(workspace, EVENTS_PUBLISH)
        if len(JSON.encode(data)) > self.settings.max_event_bytes:
            raise ApiError("PAYLOAD_TOO_LARGE", {"max_bytes": self.settings.max_event_bytes})
        with self.metrics.backend_latency.labels("append").time():
            envelope = await self.broker.append(workspace, event_type, identity.actor, data,
                                                idempotency_key)
        self.metrics.events_published.inc()
        return envelope


def _holds_nothing() -> tuple[int, Mapping[str, Resource | None], Session | None]:
    return 0, {}, None


__all__ = ["EVENTS_PUBLISH", "PRESENCE_WRITE", "SYNC_READ", "Gateway"]
