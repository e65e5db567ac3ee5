"""A connection's bytes out, SSE and WebSocket alike: encodings and one ``Transport``.

An event is encoded once per wire format (``Encoding``: the whole SSE chunk or the whole
WebSocket frame, header included) and the same bytes are written to every connection
that speaks it. A connection that keeps up gets them straight from the feed's delivery
(``Transport.send``: one ``transport.write``, no task, queue or await); one that is behind
(its socket's buffer above the high-water mark) gets a bounded queue and one task that
writes it out once the socket drains. Past ``limit`` queued frames the connection is
closed (``overflow``): a client that does not read costs the node one queue, never more.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from aiohttp.base_protocol import BaseProtocol

from protocol import sse
from protocol.codecs import JSON, MSGPACK, Codec
from protocol.envelope import Envelope
from protocol.ws import event_message

log = logging.getLogger(__name__)

OVERFLOW: Final = "overflow"
DISCONNECTED: Final = "disconnected"
# Closes that drop what is queued: the client cannot (or will not) read it.
_ABRUPT: Final = frozenset({OVERFLOW, DISCONNECTED})

TEXT: Final = 0x1
BINARY: Final = 0x2


# -- wire formats ------------------------------------------------------------------------


def ws_frame(payload: bytes, opcode: int) -> bytes:
    """One final, unmasked WebSocket frame (RFC 6455 §5.2: servers never mask), so the
    same bytes can go to every socket."""
    size = len(payload)
    if size < 126:
        head = bytes((0x80 | opcode, size))
    elif size < 65_536:
        head = bytes((0x80 | opcode, 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 127)) + size.to_bytes(8, "big")
    return head + payload


def http_chunk(data: bytes) -> bytes:
    """``data`` as one chunk of a ``Transfer-Encoding: chunked`` body."""
    return b"%x\r\n%b\r\n" % (len(data), data)


@dataclass(frozen=True, slots=True)
class Encoding:
    """How a connection's messages become bytes on its wire: ``message`` frames any
    already-encoded message (an SSE field block, a WebSocket payload); ``event`` encodes an
    envelope. ``name`` keys the per-envelope cache (``encoded``)."""

    name: str
    message: Callable[[bytes], bytes]
    event_payload: Callable[[Envelope], bytes]

    def event(self, envelope: Envelope) -> bytes:
        """``envelope`` framed, not cached (a replayed envelope may be retained by the
        backend: its encodings would stay with it); ``b""`` (nothing to send) if this
        codec cannot carry it."""
        try:
            return self.message(self.event_payload(envelope))
        except (TypeError, ValueError, OverflowError):
            log.error("event cannot be encoded; skipped",
                      extra={"event_id": envelope.id, "encoding": self.name})
            return b""

    def encoded(self, envelope: Envelope) -> bytes:
        """``event(envelope)``, computed once per envelope and encoding, whatever the
        number of subscribers."""
        cached = envelope._encoded.get(self.name)
        if cached is None:
            cached = envelope._encoded[self.name] = self.event(envelope)
        return cached


def _identity(data: bytes) -> bytes:
    return data


def _ws_encoding(codec: Codec) -> Encoding:
    opcode = BINARY if codec is MSGPACK else TEXT
    return Encoding(f"ws-{codec.name}", lambda payload: ws_frame(payload, opcode),
                    lambda envelope: codec.encode(event_message(envelope.to_dict())))


# A socket's encoding, by the name of its codec (its subprotocol).
WS_ENCODINGS: Final = {codec.name: _ws_encoding(codec) for codec in (JSON, MSGPACK)}
# SSE over HTTP/1.1 is chunked (each event its own chunk); HTTP/1.0 has no chunking.
SSE_CHUNKED: Final = Encoding("sse-chunked", http_chunk, sse.encode_envelope)
SSE_PLAIN: Final = Encoding("sse", _identity, sse.encode_envelope)


# -- one connection's bytes out ----------------------------------------------------------


class _Watched(asyncio.Protocol):
    """aiohttp's protocol for a connection, told first when the connection is lost."""

    __slots__ = ("_lost", "inner")

    def __init__(self, inner: asyncio.Protocol, lost: Callable[[], None]) -> None:
        self.inner, self._lost = inner, lost

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost()
        self.inner.connection_lost(exc)


def on_connection_lost(socket: asyncio.Transport, lost: Callable[[], None]) -> Callable[[], None]:
    """Call ``lost`` as soon as ``socket``'s connection is lost (an SSE client sends nothing
    once its request is made: a write would otherwise be the first to notice it gone, up to
    a keep-alive later). Returns what undoes it, for a connection that serves on."""
    inner = socket.get_protocol()
    assert isinstance(inner, asyncio.Protocol)
    socket.set_protocol(_Watched(inner, lost))
    return lambda: socket.set_protocol(inner)


class Transport:
    """What a subscriber writes to: a connection's socket, its encoding and its fate.

    ``send`` writes at once while the socket keeps up and queues otherwise (bounded by
    ``limit`` frames; past it the transport closes with ``overflow``). ``paced`` is for
    replays, which the client asked for and reads at its own pace: it waits until the socket
    has caught up, so a replay is never queued and never overflows. ``close`` with a
    graceful reason (timeout, drain, token expiry, ...) still writes what is queued and the
    ``farewell`` and waits for the socket to drain, for at most ``grace`` seconds, then cuts
    it; ``overflow`` and ``disconnected`` drop it. ``on_close(reason)`` is told once, at the
    close, and may return more farewell bytes. A transport made before its response's headers
    are written (``started=False``) writes nothing until ``start``.
    """

    __slots__ = (
        "_cut",
        "_finished",
        "_limit",
        "_on_close",
        "_protocol",
        "_queue",
        "_queued",
        "_socket",
        "_started",
        "_writer",
        "closed",
        "encoding",
        "grace",
    )

    def __init__(self, socket: asyncio.Transport, protocol: BaseProtocol, encoding: Encoding,
                 limit: int, *, grace: float,
                 on_close: Callable[[str], bytes | None] | None = None,
                 started: bool = True) -> None:
        self._socket = socket
        # False until the response's headers are out (``start``): a close meanwhile keeps
        # its farewell for then.
        self._started = started
        self._protocol = protocol
        self.encoding = encoding
        self._limit = limit
        self._queue: deque[bytes] | None = None  # made when first behind
        self._queued = 0  # frames in the queue (keep-alives count none)
        self._writer: asyncio.Task[None] | None = None
        self.closed: str | None = None  # why, once closed
        self._on_close = on_close
        self.grace = grace
        self._cut: asyncio.TimerHandle | None = None
        self._finished: asyncio.Future[None] | None = None

    @property
    def behind(self) -> bool:
        """Whether a write now would have to wait (queued bytes, or a full socket buffer)."""
        return bool(self._queue) or self._protocol.writing_paused

    @property
    def queued(self) -> int:
        return self._queued

    def send(self, data: bytes, frames: int = 1) -> bool:
        """Write ``data`` (``frames`` messages) now, or queue it while the socket is behind.
        False once closed (or closed by this send: overflow, or the peer is gone)."""
        if self.closed is not None:
            return False
        if not self._queue and not self._protocol.writing_paused:
            return self._write(data)
        if frames and self._queued + frames > self._limit:
            self.close(OVERFLOW)
            return False
        if self._queue is None:
            self._queue = deque()
        self._queue.append(data)
        self._queued += frames
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_behind())
        return True

    async def paced(self, data: bytes) -> bool:
        """Write ``data`` once the socket has caught up; False if the transport is closed
        meanwhile (nothing written)."""
        while self.closed is None and self.behind:
            await self._caught_up()
        if self.closed is not None:
            return False
        return self._write(data)

    def close(self, reason: str, farewell: bytes = b"") -> None:
        if self.closed is not None:
            return
        self.closed = reason
        more = self._on_close(reason) if self._on_close is not None else None
        if reason in _ABRUPT:
            self._queue = None
            self._queued = 0
            self._stop_writer()
            self._finish()
            return
        last = [data for data in (farewell, more) if data]
        if last:
            if self._queue is None:
                self._queue = deque()
            self._queue.extend(last)
        if self._started:
            self._flush()

    def start(self) -> None:
        """The headers are written: from now on bytes may follow them."""
        self._started = True
        if self.closed is not None and self.closed not in _ABRUPT:
            self._flush()

    def _flush(self) -> None:
        """After a graceful close: what is queued, then done (or cut after the grace)."""
        if self._writer is None and not self._protocol.writing_paused:
            if self._queue:
                self._write(b"".join(self._queue))
                self._queue = None
            self._finish()
            return
        # Written (and drained) when the client reads, if it does in time: the connection
        # may then serve another request; otherwise it is cut, with nothing left behind.
        self._cut = asyncio.get_running_loop().call_later(self.grace, self.abort)
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_behind())

    def abort(self) -> None:
        """Cut the connection at once (nothing more is written)."""
        self._socket.abort()
        self._stop_writer()
        if self.closed is None:
            self.close(DISCONNECTED)
        else:
            self._queue = None
            self._finish()

    async def wait_closed(self) -> None:
        """Return once closed and what was to be written is written and drained (or cut)."""
        assert self._started
        if self._finished is None:
            self._finished = asyncio.get_running_loop().create_future()
            if self.closed is not None and self._writer is None and not self._queue:
                self._finished.set_result(None)
        await asyncio.shield(self._finished)

    # -- internals ------------------------------------------------------------------------

    def _write(self, data: bytes) -> bool:
        if self._socket.is_closing():  # the peer is gone (or we cut it)
            self.close(DISCONNECTED)
            return False
        self._socket.write(data)
        return True

    def _stop_writer(self) -> None:
        # (Not from within: the writer closing the transport ends by itself, its queue gone.)
        if self._writer is not None and self._writer is not asyncio.current_task():
            self._writer.cancel()

    def _finish(self) -> None:
        if self._cut is not None:
            self._cut.cancel()
            self._cut = None
        if self._finished is not None and not self._finished.done():
            self._finished.set_result(None)

    async def _caught_up(self) -> None:
        writer = self._writer
        if writer is not None:
            await asyncio.wait([writer])
        elif self._protocol.writing_paused:
            await self._drained()

    async def _drained(self) -> None:
        # aiohttp's flow control: returns once the socket's buffer is below its low-water
        # mark; raises when the connection is lost (aiohttp's own writers await the same).
        try:
            await self._protocol._drain_helper()
        except ConnectionError:
            self.close(DISCONNECTED)

    async def _write_behind(self) -> None:
        """Write the queue out, a batch per drain, until it is empty (then this task ends:
        a connection that keeps up has none); once closed, until the socket has drained."""
        try:
            while self._queue or (self.closed is not None and self._protocol.writing_paused
                                  and not self._socket.is_closing()):
                await self._drained()
                if self._queue:
                    data = b"".join(self._queue)
                    self._queue = None
                    self._queued = 0
                    self._write(data)
        except Exception:
            log.exception("write failed; closing the connection")
            self.close(DISCONNECTED)
        finally:
            self._writer = None
            if self.closed is not None:
                self._finish()
