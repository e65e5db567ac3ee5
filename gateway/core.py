"""The transport-neutral operations every handler (REST, SSE, WebSocket) calls.

Handlers parse and respond; this object authorizes, changes presence, publishes
and keeps the read-your-writes promise: once a call that changed presence
returns, this node's snapshot shows the change.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any

from gateway.auth import (
    EVENTS_PUBLISH,
    PRESENCE_WRITE,
    SYNC_READ,
    Identity,
    TokenVerifier,
    new_ticket,
)
from gateway.broker import Broker, PresenceOutcome
from gateway.clock import Clock
from gateway.config import Settings
from gateway.hub import Hub
from gateway.metrics import Metrics
from gateway.presence import (
    PresenceChange,
    Resource,
    caller_view,
    rest_leave,
    rest_touch,
    session_join,
    session_leave,
    session_viewing,
    stream_closed,
    stream_opened,
)
from protocol.envelope import Envelope, WorkspaceKey
from protocol.errors import authentication_failed


@dataclass(slots=True)
class Gateway:
    settings: Settings
    clock: Clock
    broker: Broker
    hub: Hub
    verifier: TokenVerifier
    metrics: Metrics
    draining: bool = False

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
        self, workspace: WorkspaceKey, identity: Identity, change: PresenceChange
    ) -> PresenceOutcome:
        outcome = await self.broker.change_presence(workspace, identity.user_id, change)
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
        return caller_view(identity.user_id, (await self._change(workspace, identity, change)).record)

    async def session_viewing(
        self, identity: Identity, workspace: WorkspaceKey, session_id: str, resource: Resource
    ) -> dict[str, Any]:
        change = session_viewing(identity.user_id, identity.actor, session_id, self.node_id, resource)
        return caller_view(identity.user_id, (await self._change(workspace, identity, change)).record)

    async def session_leave(
        self, identity: Identity, workspace: WorkspaceKey, session_id: str, reason: str = "leave"
    ) -> dict[str, Any]:
        outcome = await self._change(workspace, identity, session_leave(session_id, reason))
        return caller_view(identity.user_id, outcome.record)

    async def stream_opened(self, identity: Identity, workspace: WorkspaceKey) -> None:
        await self.broker.change_presence(
            workspace, identity.user_id, stream_opened(identity.user_id, identity.actor, self.node_id)
        )

    async def stream_closed(self, identity: Identity, workspace: WorkspaceKey) -> None:
        with contextlib.suppress(Exception):  # the node's liveness record covers a failure here
            await self.broker.change_presence(
                workspace, identity.user_id,
                stream_closed(self.node_id, self.settings.disconnect_grace),
            )

    async def presence(
        self, workspace: WorkspaceKey, resource: Resource | None = None
    ) -> dict[str, Any]:
        feed = await self.hub.feed(workspace)
        return feed.presence(resource)

    # -- events -----------------------------------------------------------------

    async def publish(
        self, identity: Identity, workspace: WorkspaceKey, event_type: str, data: dict[str, Any]
    ) -> Envelope:
        identity.authorize(workspace, EVENTS_PUBLISH)
        envelope = await self.broker.append(workspace, event_type, identity.actor, data)
        self.metrics.events_published.inc()
        return envelope


__all__ = ["Gateway", "PRESENCE_WRITE", "SYNC_READ", "EVENTS_PUBLISH"]
