"""One WebSocket client's session, whatever carries it (SPEC §6): its authentication, its
subscriptions and presence, the ops it may send and its rate limit.

The session reads client messages as bytes (``receive``) and writes through its
``Transport``; ``handlers/ws.py`` only reads frames from aiohttp, and closes the socket
with the code the transport's close reason maps to. Every message is answered in the
order it arrives, by one ``reply``, ``error`` or ``pong`` echoing its ``ref``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Final

from gateway.auth import PRESENCE_WRITE, SYNC_READ, Identity
from gateway.broker import BackendUnavailable
from gateway.clock import Timer
from gateway.core import Gateway
from gateway.deadlines import Deadlines
from gateway.hub import Replay, Subscriber, sync_envelope
from gateway.presence import Resource
from gateway.transports import Transport
from protocol.codecs import Codec
from protocol.envelope import SYNC_TOKEN_EXPIRED, WorkspaceKey
from protocol.errors import ApiError, ValidationFailed, authentication_failed, format_timestamp
from protocol.ws import (
    Auth,
    ClientMessage,
    Join,
    Leave,
    Ping,
    Publish,
    Subscribe,
    Unsubscribe,
    Viewing,
    decode_frame,
    error_message,
    parse_client_message,
    pong_message,
    reference_of,
    reply_message,
)

log = logging.getLogger(__name__)

TRANSPORT: Final = "ws"
# A socket's publishes under way at once, at most: a client that sends publish after publish
# without waiting for the replies has them group-committed (``RedisBroker.append``) rather
# than one round trip each; the next frame waits while this many are under way.
PIPELINE: Final = 64
PIPELINE_BYTES: Final = 256 * 1024  # ...and frames of at most this many bytes in all (one always)


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved; ``take`` spends one if there is one."""

    __slots__ = ("_at", "_burst", "_rate", "_tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._at = now

    @property
    def full(self) -> bool:
        """True when no token has been spent recently (the client is within its rate)."""
        return self._tokens >= self._burst - 1.0

    def take(self, now: float) -> bool:
        elapsed = max(0.0, now - self._at)  # a clock stepping back refills nothing
        self._at = now
        self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class Session:
    """One client: its identity, subscriptions, presence session and timers.

    Timers are the loop's (``call_at``), not tasks; a task exists only while a
    subscription's replay is written. Everything the session says goes through its
    transport: ``answer`` (never blocks; a client that never reads overflows) or a
    close with a reason and farewell frames.

    An idle socket holds what it needs and no more (a node holds thousands): what only some
    sockets use — joined workspaces, replays being written and their lock, the rate limit's
    bucket, the presence session id — is made when first needed and let go of when done
    with; the subscriptions are a tuple (most sockets have one).
    """

    __slots__ = ("_bucket", "_delivered", "_expiries", "_home", "_publishing", "_publishing_bytes",
                 "_session_id", "_strikes", "_timer", "codec", "gateway", "identity", "joined",
                 "replaying", "replays", "settings", "subscriptions", "transport")

    def __init__(self, gateway: Gateway, transport: Transport, codec: Codec,
                 identity: Identity | None, expiries: Deadlines) -> None:
        self.gateway = gateway
        self._expiries = expiries  # the node's (on the gateway's clock): not a loop timer each
        self.settings = gateway.settings
        self.transport = transport
        self.codec = codec
        self.identity = identity
        self._session_id: str | None = None  # made at the first join (``session_id``)
        self.subscriptions: tuple[Subscriber, ...] = ()  # in subscription order
        self.joined: set[WorkspaceKey] | None = None  # made at the first join
        self._bucket: TokenBucket | None = None  # made (full) at the first message
        self._strikes = 0
        self._timer: Timer | None = None
        self._home: tuple[WorkspaceKey, str | None] | None = None  # until authenticated
        # One replay read at a time per socket: a client resuming many workspaces at once
        # makes the node hold one page for it, not one per subscription. (Both made at the
        # first replay, dropped when no replay is left.)
        self.replays: asyncio.Lock | None = None
        self.replaying: dict[WorkspaceKey, asyncio.Task[None]] | None = None  # being written
        self._delivered = gateway.metrics.events_delivered.labels(TRANSPORT)
        # Publishes under way, oldest first (made at the first publish, dropped when none is).
        self._publishing: deque[tuple[asyncio.Task[None], int]] | None = None  # (task, bytes)
        self._publishing_bytes = 0

    @property
    def session_id(self) -> str:
        """This socket's presence session (one per socket, in every workspace it joins)."""
        if self._session_id is None:
            self._session_id = f"ws-{secrets.token_hex(8)}"
        return self._session_id

    def subscriber(self, workspace: WorkspaceKey) -> Subscriber | None:
        """This socket's subscription to ``workspace``, if any."""
        return next((s for s in self.subscriptions if s.workspace == workspace), None)

    async def start(self, workspace: WorkspaceKey | None, since: str | None) -> None:
        """Authenticate in time, or (authenticated at the upgrade) begin."""
        if workspace is not None:
            self._home = (workspace, since)
        if self.identity is None:
            self._timer = asyncio.get_running_loop().call_later(
                self.settings.ws_auth_timeout, self._auth_deadline)
        else:
            await self._authenticated()

    def end(self) -> None:
        """The socket is done: stop every subscription and timer (synchronous: the caller
        may be cancelled at its next await)."""
        if self._timer is not None:
            self._timer.cancel()
        for subscriber in self.subscriptions:
            self._unsubscribe(subscriber.workspace)

    # -- reading ---------------------------------------------------------------------

    async def receive(self, payload: bytes) -> None:
        """One client message."""
        if self.transport.closed is not None:  # closing: later messages are not answered
            return
        now = self.gateway.clock.now()
        bucket = self._bucket
        if bucket is None:  # (as full as a bucket made at the upgrade would be by now)
            bucket = self._bucket = TokenBucket(self.settings.ws_rate_limit,
                                                self.settings.ws_rate_burst, now)
        if not bucket.take(now):
            await self.settle()
            self._rate_limited()
            return
        if bucket.full:
            self._strikes = 0
        ref: str | int | None = None
        try:
            raw = decode_frame(self.codec, payload)
            ref = reference_of(raw)
            message = parse_client_message(raw)
        except ValidationFailed as exc:
            await self.settle()
            self.answer(error_message(ref, exc.body()))
            return
        if isinstance(message, Publish) and self.identity is not None:
            await self._pipeline(message, len(payload))
            return
        await self.settle()
        await self._dispatch(message)

    async def _pipeline(self, message: Publish, size: int) -> None:
        """Start a publish (a frame of ``size`` bytes) and return once fewer than
        ``PIPELINE`` publishes, and fewer than ``PIPELINE_BYTES`` of them, are under way; its
        answer is sent after those of the publishes before it. Publishes of one workspace
        reach the log in the order they came (the broker's queue keeps it)."""
        while self._publishing is not None and (
                len(self._publishing) >= PIPELINE or self._publishing_bytes + size > PIPELINE_BYTES):
            await asyncio.wait((self._publishing[0][0],))
        publishing = self._publishing
        if publishing is None:
            publishing = self._publishing = deque()
        before = publishing[-1][0] if publishing else None
        task = asyncio.create_task(self._publish_in_turn(message, before), name="ws publish")
        publishing.append((task, size))
        self._publishing_bytes += size
        task.add_done_callback(self._published)

    async def _publish_in_turn(self, message: Publish, before: asyncio.Task[None] | None) -> None:
        answer = await self._answer_to(message)
        if before is not None:
            await asyncio.wait((before,))
        if answer is not None:
            self.answer(answer)

    def _published(self, task: asyncio.Task[None]) -> None:
        publishing = self._publishing
        if publishing is None:
            return
        for index, (started, size) in enumerate(publishing):  # (the oldest, as a rule)
            if started is task:
                del publishing[index]
                self._publishing_bytes -= size
                break
        if not publishing:
            self._publishing = None

    async def settle(self) -> None:
        """Wait until the publishes under way are answered (the next answer comes after)."""
        if self._publishing:
            await asyncio.wait((self._publishing[-1][0],))  # (which waits for those before)

    def _rate_limited(self) -> None:
        self._strikes += 1
        error = ApiError("RATE_LIMITED", {"limit_per_second": self.settings.ws_rate_limit,
                                          "burst": self.settings.ws_rate_burst})
        answer = self._frame(error_message(None, error.body()))
        if self._strikes > self.settings.ws_rate_strikes:
            self.transport.close("rate_limited", answer)
        else:
            self.transport.send(answer)

    async def _dispatch(self, message: ClientMessage) -> None:
        answer = await self._answer_to(message)
        if answer is not None:
            self.answer(answer)

    async def _answer_to(self, message: ClientMessage) -> dict[str, Any] | None:
        try:
            if self.identity is None and not isinstance(message, Auth):
                raise authentication_failed()
            return await OPS[type(message)](self, message)
        except (ApiError, ValidationFailed) as exc:
            return error_message(message.ref, exc.body())
        except BackendUnavailable:
            return error_message(message.ref, ApiError("SERVICE_UNAVAILABLE").body())
        except Exception:
            log.exception("websocket message failed", extra={"op": message.op})
            return error_message(message.ref, ApiError("INTERNAL_SERVER_ERROR").body())

    # -- writing ---------------------------------------------------------------------

    def _frame(self, message: dict[str, Any]) -> bytes:
        return self.transport.encoding.message(self.codec.encode(message))

    def answer(self, message: dict[str, Any]) -> None:
        """Send a reply, error or pong (never blocks; a client that never reads overflows)."""
        self.transport.send(self._frame(message))

    # -- authentication --------------------------------------------------------------

    def _auth_deadline(self) -> None:
        if self.identity is None:
            error = self._frame(error_message(None, authentication_failed().body()))
            self.transport.close("auth_timeout", error)

    async def _authenticated(self) -> None:
        """Start the expiry timer; on the per-workspace URL, subscribe to its workspace."""
        assert self.identity is not None
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._expiries.call_at(
            self.identity.expires_at + self.settings.jwt_leeway, self._expire)
        if self._home is not None:
            (workspace, since), self._home = self._home, None
            raw = {"op": "subscribe", "org_id": workspace.org_id,
                   "workspace_id": workspace.workspace_id, "since": since}
            try:
                message = parse_client_message(raw)
            except ValidationFailed as exc:
                self.answer(error_message(None, exc.body()))
                return
            await self._dispatch(message)

    def _expire(self) -> None:
        """``sync.token_expired`` for each subscription, after everything already sent, with
        the last id it was given (the client resumes after it); then the close."""
        event = self.transport.encoding.event
        farewell = b"".join(
            event(sync_envelope(subscriber.workspace, SYNC_TOKEN_EXPIRED, subscriber.last_id,
                                {"reason": "token_expired"}))
            for subscriber in self.subscriptions)
        self.transport.close("token_expired", farewell)

    # -- presence ----------------------------------------------------------------------

    async def end_presence(self) -> None:
        """Leave every joined workspace, or linger there when the node drains."""
        if self.identity is None or self.joined is None:
            return
        draining = self.transport.closed == "drain"
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
        assert self.identity is not None  # _answer_to lets only `auth` through before
        return self.identity

    # -- subscriptions -----------------------------------------------------------------

    async def _replay(self, subscriber: Subscriber, replay: Replay) -> None:
        """Write the replay at the client's pace (never an overflow), then go live."""
        if self.replays is None:
            self.replays = asyncio.Lock()
        try:
            async with self.replays:
                await subscriber.replay(replay)
        except Exception:
            log.exception("websocket replay failed; closing the connection",
                          extra={"workspace": str(subscriber.workspace)})
            self.transport.close("failed")
        finally:
            replaying = self.replaying
            if replaying is not None and replaying.get(subscriber.workspace) is asyncio.current_task():
                self._replayed(subscriber.workspace)

    def _replayed(self, workspace: WorkspaceKey) -> asyncio.Task[None] | None:
        """Forget ``workspace``'s replay task (returned, if there was one). With the last one
        the lock goes too: every replay that will take it is in ``replaying`` (a cancelled one
        only lets it go)."""
        replaying = self.replaying
        task = replaying.pop(workspace, None) if replaying is not None else None
        if not replaying:
            self.replaying = self.replays = None
        return task

    def _unsubscribe(self, workspace: WorkspaceKey) -> None:
        subscriber = self.subscriber(workspace)
        if subscriber is None:
            return
        self.subscriptions = tuple(s for s in self.subscriptions if s is not subscriber)
        feed = self.gateway.hub.existing_feed(workspace)
        if feed is not None:
            feed.detach(subscriber)
        replaying = self._replayed(workspace)
        if replaying is not None:
            replaying.cancel()


# -- the ops (one handler each; the table below dispatches) ---------------------------

Answer = dict[str, Any] | None


async def _auth(session: Session, message: Auth) -> Answer:
    if session.identity is not None:
        raise ValidationFailed(({"loc": ["body", "op"], "msg": "Value error, already authenticated",
                                 "type": "value_error", "input": "auth",
                                 "ctx": {"error": "already authenticated"}},))
    try:
        identity = session.gateway.verifier.verify(message.token)
    except ApiError as exc:
        session.transport.close("unauthenticated",
                                session._frame(error_message(message.ref, exc.body())))
        return None
    session.identity = identity
    session.answer(reply_message(message.ref, {
        "user_id": identity.user_id,
        "org_id": identity.org_id,
        "expires_at": format_timestamp(datetime.fromtimestamp(identity.expires_at, UTC)),
        "node_id": session.gateway.node_id,
    }))
    await session._authenticated()
    return None


def _workspace_data(workspace: WorkspaceKey, **more: Any) -> dict[str, Any]:
    return {"org_id": workspace.org_id, "workspace_id": workspace.workspace_id, **more}


async def _subscribe(session: Session, message: Subscribe) -> Answer:
    workspace, gateway = message.workspace, session.gateway
    session.user.authorize(workspace, SYNC_READ)
    if session.subscriber(workspace) is not None:
        raise ValidationFailed(({"loc": ["body", "workspace_id"],
                                 "msg": "Value error, already subscribed",
                                 "type": "value_error", "input": workspace.workspace_id,
                                 "ctx": {"error": "already subscribed"}},))
    _check_room(session, len(session.subscriptions), False, "max_subscriptions")
    if gateway.draining:
        raise ApiError("SERVICE_UNAVAILABLE", {"reason": "draining"})
    feed = await gateway.hub.feed(workspace)
    # (The feed's key: one per workspace, however many subscribers hold it.)
    subscriber = Subscriber(feed.workspace, session.transport, session.settings.send_buffer,
                            session._delivered)
    snapshot = feed.attach(subscriber)  # live events from here on wait in the subscriber
    session.subscriptions = (*session.subscriptions, subscriber)
    try:
        replay = await Replay(gateway.broker, feed, subscriber, snapshot, message.since).start()
    except BaseException:
        session._unsubscribe(workspace)
        raise
    resumed = message.since is not None and not replay.reset
    session.answer(reply_message(message.ref, _workspace_data(
        workspace, subscribed=True, resumed=resumed, snapshot=replay.snapshot.to_dict())))
    # Written while the socket goes on reading: a ping, an unsubscribe or the client's
    # disappearance is noticed at once, however long the replay.
    if session.replaying is None:
        session.replaying = {}
    session.replaying[workspace] = asyncio.create_task(
        session._replay(subscriber, replay), name=f"ws replay {workspace}")
    return None


def _check_room(session: Session, holding: int, holds: bool, what: str) -> None:
    """At most ``ws_max_subscriptions`` workspaces subscribed, and as many joined, per socket
    (``holding`` of them now; ``holds``: the one asked for is one of them)."""
    if not holds and holding >= session.settings.ws_max_subscriptions:
        raise ApiError("RATE_LIMITED", {what: session.settings.ws_max_subscriptions})


def _check_join(session: Session, workspace: WorkspaceKey) -> None:
    joined = session.joined or ()
    _check_room(session, len(joined), workspace in joined, "max_joined")


def _joined(session: Session, workspace: WorkspaceKey) -> None:
    if session.joined is None:
        session.joined = set()  # (a set per socket: few sockets join)
    session.joined.add(workspace)


async def _unsubscribe(session: Session, message: Unsubscribe) -> Answer:
    session._unsubscribe(message.workspace)
    return reply_message(message.ref, _workspace_data(message.workspace, subscribed=False))


async def _join(session: Session, message: Join) -> Answer:
    session.user.authorize(message.workspace, PRESENCE_WRITE)
    _check_join(session, message.workspace)
    data = await session.gateway.session_join(session.user, message.workspace, session.session_id)
    _joined(session, message.workspace)
    return reply_message(message.ref, data)


async def _leave(session: Session, message: Leave) -> Answer:
    session.user.authorize(message.workspace, PRESENCE_WRITE)
    data = await session.gateway.session_leave(session.user, message.workspace, session.session_id)
    if session.joined is not None:
        session.joined.discard(message.workspace)
    return reply_message(message.ref, data)


async def _viewing(session: Session, message: Viewing) -> Answer:
    session.user.authorize(message.workspace, PRESENCE_WRITE)
    _check_join(session, message.workspace)
    resource = Resource(message.resource_type, message.resource_id)
    data = await session.gateway.session_viewing(session.user, message.workspace, session.session_id,
                                              resource)
    _joined(session, message.workspace)
    return reply_message(message.ref, data)


async def _publish(session: Session, message: Publish) -> Answer:
    envelope = await session.gateway.publish(session.user, message.workspace, message.type,
                                          message.data, idempotency_key=message.idempotency_key)
    return reply_message(message.ref, envelope.to_dict())


async def _ping(session: Session, message: Ping) -> Answer:
    return pong_message(message.ref)


OPS: Final[dict[type[ClientMessage], Callable[[Session, Any], Awaitable[Answer]]]] = {
    Auth: _auth,
    Subscribe: _subscribe,
    Unsubscribe: _unsubscribe,
    Join: _join,
    Leave: _leave,
    Viewing: _viewing,
    Publish: _publish,
    Ping: _ping,
}
