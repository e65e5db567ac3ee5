"""``GET /v1/sync/ws`` and ``GET .../sync/ws``: the WebSocket channel (SPEC §6).

One socket follows any number of workspaces. Each subscription delivers exactly
what an SSE stream of that workspace delivers (``sync.snapshot``, or the replay
after ``since``, or ``sync.reset`` and a snapshot; then live events), as
``{"op":"event","event":<envelope>}``. Client messages are answered in the order
they arrive, each by one ``reply``, ``error`` or ``pong`` echoing its ``ref``.

A bad message gets an ``error`` and the socket stays open. The socket is closed
(docs/websocket.md lists the codes) when its client cannot keep up (its bounded
send queue overflows), floods past its rate limit, sends an oversized frame, does
not authenticate in time, when its token expires (after ``sync.token_expired``),
and when the node drains. Presence joined over a socket lasts until ``leave`` or
the end of the socket (a drain keeps it for ``disconnect_grace``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Collection
from datetime import UTC, datetime
from typing import Any, Final

from aiohttp import WSMsgType, web

from gateway.auth import PRESENCE_WRITE, SYNC_READ, Identity, bearer_token
from gateway.broker import BackendUnavailable
from gateway.channel import OVERFLOW, Frame, Outgoing, Subscription, TokenBucket
from gateway.core import Gateway
from gateway.handlers.common import gateway_of, workspace_of
from gateway.hub import Closed, Feed, Replay, encoded, sync_envelope
from gateway.origins import origin_allowed
from gateway.presence import Resource
from protocol.codecs import MSGPACK
from protocol.envelope import SYNC_TOKEN_EXPIRED, Envelope, WorkspaceKey
from protocol.errors import ApiError, ValidationFailed, authentication_failed, format_timestamp
from protocol.ws import (
    SUBPROTOCOLS,
    Auth,
    ClientMessage,
    CloseCode,
    Join,
    Leave,
    Ping,
    Publish,
    Subscribe,
    Unsubscribe,
    Viewing,
    codec_for,
    decode_frame,
    error_message,
    event_message,
    parse_client_message,
    pong_message,
    reference_of,
    reply_message,
)

log = logging.getLogger(__name__)

TRANSPORT: Final = "ws"

# Why a socket's queue closed -> the close code and reason the client gets.
# ("disconnected": the client is gone already; nothing to send.)
CLOSE_REASONS: Final[dict[str, tuple[CloseCode, str]]] = {
    OVERFLOW: (CloseCode.POLICY_VIOLATION, "send buffer overflow: resume with since"),
    "rate_limited": (CloseCode.POLICY_VIOLATION, "rate limit exceeded"),
    "drain": (CloseCode.SERVICE_RESTART, "node draining: reconnect and resume with since"),
    "token_expired": (CloseCode.UNAUTHENTICATED, "token expired"),
    "unauthenticated": (CloseCode.UNAUTHENTICATED, "authentication failed"),
    "auth_timeout": (CloseCode.UNAUTHENTICATED, "authentication timeout"),
    "failed": (CloseCode.INTERNAL_ERROR, "internal error: reconnect and resume with since"),
}


# -- the handshake ------------------------------------------------------------------


def check_origin(origins: list[str], allowed: tuple[str, ...]) -> None:
    """Refuse (403) a browser upgrade from an origin not on the allow-list.

    No ``Origin`` header (a non-browser client) passes; one ``Origin`` must equal an
    allowed origin exactly (after normalisation); an empty list allows no browser.
    """
    if origins and not origin_allowed(origins, allowed):
        raise ApiError("FORBIDDEN", {"reason": "origin_not_allowed"})


async def socket(request: web.Request) -> web.StreamResponse:
    """``GET /v1/sync/ws``: subscribe to workspaces with ``subscribe`` messages."""
    return await _serve(request, None)


async def workspace_socket(request: web.Request) -> web.StreamResponse:
    """``GET .../sync/ws[?since=<id>]``: also subscribes to the path's workspace once authenticated."""
    return await _serve(request, workspace_of(request))


async def _serve(request: web.Request, workspace: WorkspaceKey | None) -> web.StreamResponse:
    gateway = gateway_of(request)
    settings = gateway.settings
    ws = web.WebSocketResponse(
        protocols=SUBPROTOCOLS,
        heartbeat=settings.keepalive,
        max_msg_size=settings.ws_max_message_bytes,
        compress=False,  # events are encoded once and the same bytes go to every socket
        timeout=settings.ws_close_timeout,
    )
    if not ws.can_prepare(request).ok:
        raise ApiError("UPGRADE_REQUIRED", {"upgrade": "websocket"})
    check_origin(request.headers.getall("Origin", []), settings.allowed_origins)
    header = request.headers.get("Authorization")
    identity = gateway.verifier.verify(bearer_token(header)) if header is not None else None
    if gateway.draining:
        raise ApiError("SERVICE_UNAVAILABLE", {"reason": "draining"})
    await ws.prepare(request)
    connection = Connection(gateway, request, ws, identity)
    registry = request.app[CONNECTIONS]
    registry.add(connection)
    try:
        await connection.run(workspace, request.query.get("since"))
    finally:
        registry.discard(connection)
    return ws


# -- one connection -----------------------------------------------------------------


class Connection:
    """One socket: its identity, subscriptions, presence session, queue and tasks."""

    def __init__(
        self, gateway: Gateway, request: web.Request, ws: web.WebSocketResponse,
        identity: Identity | None,
    ) -> None:
        self.gateway = gateway
        self.settings = gateway.settings
        self.ws = ws
        self.identity = identity
        self.codec = codec_for(ws.ws_protocol)
        self._opcode = WSMsgType.BINARY if self.codec is MSGPACK else WSMsgType.TEXT
        self._event_key = f"ws-{self.codec.name}"
        self.session_id = f"ws-{secrets.token_hex(8)}"
        self.subscriptions: dict[WorkspaceKey, tuple[Feed, Subscription]] = {}
        self.joined: set[WorkspaceKey] = set()
        self.sent: dict[WorkspaceKey, str] = {}  # the last event id written, per workspace
        self.outgoing = Outgoing(self.settings.send_buffer, on_close=self._on_close)
        self._bucket = TokenBucket(self.settings.ws_rate_limit, self.settings.ws_rate_burst,
                                   gateway.clock.now())
        self._strikes = 0
        self._transport = request.transport
        self._writer: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None
        self._timers: list[asyncio.Task[None]] = []
        self._home: tuple[WorkspaceKey, str | None] | None = None
        # One replay read at a time per socket: a client resuming many workspaces at once
        # makes the node hold one page for it, not one per subscription.
        self.replays = asyncio.Lock()
        self._delivered = gateway.metrics.events_delivered.labels(TRANSPORT)

    async def run(self, workspace: WorkspaceKey | None, since: str | None) -> None:
        connections = self.gateway.metrics.connections.labels(TRANSPORT)
        connections.inc()
        self._writer = asyncio.create_task(self._write(), name="ws writer")
        try:
            if workspace is not None:
                self._home = (workspace, since)
            if self.identity is None:
                self._timers.append(asyncio.create_task(self._auth_deadline()))
            else:
                await self._authenticated()
            await self._read()
        finally:
            # Synchronous first: this task may be cancelled (client gone) at any await.
            self.outgoing.close("disconnected")  # no-op when already closed for a reason
            for timer in self._timers:
                timer.cancel()
            for feed, subscription in self.subscriptions.values():
                feed.detach(subscription)
                if subscription.replaying is not None:
                    subscription.replaying.cancel()
            if self._transport is not None:  # a peer that never reads cannot hold the socket
                asyncio.get_running_loop().call_later(
                    self.settings.ws_close_timeout * 2, self._transport.abort)
            connections.dec()
            # Shielded: runs to its end even if this handler is cancelled meanwhile.
            await asyncio.shield(self._finish())

    async def _finish(self) -> None:
        """Let the close handshake end (bounded), stop the writer, end presence."""
        if self._closer is not None:
            await self._closer
        assert self._writer is not None
        self._writer.cancel()
        await self._end_presence()

    # -- reading ---------------------------------------------------------------------

    async def _read(self) -> None:
        while True:
            message = await self.ws.receive()
            if message.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                if self.outgoing.closed is None:  # closing: later frames are not answered
                    data = message.data
                    await self._on_frame(data.encode() if isinstance(data, str) else data)
            elif message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED,
                                  WSMsgType.ERROR):
                return

    async def _on_frame(self, payload: bytes) -> None:
        if not self._bucket.take(self.gateway.clock.now()):
            self._rate_limited()
            return
        if self._bucket.full:
            self._strikes = 0
        ref: str | int | None = None
        try:
            raw = decode_frame(self.codec, payload)
            ref = reference_of(raw)
            message = parse_client_message(raw)
        except ValidationFailed as exc:
            self.answer(error_message(ref, exc.body()))
            return
        await self._dispatch(message)

    def _rate_limited(self) -> None:
        self._strikes += 1
        error = ApiError("RATE_LIMITED", {"limit_per_second": self.settings.ws_rate_limit,
                                          "burst": self.settings.ws_rate_burst})
        answer = self._encode(error_message(None, error.body()))
        if self._strikes > self.settings.ws_rate_strikes:
            self.outgoing.close("rate_limited", farewell=(answer,))
        else:
            self.outgoing.offer(answer)

    async def _dispatch(self, message: ClientMessage) -> None:
        try:
            if self.identity is None and not isinstance(message, Auth):
                raise authentication_failed()
            answer = await OPS[type(message)](self, message)
        except (ApiError, ValidationFailed) as exc:
            answer = error_message(message.ref, exc.body())
        except BackendUnavailable:
            answer = error_message(message.ref, ApiError("SERVICE_UNAVAILABLE").body())
        except Exception:
            log.exception("websocket message failed", extra={"op": message.op})
            answer = error_message(message.ref, ApiError("INTERNAL_SERVER_ERROR").body())
        if answer is not None:
            self.answer(answer)

    # -- writing ---------------------------------------------------------------------

    def _encode(self, message: dict[str, Any]) -> bytes:
        return self.codec.encode(message)

    def answer(self, message: dict[str, Any]) -> None:
        """Queue a reply, error or pong (never blocks; a client that never reads overflows)."""
        self.outgoing.offer(self._encode(message))

    def _event_bytes(self, envelope: Envelope) -> bytes | None:
        codec = self.codec
        try:
            return encoded(envelope, self._event_key,
                           lambda e: codec.encode(event_message(e.to_dict())))
        except (TypeError, ValueError, OverflowError):
            log.error("event cannot be encoded; skipped",
                      extra={"event_id": envelope.id, "encoding": codec.name})
            return None

    async def _send(self, frame: Frame) -> None:
        if isinstance(frame, Envelope):
            data = self._event_bytes(frame)
            if data is None:
                return
            workspace = frame.workspace
            if workspace in self.subscriptions:  # (not a frame queued before an unsubscribe)
                self.sent[workspace] = frame.id  # the frame is written before any await
            self._delivered.inc()
        else:
            data = frame
        await self.ws.send_frame(data, self._opcode)

    async def _write(self) -> None:
        try:
            while True:
                frame = await self.outgoing.next()
                if isinstance(frame, Closed):
                    return
                await self._send(frame)
        except Exception as exc:
            # The client is gone (or the socket broke): nothing more can be written, so
            # nothing may wait to be (a replay's ``put``), and the read loop must end too.
            if not isinstance(exc, ConnectionError):
                log.exception("websocket write failed; closing the connection")
            self.outgoing.close("disconnected")
            if self._transport is not None:
                self._transport.abort()

    def _on_close(self, reason: str) -> None:
        if reason == OVERFLOW:
            self.gateway.metrics.slow_consumer_disconnects.labels(TRANSPORT).inc()
        close = CLOSE_REASONS.get(reason)
        if close is not None and self._closer is None:
            self._closer = asyncio.create_task(self._close(*close), name="ws closer")

    async def _close(self, code: CloseCode, reason: str) -> None:
        """Stop the writer (even mid-write to a client that does not read), send the
        farewell frames and the close frame; cut the connection if that takes too long."""
        writer = self._writer
        if writer is not None and not writer.done():
            writer.cancel()
            await asyncio.wait([writer])
        try:
            async with asyncio.timeout(self.settings.ws_close_timeout):
                for frame in self.outgoing.farewell:
                    await self._send(frame)
                await self.ws.close(code=code, message=reason.encode())
        except (TimeoutError, ConnectionError):
            if self._transport is not None:
                self._transport.abort()

    # -- authentication --------------------------------------------------------------

    async def _auth_deadline(self) -> None:
        await asyncio.sleep(self.settings.ws_auth_timeout)
        if self.identity is None:
            error = self._encode(error_message(None, authentication_failed().body()))
            self.outgoing.close("auth_timeout", farewell=(error,))

    async def _authenticated(self) -> None:
        """Start the expiry timer; on the per-workspace URL, subscribe to its workspace."""
        for timer in self._timers:
            timer.cancel()
        self._timers = [asyncio.create_task(self._expire())]
        if self._home is not None:
            workspace, since = self._home
            raw = {"op": "subscribe", "org_id": workspace.org_id,
                   "workspace_id": workspace.workspace_id, "since": since}
            try:
                message = parse_client_message(raw)
            except ValidationFailed as exc:
                self.answer(error_message(None, exc.body()))
                return
            await self._dispatch(message)

    async def _expire(self) -> None:
        assert self.identity is not None
        await self.gateway.clock.sleep_until(self.identity.expires_at + self.settings.jwt_leeway)
        farewell = tuple(
            self._encode(event_message(sync_envelope(
                workspace, SYNC_TOKEN_EXPIRED, self.sent.get(workspace, ""),
                {"reason": "token_expired"}).to_dict()))
            for workspace in self.subscriptions
        )
        self.outgoing.close("token_expired", farewell=farewell)

    # -- presence ----------------------------------------------------------------------

    async def _end_presence(self) -> None:
        """Leave every joined workspace, or linger there when the node drains."""
        if self.identity is None:
            return
        draining = self.outgoing.closed is not None and self.outgoing.closed.reason == "drain"
        for workspace in tuple(self.joined):
            try:
                if draining:
                    await self.gateway.session_linger(self.identity, workspace, self.session_id)
                else:
                    await self.gateway.session_leave(self.identity, workspace, self.session_id,
                                                     reason="disconnected")
            except Exception:  # the node's liveness record removes the session later
                log.exception("could not end websocket presence",
                              extra={"workspace": str(workspace)})
        self.joined.clear()

    @property
    def user(self) -> Identity:
        assert self.identity is not None  # _dispatch lets only `auth` through before
        return self.identity


# -- the ops (one handler each; the table below dispatches) ---------------------------

Answer = dict[str, Any] | None


async def _auth(conn: Connection, message: Auth) -> Answer:
    if conn.identity is not None:
        raise ValidationFailed(({"loc": ["body", "op"], "msg": "Value error, already authenticated",
                                 "type": "value_error", "input": "auth",
                                 "ctx": {"error": "already authenticated"}},))
    try:
        identity = conn.gateway.verifier.verify(message.token)
    except ApiError as exc:
        conn.outgoing.close("unauthenticated",
                            farewell=(conn._encode(error_message(message.ref, exc.body())),))
        return None
    conn.identity = identity
    conn.answer(reply_message(message.ref, {
        "user_id": identity.user_id,
        "org_id": identity.org_id,
        "expires_at": format_timestamp(datetime.fromtimestamp(identity.expires_at, UTC)),
    }))
    await conn._authenticated()
    return None


def _workspace_data(workspace: WorkspaceKey, **more: Any) -> dict[str, Any]:
    return {"org_id": workspace.org_id, "workspace_id": workspace.workspace_id, **more}


async def _subscribe(conn: Connection, message: Subscribe) -> Answer:
    workspace, gateway = message.workspace, conn.gateway
    conn.user.authorize(workspace, SYNC_READ)
    if workspace in conn.subscriptions:
        raise ValidationFailed(({"loc": ["body", "workspace_id"],
                                 "msg": "Value error, already subscribed",
                                 "type": "value_error", "input": workspace.workspace_id,
                                 "ctx": {"error": "already subscribed"}},))
    _check_room(conn, conn.subscriptions, workspace, "max_subscriptions")
    if gateway.draining:
        raise ApiError("SERVICE_UNAVAILABLE", {"reason": "draining"})
    feed = await gateway.hub.feed(workspace)
    subscription = Subscription(workspace, conn.outgoing, conn.settings.send_buffer)
    snapshot = feed.attach(subscription)  # live events from here on wait in the subscription
    conn.subscriptions[workspace] = (feed, subscription)
    try:
        replay = await Replay(gateway.broker, feed, subscription, snapshot, message.since).start()
    except BaseException:
        feed.detach(subscription)
        del conn.subscriptions[workspace]
        raise
    resumed = message.since is not None and not replay.reset
    conn.answer(reply_message(message.ref, _workspace_data(
        workspace, subscribed=True, resumed=resumed, snapshot=replay.snapshot.to_dict())))
    # Written while the socket goes on reading: a ping, an unsubscribe or the client's
    # disappearance is noticed at once, however long the replay.
    subscription.replaying = asyncio.create_task(
        _replay(conn, subscription, replay), name=f"ws replay {workspace}")
    return None


async def _replay(conn: Connection, subscription: Subscription, replay: Replay) -> None:
    """Queue the replay at the client's pace (``put``: never an overflow), then go live."""
    try:
        async with conn.replays, contextlib.aclosing(replay.pages()) as pages:
            async for page in pages:
                for envelope in page:
                    if not await conn.outgoing.put(envelope):
                        return
        subscription.go_live(replay.cursor)
    except Exception:
        log.exception("websocket replay failed; closing the connection",
                      extra={"workspace": str(subscription.workspace)})
        conn.outgoing.close("failed")
    finally:
        subscription.replaying = None


def _check_room(conn: Connection, holding: Collection[WorkspaceKey], workspace: WorkspaceKey,
                what: str) -> None:
    """At most ``ws_max_subscriptions`` workspaces subscribed, and as many joined, per socket."""
    if workspace not in holding and len(holding) >= conn.settings.ws_max_subscriptions:
        raise ApiError("RATE_LIMITED", {what: conn.settings.ws_max_subscriptions})


async def _unsubscribe(conn: Connection, message: Unsubscribe) -> Answer:
    entry = conn.subscriptions.pop(message.workspace, None)
    conn.sent.pop(message.workspace, None)
    if entry is not None:
        feed, subscription = entry
        feed.detach(subscription)
        if subscription.replaying is not None:
            subscription.replaying.cancel()
    return reply_message(message.ref, _workspace_data(message.workspace, subscribed=False))


async def _join(conn: Connection, message: Join) -> Answer:
    conn.user.authorize(message.workspace, PRESENCE_WRITE)
    _check_room(conn, conn.joined, message.workspace, "max_joined")
    data = await conn.gateway.session_join(conn.user, message.workspace, conn.session_id)
    conn.joined.add(message.workspace)
    return reply_message(message.ref, data)


async def _leave(conn: Connection, message: Leave) -> Answer:
    conn.user.authorize(message.workspace, PRESENCE_WRITE)
    data = await conn.gateway.session_leave(conn.user, message.workspace, conn.session_id)
    conn.joined.discard(message.workspace)
    return reply_message(message.ref, data)


async def _viewing(conn: Connection, message: Viewing) -> Answer:
    conn.user.authorize(message.workspace, PRESENCE_WRITE)
    _check_room(conn, conn.joined, message.workspace, "max_joined")
    resource = Resource(message.resource_type, message.resource_id)
    data = await conn.gateway.session_viewing(conn.user, message.workspace, conn.session_id,
                                              resource)
    conn.joined.add(message.workspace)
    return reply_message(message.ref, data)


async def _publish(conn: Connection, message: Publish) -> Answer:
    envelope = await conn.gateway.publish(conn.user, message.workspace, message.type,
                                          message.data, idempotency_key=message.idempotency_key)
    return reply_message(message.ref, envelope.to_dict())


async def _ping(conn: Connection, message: Ping) -> Answer:
    return pong_message(message.ref)


OPS: Final[dict[type[ClientMessage], Callable[[Connection, Any], Awaitable[Answer]]]] = {
    Auth: _auth,
    Subscribe: _subscribe,
    Unsubscribe: _unsubscribe,
    Join: _join,
    Leave: _leave,
    Viewing: _viewing,
    Publish: _publish,
    Ping: _ping,
}


# -- every socket of the node -----------------------------------------------------------


class Connections:
    """The node's open sockets, so that a drain reaches those with no subscription too."""

    def __init__(self) -> None:
        self._open: set[Connection] = set()

    def add(self, connection: Connection) -> None:
        self._open.add(connection)

    def discard(self, connection: Connection) -> None:
        self._open.discard(connection)

    def close_all(self, reason: str) -> None:
        for connection in tuple(self._open):
            connection.outgoing.close(reason)

    def __len__(self) -> int:
        return len(self._open)


CONNECTIONS: Final = web.AppKey("ws_connections", Connections)
