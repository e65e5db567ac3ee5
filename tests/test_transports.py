"""``gateway.transports.Transport`` on a real loopback socket whose reader we control."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from aiohttp.base_protocol import BaseProtocol

from gateway.transports import SSE_PLAIN, Transport, http_chunk, ws_frame

CHUNK = b"x" * 16_384


class _Reader(asyncio.Protocol):
    """The client side: reads only when told to."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.received += data

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


@dataclass
class Pair:
    socket: asyncio.Transport
    protocol: BaseProtocol
    reader: _Reader

    def transport(self, limit: int = 4, grace: float = 5.0,
                  closes: list[str] | None = None) -> Transport:
        def on_close(reason: str) -> bytes | None:
            if closes is not None:
                closes.append(reason)
            return None

        return Transport(self.socket, self.protocol, SSE_PLAIN, limit, grace=grace,
                         on_close=on_close)

    async def read_all(self, until: int) -> bytes:
        assert self.reader.transport is not None
        self.reader.transport.resume_reading()
        async with asyncio.timeout(5):
            while len(self.reader.received) < until:  # noqa: ASYNC110 (filled by the protocol)
                await asyncio.sleep(0.01)
        return bytes(self.reader.received)


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[tuple[asyncio.Transport, BaseProtocol]] = loop.create_future()

    def server_side() -> BaseProtocol:
        protocol = _Accepted(loop)
        protocol.accepted = accepted
        return protocol

    server = await loop.create_server(server_side, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, reader = await loop.create_connection(_Reader, "127.0.0.1", port)
    socket, protocol = await accepted
    socket.set_write_buffer_limits(high=32_768)
    yield Pair(socket, protocol, reader)
    socket.abort()
    assert reader.transport is not None
    reader.transport.abort()
    server.close()
    await server.wait_closed()


class _Accepted(BaseProtocol):
    accepted: asyncio.Future[tuple[asyncio.Transport, BaseProtocol]]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert isinstance(transport, asyncio.Transport)
        self.accepted.set_result((transport, self))


async def _fill(pair: Pair, transport: Transport) -> int:
    """Write until the socket is behind (its client reads nothing); the bytes written."""
    written = 0
    async with asyncio.timeout(5):
        while not transport.behind:
            assert transport.send(CHUNK, 0)
            written += len(CHUNK)
            await asyncio.sleep(0)  # let the kernel take what it takes
    return written


def test_frames() -> None:
    assert ws_frame(b"hi", 0x1) == b"\x81\x02hi"
    assert ws_frame(b"x" * 200, 0x2)[:4] == b"\x82\x7e\x00\xc8"
    assert ws_frame(b"x" * 70_000, 0x1)[:10] == b"\x81\x7f" + (70_000).to_bytes(8, "big")
    assert http_chunk(b"data: 1\n\n") == b"9\r\ndata: 1\n\n\r\n"


async def test_a_transport_that_keeps_up_writes_at_once(pair: Pair) -> None:
    transport = pair.transport()
    assert transport.send(b"one", 1) and transport.send(b"two", 1)
    assert transport.queued == 0  # nothing waits: written straight to the socket
    assert await pair.read_all(6) == b"onetwo"


async def test_behind_it_queues_in_order_and_overflows_past_its_limit(pair: Pair) -> None:
    closes: list[str] = []
    transport = pair.transport(limit=4, closes=closes)
    written = await _fill(pair, transport)
    assert transport.send(b"<1>", 1) and transport.send(b"<2><3>", 2)
    assert transport.queued == 3 and closes == []
    assert transport.send(b"<4>", 1)  # at the limit
    assert transport.send(b"<5>", 1) is False  # past it: closed, what was queued is dropped
    assert closes == ["overflow"] and transport.closed == "overflow" and transport.queued == 0
    assert transport.send(b"<6>", 1) is False
    received = await pair.read_all(written)
    assert b"<" not in received[written:]


async def test_a_queue_is_written_out_once_the_client_reads(pair: Pair) -> None:
    transport = pair.transport(limit=10)
    written = await _fill(pair, transport)
    for n in range(5):
        assert transport.send(b"<%d>" % n, 1)
    received = await pair.read_all(written + 15)
    assert received[written:] == b"<0><1><2><3><4>"
    await asyncio.sleep(0.05)
    assert not transport.behind  # drained: the task that wrote the queue is gone
    assert transport.send(b"<5>", 1) and transport.queued == 0


async def test_paced_waits_for_the_client_and_never_overflows(pair: Pair) -> None:
    transport = pair.transport(limit=1)
    written = await _fill(pair, transport)
    paced = asyncio.create_task(transport.paced(b"<page>"))
    await asyncio.sleep(0.05)
    assert not paced.done() and transport.closed is None
    received = await pair.read_all(written + 6)
    assert await paced is True and received.endswith(b"<page>")


async def test_a_graceful_close_writes_the_queue_then_the_farewell(pair: Pair) -> None:
    transport = pair.transport(limit=10)
    written = await _fill(pair, transport)
    assert transport.send(b"<1>", 1)
    transport.close("timeout", b"<bye>")
    assert transport.send(b"<2>", 1) is False  # closed: nothing new
    waiting = asyncio.create_task(transport.wait_closed())
    await asyncio.sleep(0.05)
    assert not waiting.done()  # the client has not read yet
    received = await pair.read_all(written + 8)
    await asyncio.wait_for(waiting, 5)
    assert received[written:] == b"<1><bye>"


async def test_a_graceful_close_the_client_does_not_read_is_cut_after_the_grace(
    pair: Pair,
) -> None:
    transport = pair.transport(limit=10, grace=0.2)
    await _fill(pair, transport)
    transport.send(b"<1>", 1)
    transport.close("token_expired", b"<bye>")
    await asyncio.wait_for(transport.wait_closed(), 5)
    assert pair.socket.is_closing()  # cut, not left to a client that does not read
    assert pair.reader.transport is not None
    pair.reader.transport.resume_reading()
    await asyncio.wait_for(pair.reader.lost, 5)


async def test_a_graceful_close_with_nothing_queued_still_waits_for_the_socket(
    pair: Pair,
) -> None:
    """Nothing of the transport's own is queued, but the socket holds what the client has
    not read: closing waits for it to drain (the connection may serve on)."""
    transport = pair.transport(limit=10, grace=0.2)
    written = await _fill(pair, transport)
    assert transport.queued == 0
    transport.close("timeout")
    waiting = asyncio.create_task(transport.wait_closed())
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await pair.read_all(written)  # the client reads in time: drained, not cut
    await asyncio.wait_for(waiting, 5)
    assert not pair.socket.is_closing()
    # (A client that does not read is cut: test_broken_clients, a stalled stream that ends.)
