"""Clients that vanish, stall or read slowly mid-replay: nothing of theirs stays behind on
the node (presence, connections, memory), and a slow reader of a long resume is paced, not
cut. Each test reproduces a defect found by trying the gateway as such a client would.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from gateway.clock import ManualClock
from gateway.config import Settings
from gateway.core import Gateway
from gateway.handlers import sse
from gateway.handlers.common import GATEWAY
from protocol.envelope import WorkspaceKey
from tests.conftest import BACKENDS, BASE, ORG, WORKSPACE, auth, make_broker, with_settings
from tests.test_ws_memory import small_receive_buffer

HERE = WorkspaceKey(ORG, WORKSPACE)
PAD = "x" * 16_384  # big events: a client that does not read blocks the node's writes soon
WS = "/v1/sync/ws"


def gauge(gateway: Gateway, name: str, transport: str) -> float:
    prefix = f'{name}{{transport="{transport}"}} '
    for line in gateway.metrics.render().decode().splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return 0.0


def members(gateway: Gateway, workspace: WorkspaceKey = HERE) -> set[str]:
    """Who this node's presence replica of ``workspace`` holds."""
    feed = gateway.hub.existing_feed(workspace)
    return set(feed.replica.members) if feed is not None else set()


async def eventually(check: Callable[[], bool], timeout: float, what: str) -> None:
    async with asyncio.timeout(timeout):
        while not check():  # noqa: ASYNC110 (the node's state changes on its own)
            await asyncio.sleep(0.02)
    assert check(), what


async def history(gateway: Gateway, token: Callable[..., str], count: int,
                  workspace: WorkspaceKey = HERE) -> tuple[str, list[str]]:
    """``count`` big events published on ``workspace``: (the position before them, their ids)."""
    start = str((await gateway.broker.presence_snapshot(workspace)).position)
    publisher = gateway.verifier.verify(token("publisher", workspaces="*"))
    ids = [(await gateway.publish(publisher, workspace, "doc.chunk", {"n": n, "pad": PAD})).id
           for n in range(count)]
    return start, ids


def slow_session() -> aiohttp.ClientSession:
    """An HTTP client whose sockets have a tiny receive buffer (a reader that lags)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(socket_factory=small_receive_buffer))


class RawSocket:
    """A WebSocket client with a tiny receive window that reads only when told to."""

    def __init__(self, client: TestClient) -> None:
        self._client = client
        self._session = slow_session()
        self.ws: aiohttp.ClientWebSocketResponse | None = None

    async def open(self, token: str) -> RawSocket:
        self.ws = await self._session.ws_connect(self._client.make_url(WS), headers=auth(token),
                                                 max_msg_size=0)
        return self

    async def send(self, **message: Any) -> None:
        assert self.ws is not None
        await self.ws.send_json(message)

    async def receive(self, timeout: float = 10.0) -> dict[str, Any] | None:
        """The next message, or None once the socket closed."""
        assert self.ws is not None
        message = await self.ws.receive(timeout=timeout)
        if message.type != aiohttp.WSMsgType.TEXT:
            return None
        return dict(message.json())

    def reset(self) -> None:
        """Vanish: a TCP reset, no close handshake."""
        assert self.ws is not None
        transport = self.ws._conn.transport  # type: ignore[union-attr]
        transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    async def close(self) -> None:
        await self._session.close()


@pytest.fixture(params=BACKENDS)
async def node(request: pytest.FixtureRequest, app_factory: Callable[..., Any],
               settings: Settings, clock: ManualClock) -> Callable[..., Any]:
    """``await node(**settings)``: the gateway on each backend, with these settings."""

    async def make(**changes: Any) -> TestClient:
        changed = with_settings(settings, **changes)
        return await app_factory(changed, broker=make_broker(request.param, changed, clock))

    return make


async def test_a_websocket_client_vanishing_mid_replay_leaves_no_ghost(
    node: Callable[..., Any], token: Callable[..., str]
) -> None:
    client = await node()
    gateway = client.app[GATEWAY]
    start, _ = await history(gateway, token, 3000)
    raw = await RawSocket(client).open(token("alice"))
    try:
        await raw.send(op="join", org_id=ORG, workspace_id=WORKSPACE, ref=1)
        await raw.send(op="subscribe", org_id=ORG, workspace_id=WORKSPACE, since=start, ref=2)
        await eventually(lambda: "alice" in members(gateway), 5,
                         "alice joined")
        await asyncio.sleep(0.5)  # the node is now blocked writing a replay nobody reads
        raw.reset()
        await eventually(lambda: gauge(gateway, "gateway_connections", "ws") == 0, 5,
                         "the vanished socket is still counted")
        await eventually(lambda: "alice" not in members(gateway),
                         5, "alice is a ghost")
        assert gateway.hub.existing_feed(HERE).subscriber_count == 0
    finally:
        await raw.close()


async def test_a_slow_long_resume_is_not_cut_by_another_workspaces_live_events(
    node: Callable[..., Any], token: Callable[..., str]
) -> None:
    client = await node(send_buffer=8)
    gateway = client.app[GATEWAY]
    busy = WorkspaceKey(ORG, "busy")
    start, ids = await history(gateway, token, 600)  # ~10 MB: more than the sockets buffer
    raw = await RawSocket(client).open(token("reader", workspaces="*"))
    try:
        await raw.send(op="subscribe", org_id=ORG, workspace_id="busy", ref=1)
        await raw.send(op="subscribe", org_id=ORG, workspace_id=WORKSPACE, since=start, ref=2)
        await asyncio.sleep(0.5)  # the resume fills every buffer between node and client
        # Fewer than the send buffer holds, while the client reads nothing.
        _, live = await history(gateway, token, 5, busy)
        got: dict[str, list[str]] = {"busy": [], WORKSPACE: []}
        while len(got[WORKSPACE]) < len(ids) or len(got["busy"]) < len(live):
            message = await raw.receive()
            assert message is not None, f"closed {raw.ws.close_code}: {len(got[WORKSPACE])} read"
            if message["op"] == "event" and not message["event"]["type"].startswith("sync."):
                got[message["event"]["workspace_id"]].append(message["event"]["id"])
            await asyncio.sleep(0.001)  # a slow reader
        assert got == {WORKSPACE: ids, "busy": live}
    finally:
        await raw.close()


async def test_a_slow_resume_of_a_busy_workspace_gets_every_event_once_in_order(
    node: Callable[..., Any], token: Callable[..., str]
) -> None:
    client = await node(send_buffer=8)
    gateway = client.app[GATEWAY]
    start, ids = await history(gateway, token, 600)  # ~10 MB: more than the sockets buffer
    raw = await RawSocket(client).open(token("reader"))
    try:
        await raw.send(op="subscribe", org_id=ORG, workspace_id=WORKSPACE, since=start, ref=1)
        await asyncio.sleep(0.5)
        # Far more live events than the subscription may hold while its replay is read.
        _, more = await history(gateway, token, 60)
        got: list[str] = []
        while len(got) < len(ids) + len(more):
            message = await raw.receive()
            assert message is not None, f"closed {raw.ws.close_code} after {len(got)} events"
            if message["op"] == "event":
                assert not message["event"]["type"].startswith("sync."), message["event"]["type"]
                got.append(message["event"]["id"])
        assert got == ids + more
        _, [last] = await history(gateway, token, 1)  # and then live, as usual
        message = await raw.receive()
        assert message is not None and message["event"]["id"] == last
    finally:
        await raw.close()


async def test_a_slow_sse_resume_of_a_busy_workspace_gets_every_event_once_in_order(
    node: Callable[..., Any], token: Callable[..., str]
) -> None:
    client = await node(send_buffer=8)
    gateway = client.app[GATEWAY]
    start, ids = await history(gateway, token, 600)
    async with slow_session() as session:
        response = await session.get(client.make_url(f"{BASE}/stream"),
                                     headers={**auth(token("reader")), "Last-Event-ID": start})
        assert response.status == 200
        await asyncio.sleep(0.5)
        _, more = await history(gateway, token, 60)  # live, while the replay waits for the client
        got: list[str] = []
        async with asyncio.timeout(30):
            while len(got) < len(ids) + len(more):
                line = await response.content.readline()
                assert line, f"cut after {len(got)} events"
                if line.startswith(b"event: sync."):
                    raise AssertionError(line)
                if line.startswith(b"id: "):
                    got.append(line[4:].decode().strip())
        assert got == ids + more
        response.close()


async def test_an_sse_stream_stuck_in_a_write_ends_at_the_token_expiry(
    node: Callable[..., Any], token: Callable[..., str], clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sse, "CLOSE_GRACE_SECONDS", 0.5, raising=False)
    client = await node()
    gateway = client.app[GATEWAY]
    async with slow_session() as session:
        response = await session.get(client.make_url(f"{BASE}/stream?timeout=60"),
                                     headers=auth(token("stalled", ttl=15)))
        assert response.status == 200
        await eventually(lambda: gauge(gateway, "gateway_connections", "sse") == 1, 5, "open")
        await history(gateway, token, 400)  # ~6.5 MB the client never reads: writes block
        await asyncio.sleep(0.5)
        clock.advance(80)  # past the token's expiry (and its leeway), and the timeout
        await eventually(lambda: gauge(gateway, "gateway_connections", "sse") == 0, 5,
                         "the stalled stream outlived its token")
        assert gateway.hub.existing_feed(HERE).subscriber_count == 0
        response.close()


async def test_a_stalled_stream_that_ends_does_not_leave_its_connection_behind(
    node: Callable[..., Any], token: Callable[..., str], clock: ManualClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stream ends (its timeout) while its client reads nothing: what the socket still
    holds is given the grace to drain, then the connection is cut, not kept open for ever by
    a write the client never reads (whether the stream's own queue was empty or not)."""
    monkeypatch.setattr(sse, "CLOSE_GRACE_SECONDS", 0.5, raising=False)
    client = await node()
    gateway = client.app[GATEWAY]
    server = client.server.runner.server
    start, _ = await history(gateway, token, 300)
    async with slow_session() as session:
        response = await session.get(client.make_url(f"{BASE}/stream?timeout=60"),
                                     headers={**auth(token("stalled")), "Last-Event-ID": start})
        assert response.status == 200
        await asyncio.sleep(0.5)  # the replay fills the socket; the client reads nothing
        assert len(server.connections) == 1
        clock.advance(61)
        await eventually(lambda: gauge(gateway, "gateway_connections", "sse") == 0, 5,
                         "the stream did not end")
        await eventually(lambda: not server.connections, 5,
                         "the stalled connection outlived its stream")
        response.close()


async def test_an_sse_stream_that_times_out_mid_replay_resumes_without_a_gap(
    node: Callable[..., Any], token: Callable[..., str], clock: ManualClock,
) -> None:
    client = await node()
    gateway = client.app[GATEWAY]
    start, ids = await history(gateway, token, 300)
    async with slow_session() as session:
        response = await session.get(client.make_url(f"{BASE}/stream?timeout=60"),
                                     headers={**auth(token("reader")), "Last-Event-ID": start})
        await asyncio.sleep(0.5)  # part of the replay is written, the rest waits
        clock.advance(61)
        text = (await asyncio.wait_for(response.read(), 10)).decode()
    got = [line[4:] for line in text.splitlines() if line.startswith("id: ")]
    # The stream ended before its replay did: every id it sent is in order, and it ends at the
    # last event it wrote, which the client resumes from.
    assert got and got == ids[:len(got)], got[:3]
    assert len(got) < len(ids)


# -- per-socket and per-node bookkeeping stays bounded ---------------------------------


async def test_joins_per_socket_are_capped_like_subscriptions(
    app_factory: Callable[..., Any], settings: Settings, token: Callable[..., str]
) -> None:
    client = await app_factory(with_settings(settings, ws_max_subscriptions=2))
    raw = await RawSocket(client).open(token("alice", workspaces="*"))
    try:
        async def ask(ref: int, **message: Any) -> dict[str, Any]:
            await raw.send(ref=ref, **message)
            answer = await raw.receive()
            assert answer is not None and answer["ref"] == ref, answer
            return answer

        for ref, workspace in enumerate(("a", "b")):
            assert (await ask(ref, op="join", org_id=ORG, workspace_id=workspace))["op"] == "reply"
        assert (await ask(5, op="join", org_id=ORG, workspace_id="a"))["op"] == "reply"  # again
        for ref, op in ((6, {"op": "join"}), (7, {"op": "viewing", "resource_type": "doc",
                                                   "resource_id": "d1"})):
            refused = await ask(ref, **op, org_id=ORG, workspace_id="c")
            assert refused["op"] == "error"
            assert refused["error"]["error"] == "RATE_LIMITED"
            assert refused["error"]["details"] == {"max_joined": 2}
        assert (await ask(8, op="leave", org_id=ORG, workspace_id="a"))["op"] == "reply"
        assert (await ask(9, op="join", org_id=ORG, workspace_id="c"))["op"] == "reply"
    finally:
        await raw.close()


async def test_subscription_churn_leaves_nothing_per_workspace_behind(
    app_factory: Callable[..., Any], settings: Settings, token: Callable[..., str]
) -> None:
    from gateway.handlers.ws import CONNECTIONS

    client = await app_factory(settings)
    gateway = client.app[GATEWAY]
    raw = await RawSocket(client).open(token("alice", workspaces="*"))
    try:
        for n in range(50):
            await raw.send(op="subscribe", org_id=ORG, workspace_id=f"w{n}", ref=n)
            await history(gateway, token, 5, WorkspaceKey(ORG, f"w{n}"))  # in flight
            await raw.send(op="unsubscribe", org_id=ORG, workspace_id=f"w{n}", ref=1000 + n)
        seen = 0
        while seen < 50:
            message = await raw.receive()
            assert message is not None
            seen += message.get("ref", -1) in range(1000, 1050)
        [connection] = client.app[CONNECTIONS]._open
        assert connection.subscriptions == ()
        assert connection.replaying is None and connection.replays is None  # (let go of)
    finally:
        await raw.close()


async def test_a_failed_feed_creation_leaves_no_lock_behind(
    settings: Settings, clock: ManualClock
) -> None:
    from gateway.broker import BackendUnavailable
    from gateway.broker_memory import MemoryBroker
    from gateway.hub import Hub

    class Down(MemoryBroker):
        async def presence_snapshot(self, workspace: WorkspaceKey) -> Any:
            raise BackendUnavailable("down")

    hub = Hub(Down(clock=clock))
    for n in range(20):
        with pytest.raises(BackendUnavailable):
            await hub.feed(WorkspaceKey(ORG, f"w{n}"))
    assert hub._creating == {}
