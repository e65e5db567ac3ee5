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
import contextlib
import logging
import random

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from gateway.auth import SYNC_READ, Identity, bearer_token
from gateway.core import Gateway
from gateway.handlers.common import gateway_of, parse, query_of, workspace_of
from gateway.handlers.params import StreamQuery
from gateway.hub import Closed, Outbox, Replay, Resync, encoded, is_after, sync_envelope
from protocol import sse
from protocol.envelope import SYNC_RESET, SYNC_TOKEN_EXPIRED, Envelope, EventId, WorkspaceKey
from protocol.errors import ApiError

log = logging.getLogger(__name__)

TRANSPORT = "sse"
WRITE_BATCH = 64
# A stream that ends (timeout, token expiry, drain) has this long to write its last frames;
# a client that does not read them is cut, so no blocked write outlives the stream.
CLOSE_GRACE_SECONDS = 5.0


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


def _frame(envelope: Envelope) -> bytes:
    return encoded(envelope, TRANSPORT, sse.encode_envelope)


async def _end_at(gateway: Gateway, outbox: Outbox, deadline: float, expires_at: float) -> None:
    """Close the outbox at the stream's deadline or the token's expiry, whichever is first."""
    token_end = expires_at + gateway.settings.jwt_leeway
    await gateway.clock.sleep_until(min(deadline, token_end))
    outbox.close("token_expired" if token_end < deadline else "timeout")


async def stream(request: web.Request) -> web.StreamResponse:
    gateway, workspace = gateway_of(request), workspace_of(request)
    identity, query = await _identity_and_query(request, gateway, workspace)
    if gateway.draining:
        raise ApiError("SERVICE_UNAVAILABLE", {"reason": "draining"})
    since = request.headers.get("Last-Event-ID") or query.last_event_id

    feed = await gateway.hub.feed(workspace)
    transport = request.transport
    cut: asyncio.TimerHandle | None = None

    def closed(reason: str) -> None:
        nonlocal cut
        if transport is None or reason == "disconnected":
            return
        if reason == "overflow":  # a client that cannot keep up: cut it, it resumes later
            gateway.metrics.slow_consumer_disconnects.labels(TRANSPORT).inc()
            transport.abort()
        else:  # the stream ends: a write the client does not read may not hold it open
            cut = asyncio.get_running_loop().call_later(CLOSE_GRACE_SECONDS, transport.abort)

    outbox = Outbox(gateway.settings.send_buffer, on_close=closed)
    snapshot = feed.attach(outbox)  # live events from here on queue up in the outbox
    response: EventSourceResponse | None = None
    watcher: asyncio.Task[None] | None = None
    timer: asyncio.Task[None] | None = None
    held = False
    try:
        replay = await Replay(gateway.broker, feed, outbox, snapshot, since).start()
        await gateway.stream_opened(identity, workspace)
        held = True
        response = EventSourceResponse(
            sep="\n", ping_interval=gateway.settings.keepalive,
            headers={"X-Gateway-Node": gateway.node_id},
        )
        await response.prepare(request)
        gateway.metrics.connections.labels(TRANSPORT).inc()
        # The keep-alive task ends when a write fails: the client is gone.
        watcher = asyncio.create_task(response.wait())
        watcher.add_done_callback(lambda _: outbox.close("disconnected"))
        timer = asyncio.create_task(
            _end_at(gateway, outbox, gateway.clock.now() + query.timeout, identity.expires_at)
        )
        await response.write(sse.retry(gateway.settings.retry_ms))
        cursor = await _replay(response, replay, outbox)
        await _pump(gateway, response, outbox, workspace, cursor)
    except ConnectionResetError:
        if response is None:
            raise
    except Exception:
        if response is None or not response.prepared:
            raise  # still answerable with an error envelope
        log.exception("stream failed; closing it", extra={"workspace": str(workspace)})
    finally:
        feed.detach(outbox)
        if cut is not None:  # ended in time (the connection may serve another request)
            cut.cancel()
        for task in (timer, watcher):
            if task is not None:
                task.cancel()
        if response is not None and response.prepared:
            gateway.metrics.connections.labels(TRANSPORT).dec()
        if held:
            await asyncio.shield(gateway.stream_closed(identity, workspace))
    return response


async def _replay(response: EventSourceResponse, replay: Replay, outbox: Outbox) -> EventId | None:
    """Write the replay a page at a time, waiting for each write: a client resuming far back
    never makes the node hold more than a page of events for it. Replayed envelopes may be
    the broker's retained ones, so their encodings are not cached on them.

    Returns the position live events continue from: the replay's cursor, or, when the
    stream closed meanwhile (timeout, token expiry, drain), the last event written (the
    client resumes after it)."""
    written: Envelope | None = None
    async with contextlib.aclosing(replay.pages()) as pages:
        async for page in pages:
            if written is not None and outbox.closed is not None:
                return EventId.parse(written.id)
            await response.write(b"".join(sse.encode_envelope(envelope) for envelope in page))
            written = page[-1]
    return replay.cursor


async def _pump(
    gateway: Gateway, response: EventSourceResponse, outbox: Outbox,
    workspace: WorkspaceKey, cursor: EventId | None,
) -> None:
    """Write the outbox to the client until it closes.

    Live events queued during the replay may repeat replayed ones: they are skipped
    until the first event after ``cursor``; from then on the feed's order holds.
    """
    delivered = gateway.metrics.events_delivered.labels(TRANSPORT)
    skip_through = cursor
    last_id = str(cursor) if cursor else ""
    while True:
        first = await outbox.next()
        if isinstance(first, Closed):
            await _finish(gateway, response, workspace, first, last_id)
            return
        # Whatever else is already queued goes out in the same write.
        chunk: list[bytes] = []
        for item in [first, *outbox.ready(WRITE_BATCH)]:
            if isinstance(item, Resync):
                reset = sync_envelope(workspace, SYNC_RESET, item.snapshot.id,
                                      {"reason": "history_lost", "last_event_id": last_id})
                chunk += [_frame(reset), _frame(item.snapshot)]
                skip_through, last_id = EventId.parse(item.snapshot.id), item.snapshot.id
                continue
            if skip_through is not None:
                if not is_after(item, skip_through):
                    continue
                skip_through = None
            chunk.append(_frame(item))
            last_id = item.id
        if chunk:
            await response.write(b"".join(chunk))
            delivered.inc(len(chunk))


async def _finish(
    gateway: Gateway, response: EventSourceResponse, workspace: WorkspaceKey,
    closed: Closed, last_id: str,
) -> None:
    with contextlib.suppress(ConnectionResetError):
        if closed.reason == "token_expired":
            event = sync_envelope(workspace, SYNC_TOKEN_EXPIRED, last_id,
                                  {"reason": "token_expired"})
            await response.write(_frame(event))
        elif closed.reason == "drain":
            # Spread the reconnections of a drained node's clients over a few seconds.
            jitter = random.randint(gateway.settings.retry_ms, gateway.settings.retry_ms * 3)
            await response.write(sse.retry(jitter))
