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
import logging
from typing import Final

from aiohttp import WSMsgType, web
from prometheus_client import Counter

from gateway.auth import bearer_token
from gateway.clock import Clock
from gateway.deadlines import Deadlines
from gateway.handlers.common import gateway_of, workspace_of
from gateway.handlers.errors import answers_own_errors, error_response
from gateway.origins import origin_allowed
from gateway.session import TRANSPORT, Session
from gateway.transports import OVERFLOW, WS_ENCODINGS, Transport
from protocol.envelope import WorkspaceKey
from protocol.errors import ApiError
from protocol.ws import SUBPROTOCOLS, CloseCode, codec_for

log = logging.getLogger(__name__)

# Why a socket's transport closed -> the close code and reason the client gets.
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


@answers_own_errors  # (a frame of the error middleware would live as long as the socket)
async def socket(request: web.Request) -> web.StreamResponse:
    """``GET /v1/sync/ws``: subscribe to workspaces with ``subscribe`` messages.
    ``GET .../sync/ws[?since=<id>]``: also subscribes to the path's workspace once
    authenticated. (One handler for both, and one frame for the socket's life: every frame
    under the request's lives as long as the socket, an idle one's too.)"""
    try:
        ws, session, socket, closer = await _upgrade(request)
        registry = request.app[CONNECTIONS]
        registry.add(session)
        connections = session.gateway.metrics.connections.labels(TRANSPORT)
        connections.inc()
        try:
            await session.start(*_path_subscription(request))
            while True:
                message = await ws.receive()
                if message.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    data = message.data
                    await session.receive(data.encode() if isinstance(data, str) else data)
                elif message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED,
                                      WSMsgType.ERROR):
                    break
        finally:
            # Synchronous first: this task may be cancelled (client gone) at any await.
            registry.discard(session)
            session.transport.close("disconnected")  # no-op when already closed for a reason
            session.end()
            # A peer that never reads cannot hold the socket.
            asyncio.get_running_loop().call_later(session.settings.ws_close_timeout * 2,
                                                  socket.abort)
            connections.dec()
            # Shielded: runs to its end even if this handler is cancelled meanwhile.
            await asyncio.shield(_finish(session, closer))
    except Exception as exc:  # as the error middleware answers every other handler's
        return error_response(request, exc)
    return ws


def _path_subscription(request: web.Request) -> tuple[WorkspaceKey | None, str | None]:
    """On ``.../sync/ws``, the path's workspace and the ``since`` of the query, if any."""
    if "workspace_id" not in request.match_info:
        return None, None
    query = request.rel_url.raw_query_string  # (none: nothing parsed, nothing kept)
    return workspace_of(request), request.query.get("since") if query else None


async def _upgrade(
    request: web.Request,
) -> tuple[web.WebSocketResponse, Session, asyncio.Transport, _Closer]:
    """Refuse the upgrade (a REST error), or make the socket and its session."""
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
    socket = request.transport
    if socket is None:  # the client is gone already
        raise ConnectionResetError("client disconnected")
    await ws.prepare(request)
    codec = codec_for(ws.ws_protocol)
    closer = _Closer(ws, gateway.metrics.slow_consumer_disconnects.labels(TRANSPORT))
    transport = closer.transport = Transport(
        socket, request.protocol, WS_ENCODINGS[codec.name], settings.send_buffer,
        grace=settings.ws_close_timeout, on_close=closer)
    session = Session(gateway, transport, codec, identity, request.app[CONNECTIONS].deadlines)
    return ws, session, socket, closer


class _Closer:
    """A socket's ``on_close``: why its transport closed -> the close frame the client gets,
    written by a task (``task``, which the handler lets end before it does)."""

    __slots__ = ("slow", "task", "transport", "ws")

    def __init__(self, ws: web.WebSocketResponse, slow: Counter) -> None:
        self.ws, self.slow = ws, slow
        self.transport: Transport | None = None
        self.task: asyncio.Task[None] | None = None

    def __call__(self, reason: str) -> None:
        if reason == OVERFLOW:
            self.slow.inc()
        close = CLOSE_REASONS.get(reason)
        if close is not None and self.transport is not None:
            self.task = asyncio.create_task(_close(self.ws, self.transport, *close),
                                            name="ws closer")


async def _close(ws: web.WebSocketResponse, transport: Transport, code: CloseCode,
                 reason: str) -> None:
    """Once what the session still had to say is written (the transport bounds that wait),
    the close frame; cut the connection if the handshake takes too long."""
    await transport.wait_closed()
    try:
        async with asyncio.timeout(transport.grace):
            await ws.close(code=code, message=reason.encode())
    except (TimeoutError, ConnectionError):
        transport.abort()


async def _finish(session: Session, closer: _Closer) -> None:
    """Let the close handshake end (bounded) and the publishes under way land, then end
    presence (after what the client published before it went)."""
    if closer.task is not None:
        await closer.task
    await session.settle()
    await session.end_presence()


# -- every socket of the node -----------------------------------------------------------


class Connections:
    """The node's open sockets, so that a drain reaches those with no subscription too, and
    their tokens' expiries (``deadlines``: one timer for all)."""

    def __init__(self, clock: Clock) -> None:
        self._open: set[Session] = set()
        self.deadlines = Deadlines(clock)

    def add(self, session: Session) -> None:
        self._open.add(session)

    def discard(self, session: Session) -> None:
        self._open.discard(session)

    def close_all(self, reason: str) -> None:
        for session in tuple(self._open):
            session.transport.close(reason)

    def __len__(self) -> int:
        return len(self._open)


CONNECTIONS: Final = web.AppKey("ws_connections", Connections)
