"""A client that stops reading: only it is closed (1008), the others get everything,
and it resumes with ``since`` without a gap."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from gateway.config import Settings
from gateway.handlers.common import GATEWAY
from protocol.envelope import WorkspaceKey
from tests.conftest import ORG, WORKSPACE, auth, with_settings
from tests.test_ws import HERE, subscribed

WS = "/v1/sync/ws"


def small_receive_buffer(addr_info: Any) -> socket.socket:
    """A client socket with a tiny receive window: the server's writes back up quickly."""
    family, kind, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=kind, proto=proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


def slow_consumer_count(metrics: bytes) -> float:
    for line in metrics.decode().splitlines():
        if line.startswith('gateway_slow_consumer_disconnects_total{transport="ws"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_slow_reader_is_closed_alone_and_resumes_with_since(
    app_factory: Callable[..., Any], settings: Settings, token: Callable[..., str], encoding: str
) -> None:
    client = await app_factory(with_settings(settings, send_buffer=32))
    gateway = client.server.app[GATEWAY]
    workspace = WorkspaceKey(ORG, WORKSPACE)
    publisher = gateway.verifier.verify(token("publisher"))

    healthy = await subscribed(client, token("healthy"), encoding)
    received: list[dict[str, Any]] = []

    async def keep_reading() -> None:
        while True:
            received.append(await healthy.event(timeout=30))

    reader = asyncio.create_task(keep_reading())

    protocol = {"json": "mm-sync.v1.json", "msgpack": "mm-sync.v1.msgpack"}[encoding]
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(socket_factory=small_receive_buffer))
    try:
        slow = await session.ws_connect(client.make_url(WS), headers=auth(token("slow")),
                                        protocols=(protocol,), max_msg_size=0)
        codec = healthy.codec

        async def send(message: dict[str, Any]) -> None:
            data = codec.encode(message)
            await (slow.send_str(data.decode()) if encoding == "json" else slow.send_bytes(data))

        def decode(message: aiohttp.WSMessage) -> dict[str, Any]:
            raw = message.data.encode() if isinstance(message.data, str) else message.data
            return dict(codec.decode(raw))

        await send({"op": "subscribe", **HERE, "ref": 1})
        assert decode(await slow.receive(timeout=5))["op"] == "reply"
        # ... and from here on the slow client reads nothing.

        published = []
        for n in range(3000):  # bounded: the overflow comes long before
            envelope = await gateway.publish(publisher, workspace, "doc.chunk",
                                             {"n": n, "pad": "x" * 16_384})
            published.append(envelope.to_dict())
            await asyncio.sleep(0)
            if slow_consumer_count(gateway.metrics.render()) >= 1:
                break
        assert slow_consumer_count(gateway.metrics.render()) == 1, "the slow client was never cut"
        overflowed_after = len(published)

        # The slow client reads again: what was in flight, then the 1008 close.
        got: list[dict[str, Any]] = []
        async with asyncio.timeout(10):
            while True:
                message = await slow.receive()
                if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                    aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR):
                    break
                got.append(decode(message)["event"])
        assert slow.close_code == 1008
        assert got[0]["type"] == "sync.snapshot"
        assert got[1:] == published[: len(got) - 1]  # in order, no gap, then cut
        assert len(got) - 1 < overflowed_after

        # The healthy client is untouched: it gets every event.
        async with asyncio.timeout(10):
            while len(received) < len(published):  # noqa: ASYNC110 (filled by the reader task)
                await asyncio.sleep(0.01)
        assert received == published

        # Resume with since: exactly the rest, then live events.
        resumed = await session.ws_connect(client.make_url(WS), headers=auth(token("slow")),
                                           protocols=(protocol,), max_msg_size=0)
        slow = resumed
        await send({"op": "subscribe", **HERE, "ref": 2, "since": got[-1]["id"]})
        reply = decode(await resumed.receive(timeout=5))
        assert reply["op"] == "reply" and reply["data"]["resumed"] is True
        rest = [decode(await resumed.receive(timeout=5))["event"]
                for _ in range(len(published) - (len(got) - 1))]
        assert got[1:] + rest == published
        await resumed.close()
    finally:
        reader.cancel()
        await session.close()
    await healthy.close()
