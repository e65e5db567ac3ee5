"""The delivery path's costs as counts (issue 8): what a user of a busy node pays for.

No timing here (benchmarks measure time: ``bench/bench_delivery.py``): each event is
encoded once per wire format whatever the number of subscribers, a batch the backend hands
over is one socket write per subscriber, and an idle connection holds no task of its own
beyond aiohttp's (one for the connection, one for its request).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from gateway.handlers.common import GATEWAY
from gateway.transports import Encoding, Transport
from protocol.envelope import Envelope, EventId, WorkspaceKey
from tests.conftest import BASE, ORG, WORKSPACE, auth
from tests.sse_client import SSEReader
from tests.wsclient import connect

STREAM = f"{BASE}/stream"
KEY = WorkspaceKey(ORG, WORKSPACE)


async def _publish(client: Any, token: Callable[..., str], n: int) -> list[str]:
    ids = []
    for i in range(n):
        response = await client.post(f"{BASE}/events", json={"type": "doc.updated",
                                                              "data": {"n": i}},
                                     headers=auth(token()))
        assert response.status == 200, await response.text()
        ids.append((await response.json())["id"])
    return ids


async def test_each_event_is_encoded_once_per_wire_format_whatever_the_subscribers(
    client: Any, token: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    encodings: Counter[tuple[str, str]] = Counter()
    event = Encoding.event

    def counting(self: Encoding, envelope: Envelope) -> bytes:
        encodings[(self.name, envelope.id)] += 1
        return event(self, envelope)

    monkeypatch.setattr(Encoding, "event", counting)
    streams = []
    for _ in range(4):
        response = await client.get(STREAM, headers=auth(token()))
        reader = SSEReader(response)
        assert (await reader.next()).event == "sync.snapshot"
        streams.append(reader)
    peers = []
    for encoding in ("json", "json", "json", "msgpack", "msgpack", "msgpack"):
        peer = await connect(client, encoding=encoding, token=token())
        answer = await peer.request("subscribe", org_id=ORG, workspace_id=WORKSPACE)
        assert answer["op"] == "reply"
        assert (await peer.event())["type"] == "sync.snapshot"
        peers.append(peer)
    encodings.clear()  # the snapshots: one per subscriber (each its own replay)

    ids = await _publish(client, token, 5)
    for reader in streams:
        assert [e.id for e in await reader.events(5)] == ids
    for peer in peers:
        assert [(await peer.event())["id"] for _ in ids] == ids
    assert encodings == {(name, event_id): 1 for event_id in ids
                         for name in ("sse-chunked", "ws-json", "ws-msgpack")}


async def test_a_batch_from_the_backend_is_one_write_per_subscriber(
    client: Any, token: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: Counter[int] = Counter()
    write = Transport._write

    def counting(self: Transport, data: bytes) -> bool:
        writes[id(self)] += 1
        return write(self, data)

    response = await client.get(STREAM, headers=auth(token()))
    reader = SSEReader(response)
    snapshot = await reader.next()
    peer = await connect(client, token=token())
    assert (await peer.request("subscribe", org_id=ORG, workspace_id=WORKSPACE))["op"] == "reply"
    assert (await peer.event())["type"] == "sync.snapshot"  # both subscribers live

    gateway = client.app[GATEWAY]
    feed = gateway.hub.existing_feed(KEY)
    assert feed is not None and feed.subscriber_count == 2
    epoch = EventId.parse(snapshot.id).epoch
    batch = [Envelope(f"{epoch}:{9_000_000_000_000 + n}-0", "doc.updated", ORG, WORKSPACE,
                      {"type": "service", "id": "svc"}, {"n": n}, "2026-12-02T00:00:00.000000Z")
             for n in range(20)]
    monkeypatch.setattr(Transport, "_write", counting)
    feed.deliver(batch)  # as the backend hands over what one read returned
    monkeypatch.undo()

    assert sorted(writes.values()) == [1, 1]
    assert [e.id for e in await reader.events(20)] == [e.id for e in batch]
    assert [(await peer.event())["id"] for _ in batch] == [e.id for e in batch]


# -- idle connections hold no task of their own ------------------------------------------


class _Raw(asyncio.Protocol):
    """A client connection without a task: it keeps what arrives."""

    def __init__(self) -> None:
        self.received = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received += data


def _client_frame(message: dict[str, Any]) -> bytes:
    """A masked WebSocket text frame (clients always mask), payload under 126 bytes."""
    payload = json.dumps(message).encode()
    assert len(payload) < 126
    mask = os.urandom(4)
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return bytes((0x81, 0x80 | len(payload))) + mask + masked


async def _open_raw(client: Any, request: bytes) -> _Raw:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(_Raw, client.server.host, client.server.port)
    assert protocol.transport is not None
    protocol.transport.write(request)
    return protocol


async def _settle(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not condition():  # noqa: ASYNC110 (the node and the sockets change on their own)
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("kind", ["sse", "ws"])
async def test_an_idle_connection_holds_no_task_but_aiohttps(
    client: Any, token: Callable[..., str], kind: str
) -> None:
    host = f"{client.server.host}:{client.server.port}"
    await _publish(client, token, 1)  # the feed exists, and has something to replay
    await asyncio.sleep(0.1)
    before = len(asyncio.all_tasks())
    count = 40
    opened = []
    for _ in range(count):
        if kind == "sse":
            request = (f"GET {STREAM} HTTP/1.1\r\nHost: {host}\r\n"
                       f"Authorization: Bearer {token()}\r\n\r\n").encode()
            opened.append(await _open_raw(client, request))
        else:
            key = base64.b64encode(os.urandom(16)).decode()
            request = (f"GET /v1/sync/ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                       f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                       "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mm-sync.v1.json\r\n"
                       f"Authorization: Bearer {token()}\r\n\r\n").encode()
            raw = await _open_raw(client, request)
            await _settle(lambda raw=raw: b"\r\n\r\n" in raw.received)
            assert raw.transport is not None
            raw.transport.write(_client_frame(
                {"op": "subscribe", "org_id": ORG, "workspace_id": WORKSPACE, "ref": 1}))
            opened.append(raw)
    # Every connection has its snapshot: subscribed, replay written, live.
    await _settle(lambda: all(b"sync.snapshot" in raw.received for raw in opened))
    feed = client.app[GATEWAY].hub.existing_feed(KEY)
    await _settle(lambda: feed is not None and feed.subscriber_count == count)
    await asyncio.sleep(0.1)
    held = len(asyncio.all_tasks()) - before
    # aiohttp's own two (the connection's and its request's), as for any aiohttp server.
    assert held <= 2 * count, f"{held} tasks for {count} idle {kind} connections"
    ids = await _publish(client, token, 1)  # and they are alive
    await _settle(lambda: all(ids[0].encode() in raw.received for raw in opened))
    for raw in opened:
        assert raw.transport is not None
        raw.transport.close()
