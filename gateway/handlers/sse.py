"""``GET .../sync/stream``: a workspace's events as server-sent events.

The stream opens with ``retry:`` and either ``sync.snapshot`` or, with
``Last-Event-ID`` (header, or ``last_event_id`` query), every missed event in
order — or ``sync.reset`` and a fresh snapshot when those are no longer kept.
Live events follow. It ends cleanly at ``timeout``; with ``sync.token_expired``
when the token expires; with a jittered ``retry:`` when the node drains; and
abruptly when the client cannot keep up (it resumes with ``Last-Event-ID``).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable
from typing import Final

from aiohttp import HttpVersion11, web

from gateway.auth import SYNC_READ, Identity, bearer_token
from gateway.core import Gateway
from gateway.handlers.common import gateway_of, parse, query_of, workspace_of
from gateway.handlers.params import StreamQuery
from gateway.hub import Replay, Subscriber, sync_envelope
from gateway.tasks import stop
from gateway.transports import (
    DISCONNECTED,
    OVERFLOW,
    SSE_CHUNKED,
    SSE_PLAIN,
    Transport,
    on_connection_lost,
)
from protocol import sse
from protocol.envelope import SYNC_TOKEN_EXPIRED, WorkspaceKey
from protocol.errors import ApiError

log = logging.getLogger(__name__)

TRANSPORT: Final = "sse"
# A stream that ends (timeout, token expiry, drain) has this long to write its last frames;
# a client that does not read them is cut, so no blocked write outlives the stream.
CLOSE_GRACE_SECONDS = 5.0
HEADERS: Final = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "Connection": "keep-alive",
    "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
}
PING: Final = b": ping\n\n"  # a comment line: EventSource ignores it


async def _identity_and_query(
    request: web.Request, gateway: Gateway, workspace: WorkspaceKey
) -> tuple[Identity, StreamQuery]:
    """Who asks, and for what. A bearer token is checked before the parameters (401 before
    422); a single-use ticket after them, so a request refused for its parameters does not
    use it up."""
    ticket = request.query.get("ticket")
    if ticket is not None and "Authorization" not in request.headers:
        # The ticket itself is judged by redeeming it (401), not as a parameter.
        others = {name: value for name, value in query_of(request).items() if name != "ticket"}
        query = parse(StreamQuery, others, "query")
        return await gateway.redeem_ticket(ticket, workspace), query
    token = bearer_token(request.headers.get("Authorization"))
    identity = gateway.identify(token, workspace, SYNC_READ)
    return identity, parse(StreamQuery, query_of(request), "query")


async def stream(request: web.Request) -> web.StreamResponse:
    gateway, workspace = gateway_of(request), workspace_of(request)
    identity, query = await _identity_and_query(request, gateway, workspace)
    if gateway.draining:
        raise ApiError("SERVICE_UNAVAILABLE", {"reason": "draining"})
    since = request.headers.get("Last-Event-ID") or query.last_event_id
    socket = request.transport
    if socket is None:  # the client is gone already
        raise ConnectionResetError("client disconnected")

    feed = await gateway.hub.feed(workspace)
    # HTTP/1.1 streams are chunked, each event its own chunk; HTTP/1.0 ends at the close.
    encoding = SSE_CHUNKED if request.version >= HttpVersion11 else SSE_PLAIN
    settings, metrics = gateway.settings, gateway.metrics

    def closed(reason: str) -> bytes | None:
        """The last words of a stream that ends: resume hints, by reason."""
        if reason == OVERFLOW:  # a client that cannot keep up: cut it, it resumes later
            metrics.slow_consumer_disconnects.labels(TRANSPORT).inc()
            socket.abort()
        elif reason == "token_expired":
            return encoding.event(sync_envelope(
                workspace, SYNC_TOKEN_EXPIRED, subscriber.last_id, {"reason": "token_expired"}))
        elif reason == "drain":
            # Spread the reconnections of a drained node's clients over a few seconds.
            return encoding.message(sse.retry(
                random.randint(settings.retry_ms, settings.retry_ms * 3)))
        return None

    transport = Transport(socket, request.protocol, encoding, settings.send_buffer,
                          grace=CLOSE_GRACE_SECONDS, on_close=closed, started=False)
    subscriber = Subscriber(workspace, transport, settings.send_buffer,
                            metrics.events_delivered.labels(TRANSPORT))
    snapshot = feed.attach(subscriber)  # live events from here on wait in the subscriber
    streams = request.app[STREAMS]
    response: web.StreamResponse | None = None
    ending = None
    unwatch: Callable[[], None] | None = None
    held = False
    try:
        replay = await Replay(gateway.broker, feed, subscriber, snapshot, since).start()
        await gateway.stream_opened(identity, workspace)
        held = True
        response = web.StreamResponse(headers={**HEADERS, "X-Gateway-Node": gateway.node_id})
        if encoding is SSE_CHUNKED:
            response.enable_chunked_encoding()
        await response.prepare(request)  # the headers are written: events go straight after
        transport.start()  # (closed meanwhile, a drain say: its farewell goes now)
        metrics.connections.labels(TRANSPORT).inc()
        unwatch = on_connection_lost(socket, lambda: transport.close(DISCONNECTED))
        streams.add(transport)
        deadline = gateway.clock.now() + query.timeout
        token_end = identity.expires_at + settings.jwt_leeway
        ending = gateway.clock.call_at(min(deadline, token_end), lambda: transport.close(
            "token_expired" if token_end < deadline else "timeout"))
        transport.send(encoding.message(sse.retry(settings.retry_ms)), 0)
        await subscriber.replay(replay)
        await transport.wait_closed()
    except ConnectionResetError:
        if response is None:
            raise
    except Exception:
        if response is None or not response.prepared:
            raise  # still answerable with an error envelope
        log.exception("stream failed; closing it", extra={"workspace": str(workspace)})
    finally:
        feed.detach(subscriber)
        transport.close(DISCONNECTED)  # (when not closed for a reason already)
        if unwatch is not None:
            unwatch()
        if ending is not None:
            ending.cancel()
        streams.discard(transport)
        if response is not None and response.prepared:
            metrics.connections.labels(TRANSPORT).dec()
        if held:
            await asyncio.shield(gateway.stream_closed(identity, workspace))
    return response


class Streams:
    """The node's open streams, kept alive by one loop for all (no task per stream): a
    comment line to each ``keepalive`` seconds after it opened or was last pinged, so
    proxies keep the connection and a client that is gone is noticed. The pings (and the
    ends of streams whose client is gone) are spread as the streams opened, not made all
    at once."""

    def __init__(self, keepalive: float) -> None:
        self.keepalive = keepalive
        self._due: dict[Transport, float] = {}  # in due order: each is appended when due

    def add(self, transport: Transport) -> None:
        self._due[transport] = asyncio.get_running_loop().time() + self.keepalive

    def discard(self, transport: Transport) -> None:
        self._due.pop(transport, None)

    def ping_due(self) -> None:
        """Ping the streams that are due: the oldest first, each moved to the end (the dict
        is in due order), so a tick touches only those."""
        now = asyncio.get_running_loop().time()
        while self._due:
            transport, due = next(iter(self._due.items()))
            if due > now:
                break
            del self._due[transport]
            self._due[transport] = now + self.keepalive
            if not transport.behind:  # one that is behind has bytes on the way already
                transport.send(transport.encoding.message(PING), 0)

    def __len__(self) -> int:
        return len(self._due)


STREAMS: Final = web.AppKey("sse_streams", Streams)


async def keepalive(app: web.Application) -> AsyncIterator[None]:
    """The node's one keep-alive loop for every stream (a ``cleanup_ctx``)."""
    streams = app[STREAMS]
    tick = min(1.0, streams.keepalive / 4)  # a ping is at most a tick late

    async def loop() -> None:
        while True:
            await asyncio.sleep(tick)
            streams.ping_due()

    task = asyncio.create_task(loop(), name="sse keep-alive")
    yield
    await stop(task)
