"""The delivery benchmark's own accounting (``bench/bench_delivery.py``): what its receivers
count from the exact bytes the floor (``bench/floor_server.py``) and the gateway
(``protocol/``) send, fed in small pieces. No sockets, no processes, no timing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest

from bench import floor_server
from bench.bench_delivery import TICK, Phase, Receiver, Worker
from protocol import sse
from protocol.codecs import JSON
from protocol.envelope import Envelope

PHASE = 7
# (index, log position) as they reach the receiver: 1 twice (a duplicate), 2 after 3 (out
# of order), then an event of another phase (stray).
ARRIVALS = [(0, (100, 0)), (1, (100, 1)), (1, (100, 1)), (3, (102, 0)), (2, (101, 0))]


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


def data(index: int, phase: int = PHASE) -> dict[str, object]:
    # Published on server `index % 2`, as the benchmark's publisher does.
    return {"i": index, "t": 1_700_000_000.25, "n": index % 2, "p": phase, "pad": "xxxx"}


def gateway_envelope(event_type: str, position: tuple[int, int], body: dict[str, object]) -> Envelope:
    return Envelope(id=f"3fa2c1d0:{position[0]}-{position[1]}", type=event_type, org_id="bench",
                    workspace_id="live", actor={"type": "service", "id": "bench-publisher"},
                    data=body, timestamp="2026-11-28T11:31:52.345000")


def floor_event(position: tuple[int, int], body: dict[str, object]) -> tuple[str, bytes]:
    fields = {b"type": TICK.encode(), b"actor": floor_server.ACTOR.encode(),
              b"data": json.dumps(body).encode()}
    return floor_server.envelope_json("live", f"{position[0]}-{position[1]}".encode(), fields)


def ws_event(body: bytes) -> bytes:
    return floor_server.ws_text_frame(b'{"op":"event","event":' + body + b"}")


def floor_ws() -> bytes:
    out = floor_server.ws_text_frame(floor_server.WS_READY)
    for index, position in ARRIVALS:
        out += ws_event(floor_event(position, data(index))[1])
    return out + ws_event(floor_event((103, 0), data(4, phase=PHASE + 1))[1])


def floor_sse() -> bytes:
    out = floor_server.http_chunk(floor_server.SSE_READY)
    for index, position in [*ARRIVALS, (4, (103, 0))]:
        event_type, body = floor_event(position, data(index, PHASE if index < 4 else PHASE + 1))
        out += floor_server.http_chunk(b"id: %b:%d-%d\nevent: %b\ndata: %b\n\n" % (
            floor_server.EPOCH.encode(), *position, event_type.encode(), body))
    return out + floor_server.http_chunk(floor_server.SSE_PING)


def gateway_ws() -> bytes:
    snapshot = gateway_envelope("sync.snapshot", (99, 0), {"members": []})
    out = floor_server.ws_text_frame(JSON.encode({"op": "event", "event": snapshot.to_dict()}))
    for index, position in [*ARRIVALS, (4, (103, 0))]:
        envelope = gateway_envelope(TICK, position, data(index, PHASE if index < 4 else PHASE + 1))
        out += floor_server.ws_text_frame(JSON.encode({"op": "event", "event": envelope.to_dict()}))
    return out


def gateway_sse() -> bytes:
    snapshot = gateway_envelope("sync.snapshot", (99, 0), {"members": []})
    out = floor_server.http_chunk(sse.retry(3000)) + floor_server.http_chunk(sse.encode_envelope(snapshot))
    # Two events in one chunk too, as the gateway writes a batch at once.
    events = [sse.encode_envelope(gateway_envelope(TICK, position, data(index)))
              for index, position in ARRIVALS]
    out += floor_server.http_chunk(events[0] + events[1]) + b"".join(
        floor_server.http_chunk(event) for event in events[2:])
    stray = gateway_envelope(TICK, (103, 0), data(4, phase=PHASE + 1))
    return out + floor_server.http_chunk(sse.encode_envelope(stray) + b": ping\n\n")


WS_HEAD = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")


@pytest.mark.parametrize("kind, head, body", [
    ("ws", WS_HEAD, floor_ws), ("sse", SSE_HEAD, floor_sse),
    ("ws", WS_HEAD, gateway_ws), ("sse", SSE_HEAD, gateway_sse),
], ids=["floor-ws", "floor-sse", "gateway-ws", "gateway-sse"])
@pytest.mark.parametrize("piece", [1, 7, 1 << 20])
async def test_receiver_counts_each_event_once_in_order(
    kind: str, head: bytes, body: Callable[[], bytes], piece: int
) -> None:
    worker = Worker()
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    receiver = Receiver(worker, kind, node=0, request=b"GET / HTTP/1.1\r\n\r\n", probe=True, ready=ready)
    receiver.connection_made(FakeTransport())
    worker.groups["live"] = [receiver]  # as Worker.open files it
    await worker.start_phase(PHASE, 5, latency=True)
    stream = head + body()
    for start in range(0, len(stream), piece):
        receiver.data_received(stream[start:start + piece])

    phase = worker.phase
    assert isinstance(phase, Phase)
    assert receiver.is_ready()
    assert (phase.delivered, phase.duplicates, phase.out_of_order) == (4, 1, 1)
    assert worker.stray == 1
    assert receiver.count == 4 and bytes(receiver.got) == b"\x01\x01\x01\x01\x00"
    # Events 1 and 3 were published on the other server (node 1): cross-node.
    assert (len(phase.cross), len(phase.same)) == (2, 2)
    assert worker.progress.is_set()  # a probe wakes the publisher


async def test_receiver_answers_pings_and_counts_a_server_close_as_dropped() -> None:
    worker = Worker()
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    receiver = Receiver(worker, "ws", 0, b"", False, ready)
    transport = FakeTransport()
    receiver.connection_made(transport)
    receiver.data_received(WS_HEAD + floor_server.ws_text_frame(floor_server.WS_READY)
                           + bytes((0x89, 2)) + b"hi" + bytes((0x88, 2)) + (1001).to_bytes(2, "big"))
    pong = transport.written[1]
    assert pong[0] == 0x8A and pong[1] == 0x80 | 2  # a masked pong with the ping's payload
    assert bytes(b ^ pong[2 + i % 4] for i, b in enumerate(pong[6:])) == b"hi"
    assert worker.dropped == 1 and transport.closed


async def test_a_refused_subscription_is_a_failure_not_a_receiver() -> None:
    worker = Worker()
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    receiver = Receiver(worker, "sse", 0, b"", False, ready)
    receiver.connection_made(FakeTransport())
    receiver.data_received(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n\r\n{}")
    with pytest.raises(ConnectionError, match="HTTP 401"):
        await ready
    assert not receiver.alive()
