"""Delivery against its floor: the gateway's WebSocket and SSE beside a minimal server and socket.io.

One invocation, one private redis-server on loopback. For each round (``--rounds``, 3) the
four modes run in turn — the floor (``bench/floor_server.py``: bare aiohttp, encode once,
write to each transport from the room's reader loop), the gateway with WebSocket
receivers, the gateway with SSE receivers, and the peer: node socket.io 4.8 over
``@socket.io/redis-streams-adapter`` (``bench/socketio_server.mjs``; its npm packages are
installed into ``--node-dir`` when missing, and the column is left out, with a note, when
node or npm is not installed) — each on two fresh server processes sharing the
redis-server (flushed between runs):

1. idle: ``--idle`` (2,000) connections opened, half on each server, to a room nobody
   publishes to: server CPU per connect + subscribe and RSS growth per connection; closed;
2. per event: ``--per-event`` (200) events as fast as allowed, to one receiver per server:
   server CPU per event (the publish, the read, 2 deliveries: the fixed part of each
   event that the per-delivery figures below include, divided by the receivers);
3. paced: ``--receivers`` (200) receivers, alternately on each server; ``--events`` (500)
   events of ~``--event-bytes`` (200) at ``--rate`` (50/s), published alternately on each
   server: server CPU per delivery, latency from just before the publish request to the
   receipt on the *other* server (cross-node);
4. saturated: ``--saturate-events`` (2,000) events with at most ``--in-flight`` (128) in
   flight (published, not yet received by the publisher's own receiver on each server):
   server CPU per delivery, deliveries/s.

Server CPU is user+sys of both server processes from ``/proc/<pid>/stat`` (10 ms ticks)
over the phase, divided by the deliveries received; the publisher's and the receivers' CPU
is theirs, reported apart. Every figure is the median of the rounds; delivered fraction,
out-of-order and duplicate counts add up over all rounds and phases. Receivers are raw
asyncio protocols (no task per connection) in ``--client-procs`` (2) processes; the
publisher (HTTP ``POST``: the gateway's ``.../sync/events`` with a service token, the
floor's and the socket.io peer's ``/rooms/{room}/events``: one ``XADD`` or append script) and
its two probe receivers in a third. A receiver process busier than 80 % of a core is reported as
client-bound. Floor receivers are half WebSocket, half SSE (``--floor-transport``).

    .venv/bin/python bench/bench_delivery.py            # a few minutes on 2 cores
    .venv/bin/python bench/bench_delivery.py --quick    # a ~1-minute smoke run

Every wait is bounded (``--timeout`` for the whole run); every process started here is
stopped here, by its own PID; everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_scale import (  # the helpers of the other benchmarks, reused as they are
    Pool,
    RedisProc,
    cpu_seconds,
    die_with_parent,
    free_port,
    masked_frame,
    next_frame,
    node_preexec,
    own_cpu,
    raise_nofile,
    rss_kib,
    run_bounded,
    scratch_redis,
    serve_pipe,
    tail,
)

SECRET = "bench-delivery-secret-" + "d" * 32
ORG = "bench"
TICK = "bench.tick"
WS_SUBPROTOCOL = "mm-sync.v1.json"
MODES = ("floor", "ws", "sse", "socketio")
TITLES = {"floor": "floor", "ws": "gateway WS", "sse": "gateway SSE", "socketio": "node socket.io"}
CLIENT_BOUND = 80.0  # % of one core: above it a receiver process may be what limits the phase

# What a receiver reads out of an event, whatever the server and the wire format: the log
# position of its id ("<epoch>:<ms>-<seq>") and the publisher's fields in its data.
ID_RE = re.compile(rb'"id":"[^":]*:(\d+)-(\d+)"')
# socket.io's: the stream entry id ("<ms>-<seq>") its connection state recovery appends to the
# packet, 42["event",<envelope>,"<ms>-<seq>"] (its envelope's own id is the app's, not an order).
OFFSET_RE = re.compile(rb',"(\d+)-(\d+)"\]$')
DATA_RE = re.compile(rb'"i":\s*(\d+),\s*"t":\s*([0-9.eE+-]+),\s*"n":\s*(\d+),\s*"p":\s*(\d+)')


def percentile(values: Iterable[float], q: float) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


# ---------------------------------------------------------------------------------------------
# receivers: run in the client processes


@dataclass
class Phase:
    """What the receivers of one process saw of one measured phase (events ``0..n-1``)."""

    id: int
    n: int
    latency: bool
    delivered: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    first: float | None = None  # time.monotonic() (CLOCK_MONOTONIC: one clock for every process)
    last: float | None = None
    cross: array[float] = field(default_factory=lambda: array("d"))  # seconds, published elsewhere
    same: array[float] = field(default_factory=lambda: array("d"))


class Receiver(asyncio.Protocol):
    """One subscriber on a raw socket: a WebSocket (JSON text frames), an SSE stream, or
    socket.io (Engine.IO v4 packets in WebSocket text frames).

    Ready at the server's first event (the gateway's ``sync.snapshot``, the floor's
    ``ready``, socket.io's CONNECT ack); from then on each ``bench.tick`` is accounted to
    its process's phase: once per event index (later copies are duplicates), out of order
    when its log position is not after the last one this receiver got.
    """

    HEAD, WS, SSE = range(3)

    def __init__(self, worker: Worker, kind: str, node: int, request: bytes, probe: bool,
                 ready: asyncio.Future[None]) -> None:
        self.worker, self.kind, self.node, self.request, self.probe = worker, kind, node, request, probe
        self.ready = ready
        self.state = self.HEAD
        self.buf = bytearray()
        self.chunked = False
        self.chunk_left = 0
        self.text = b""  # SSE: de-chunked bytes not yet split into events
        self.fragments: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.closing = False
        self.got = bytearray()  # per event index of the phase: received already
        self.count = 0  # distinct events of the phase received
        self.last = (0, 0)
        self.now = (0.0, 0.0)  # (wall, monotonic) of the bytes being parsed

    def reset(self, n: int) -> None:
        self.got, self.count, self.last = bytearray(n), 0, (0, 0)

    def is_ready(self) -> bool:
        return self.ready.done() and not self.ready.cancelled() and self.ready.exception() is None

    def alive(self) -> bool:
        return (self.is_ready() and not self.closing and self.transport is not None
                and not self.transport.is_closing())

    # -- plumbing --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses: no isinstance here)
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed before ready ({exc or 'EOF'})"))
        elif not self.closing:
            self.worker.dropped += 1

    def fail(self, why: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(why))
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            if self.state == self.WS:
                if self.kind == "socketio":  # socket.disconnect(): not a loss to recover from
                    self.transport.write(masked_frame(0x1, b"41"))
                self.transport.write(masked_frame(0x8, (1000).to_bytes(2, "big")))
            self.transport.close()

    # -- bytes in --------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.now = (time.time(), time.monotonic())
        if self.state == self.WS:
            self._ws(data)
        elif self.state == self.SSE:
            self._sse(self._dechunk(data) if self.chunked else data)
        else:
            self._head(data)

    def _head(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > 65_536:
                self.fail("response head too long")
            return
        head = bytes(self.buf[:end]).decode("latin-1").lower()
        rest = bytes(self.buf[end + 4:])
        self.buf = bytearray()
        status = head.split(" ", 2)[1] if head.count(" ") >= 1 else "?"
        expected = "200" if self.kind == "sse" else "101"
        if status != expected:
            self.fail(f"HTTP {status}")
            return
        if self.kind != "sse":
            self.state = self.WS
            self._ws(rest)
        else:
            self.state = self.SSE
            self.chunked = "transfer-encoding: chunked" in head
            self._sse(self._dechunk(rest) if self.chunked else rest)

    def _dechunk(self, data: bytes) -> bytes:
        """The body bytes of a ``Transfer-Encoding: chunked`` stream, as they arrive."""
        buf = self.buf
        buf += data
        out: list[bytes] = []
        pos, size = 0, len(buf)
        while pos < size:
            if self.chunk_left == 0:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    break
                line = bytes(buf[pos:end])
                pos = end + 2
                if not line:  # the CRLF closing a chunk's data
                    continue
                self.chunk_left = int(line.split(b";")[0], 16)
                if self.chunk_left == 0:  # the last chunk: the stream ended
                    break
            take = min(self.chunk_left, size - pos)
            out.append(bytes(buf[pos:pos + take]))
            pos += take
            self.chunk_left -= take
        del buf[:pos]
        return b"".join(out)

    def _sse(self, data: bytes) -> None:
        if not data:
            return
        events = (self.text + data).split(b"\n\n")
        self.text = events.pop()
        for event in events:
            if b"event: " + TICK.encode() in event:
                self.worker.tick(self, event)
            elif not self.ready.done() and (b"event: sync.snapshot" in event
                                            or b"event: ready" in event):
                self.ready.set_result(None)

    def _ws(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        while (frame := next_frame(buf, pos)) is not None:
            fin, opcode, _, payload, pos = frame
            self._frame(fin, opcode, payload)
            if self.closing:
                break
        del buf[:pos]

    def _frame(self, fin: int, opcode: int, payload: bytes) -> None:
        if opcode == 0x9:  # ping -> pong (the servers' keep-alive)
            assert self.transport is not None
            self.transport.write(masked_frame(0xA, payload))
        elif opcode == 0x8:
            if not self.ready.done():
                self.fail(f"ws close {int.from_bytes(payload[:2], 'big') if payload else 1005}")
            elif not self.closing:
                self.worker.dropped += 1
                self.close()
        elif opcode in (0x0, 0x1, 0x2):
            if not fin:
                self.fragments.append(payload)
                return
            if self.fragments:
                payload = b"".join([*self.fragments, payload])
                self.fragments = []
            if self.kind == "socketio":
                self._engineio(payload)
            elif b'"' + TICK.encode() + b'"' in payload:
                self.worker.tick(self, payload)
            elif not self.ready.done() and (b'"type":"sync.snapshot"' in payload
                                            or payload == b'{"op":"ready"}'):
                self.ready.set_result(None)

    # -- socket.io: Engine.IO v4 over the WebSocket, one packet a text frame -----------------

    def _engineio(self, packet: bytes) -> None:
        handler = self.ENGINEIO.get(packet[:2]) or self.ENGINEIO.get(packet[:1])
        if handler is not None:  # others (pong, noop, acks) mean nothing here
            handler(self, packet)

    def _eio_open(self, packet: bytes) -> None:  # 0{"sid",...}: connect to the main namespace
        assert self.transport is not None
        self.transport.write(masked_frame(0x1, b"40"))

    def _eio_ping(self, packet: bytes) -> None:  # 2 -> 3: the server's keep-alive
        assert self.transport is not None
        self.transport.write(masked_frame(0x1, b"3" + packet[1:]))

    def _sio_connected(self, packet: bytes) -> None:  # 40{"sid",...}: in the room already
        if not self.ready.done():
            self.ready.set_result(None)

    def _sio_event(self, packet: bytes) -> None:  # 42["event",<envelope>,"<ms>-<seq>"]
        if b'"' + TICK.encode() + b'"' in packet:
            self.worker.tick(self, packet)

    def _sio_refused(self, packet: bytes) -> None:  # 44{"message"}: connect_error
        self.fail(f"socket.io connect_error {packet[2:82].decode(errors='replace')}")

    def _sio_closed(self, packet: bytes) -> None:  # 41 (namespace) or 1 (Engine.IO): let go
        if not self.ready.done():
            self.fail(f"socket.io closed before ready ({packet[:2].decode(errors='replace')})")
        elif not self.closing:
            self.worker.dropped += 1
            self.close()

    ENGINEIO: dict[bytes, Callable[[Receiver, bytes], None]] = {
        b"0": _eio_open, b"1": _sio_closed, b"2": _eio_ping, b"40": _sio_connected,
        b"41": _sio_closed, b"42": _sio_event, b"44": _sio_refused,
    }


# ---------------------------------------------------------------------------------------------
# a client process: holds receivers in named groups; process 0 also publishes


class Worker:
    def __init__(self) -> None:
        self.groups: dict[str, list[Receiver]] = {}
        self.phase: Phase | None = None
        self.progress = asyncio.Event()  # set when a probe receives an event
        self.dropped = 0  # ready receivers the server closed
        self.stray = 0  # events of no current phase, or not readable
        self.commands: dict[str, Callable[..., Awaitable[Any]]] = {
            "open": self.open, "close": self.close, "phase": self.start_phase,
            "status": self.status, "latencies": self.latencies, "publish": self.publish,
        }

    def tick(self, receiver: Receiver, payload: bytes) -> None:
        phase = self.phase
        position = (OFFSET_RE if receiver.kind == "socketio" else ID_RE).search(payload)
        data = DATA_RE.search(payload)
        if phase is None or position is None or data is None or int(data[4]) != phase.id:
            self.stray += 1
            return
        index = int(data[1])
        if index >= len(receiver.got):
            self.stray += 1
            return
        if receiver.got[index]:
            phase.duplicates += 1
            return
        receiver.got[index] = 1
        receiver.count += 1
        phase.delivered += 1
        key = (int(position[1]), int(position[2]))
        if key <= receiver.last:
            phase.out_of_order += 1
        else:
            receiver.last = key
        wall, mono = receiver.now
        if phase.first is None:
            phase.first = mono
        phase.last = mono
        if phase.latency:
            (phase.same if int(data[3]) == receiver.node else phase.cross).append(wall - float(data[2]))
        if receiver.probe:
            self.progress.set()

    # -- commands --------------------------------------------------------------------------

    async def open(self, group: str, specs: list[tuple[int, int, str, bytes, bool]],
                   lanes: int, each_timeout: float, budget: float) -> dict[str, Any]:
        """Open ``specs`` (port, node, kind, request, probe), ``lanes`` at a time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        receivers = self.groups.setdefault(group, [])
        failures: Counter[str] = Counter()
        todo = iter(specs)
        started, cpu = time.monotonic(), own_cpu()

        async def one(port: int, node: int, kind: str, request: bytes, probe: bool) -> None:
            ready: asyncio.Future[None] = loop.create_future()
            receiver = Receiver(self, kind, node, request, probe, ready)
            receivers.append(receiver)
            try:
                async with asyncio.timeout(max(0.1, min(each_timeout, deadline - loop.time()))):
                    await loop.create_connection(lambda: receiver, "127.0.0.1", port)
                    await ready
            except (OSError, TimeoutError) as exc:
                failures[str(exc)[:80] or type(exc).__name__] += 1
                receiver.fail("gave up")

        async def lane() -> None:
            for spec in todo:
                if loop.time() < deadline:
                    await one(*spec)
                else:
                    failures["not attempted: open budget spent"] += 1

        await asyncio.gather(*(lane() for _ in range(max(1, lanes))))
        return {"ok": sum(1 for r in receivers if r.is_ready()), "failures": dict(failures),
                "seconds": time.monotonic() - started, "cpu": own_cpu() - cpu}

    async def close(self, group: str, budget: float) -> dict[str, Any]:
        receivers = self.groups.pop(group, [])
        for receiver in receivers:
            receiver.close()
        for _ in range(max(1, int(budget / 0.05))):
            if all(r.transport is None or r.transport.is_closing() for r in receivers):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)  # the loop runs the close callbacks
        for receiver in receivers:
            if receiver.transport is not None and not receiver.transport.is_closing():
                receiver.transport.abort()
        return {}

    async def start_phase(self, phase_id: int, n: int, latency: bool) -> dict[str, Any]:
        self.phase = Phase(phase_id, n, latency)
        for receivers in self.groups.values():
            for receiver in receivers:
                receiver.reset(n)
        return {}

    async def status(self, group: str) -> dict[str, Any]:
        p = self.phase
        return {"alive": sum(1 for r in self.groups.get(group, []) if r.alive()),
                "delivered": p.delivered if p else 0, "duplicates": p.duplicates if p else 0,
                "out_of_order": p.out_of_order if p else 0, "first": p.first if p else None,
                "last": p.last if p else None, "dropped": self.dropped, "stray": self.stray,
                "cpu": own_cpu()}

    async def latencies(self) -> dict[str, Any]:
        p = self.phase
        return {"cross": p.cross.tobytes() if p else b"", "same": p.same.tobytes() if p else b""}

    async def publish(self, targets: list[tuple[Any, ...]], room_group: str, count: int,
                      rate: float, window: int, phase_id: int, event_bytes: int,
                      budget: float) -> dict[str, Any]:
        """Publish events ``0..count-1`` of the phase: at ``rate`` per second (0: as fast as the
        window allows), never more than ``window`` in flight (published and not yet received
        by every probe of ``room_group``). With HTTP targets (one per server) event ``k`` goes
        to server ``k % 2``; with an XADD target, to Redis (its data says server 2: none)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        probes = [r for r in self.groups.get(room_group, []) if r.probe and r.alive()]
        sample = {"i": count, "t": time.time(), "n": 0, "p": phase_id, "pad": ""}
        pad = "x" * max(0, event_bytes - len(json.dumps(sample, separators=(",", ":"))))
        failed = 0
        failures: Counter[str] = Counter()
        tasks: set[asyncio.Task[None]] = set()
        cpu = own_cpu()
        sender = http_sender if targets[0][0] == "http" else xadd_sender
        async with sender(targets) as send:

            async def one(k: int) -> None:
                nonlocal failed
                node = k % len(targets) if targets[0][0] == "http" else 2
                data = {"i": k, "t": time.time(), "n": node, "p": phase_id, "pad": pad}
                failure = await send(k, data)
                if failure is not None:
                    failed += 1
                    failures[failure] += 1

            started = time.monotonic()
            sent = 0
            for k in range(count):
                if rate:
                    await asyncio.sleep(max(0.0, started + k / rate - time.monotonic()))
                while (probes and k - failed - min(p.count for p in probes) >= window
                       and loop.time() < deadline):
                    self.progress.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.progress.wait(), 0.5)
                if loop.time() >= deadline:
                    failures["not sent: publish budget spent"] += count - k
                    break
                task = asyncio.create_task(one(k))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                sent += 1
            if tasks:
                await asyncio.wait(set(tasks), timeout=max(1.0, deadline - loop.time()))
            unfinished = len(tasks)
            for task in list(tasks):
                task.cancel()
                failures["publish cancelled at the budget"] += 1
        return {"sent": sent, "ok": sent - failed - unfinished, "failures": dict(failures),
                "first_send": started, "seconds": time.monotonic() - started,
                "cpu": own_cpu() - cpu}

    # -- the pipe --------------------------------------------------------------------------

    async def serve(self, conn: Connection) -> None:
        await serve_pipe(conn, lambda command, args: self.commands[command](*args),
                         self.close_everything)

    async def close_everything(self) -> None:
        for group in list(self.groups):
            await self.close(group, 2.0)


Send = Callable[[int, dict[str, Any]], Awaitable[str | None]]  # event k, data -> failure or None


@contextlib.asynccontextmanager
async def http_sender(targets: list[tuple[Any, ...]]) -> AsyncIterator[Send]:
    """``POST {"type", "data"}`` to ``targets[k % len(targets)]`` (``("http", url, headers)``)."""
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def send(k: int, data: dict[str, Any]) -> str | None:
            _, url, headers = targets[k % len(targets)]
            try:
                async with session.post(url, json={"type": TICK, "data": data},
                                        headers=headers) as response:
                    await response.read()
                    return None if response.status == 200 else f"HTTP {response.status}"
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                return type(exc).__name__

        yield send


@contextlib.asynccontextmanager
async def xadd_sender(targets: list[tuple[Any, ...]]) -> AsyncIterator[Send]:
    """``MULTI; XADD <key> * type actor data; SPUBLISH <channel> ""; EXEC`` — a backend
    service appending as docs/redis.md shows (``("xadd", redis_url, key, channel)``)."""
    from redis.asyncio import BlockingConnectionPool, Redis
    from redis.exceptions import RedisError

    _, url, key, channel = targets[0]
    actor = json.dumps({"type": "service", "id": "bench-publisher"}, separators=(",", ":"))
    client = Redis(connection_pool=BlockingConnectionPool.from_url(url, max_connections=16,
                                                                   timeout=30))
    try:

        async def send(k: int, data: dict[str, Any]) -> str | None:
            fields = {"type": TICK, "actor": actor, "data": json.dumps(data, separators=(",", ":"))}
            try:
                async with client.pipeline(transaction=True) as pipe:
                    pipe.xadd(key, fields)  # type: ignore[arg-type]
                    pipe.execute_command("SPUBLISH", channel, "")
                    await pipe.execute()
            except (RedisError, OSError) as exc:
                return type(exc).__name__
            return None

        yield send
    finally:
        await client.aclose()


def worker_main(conn: Connection, nofile: int) -> None:
    die_with_parent()
    raise_nofile(nofile)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; it says "exit"
    # The stdlib loop, uvloop or not: the clients are the instrument, not what is measured
    # (their CPU is reported, and flagged when near a core). Under uvloop a client process
    # died mid-run (its pipe reset) in this benchmark, not in isolation: not chased.
    asyncio.run(Worker().serve(conn))


class Workers(Pool):
    """Process 0 publishes (and holds the probes), 1..N hold receivers."""

    def __init__(self, procs: int, nofile: int) -> None:
        super().__init__(procs, worker_main, nofile)

    async def open(self, group: str, shares: dict[int, list[Any]], concurrency: int,
                   each_timeout: float, budget: float) -> dict[str, Any]:
        lanes = max(1, concurrency // max(1, len(shares)))
        answers = await self.ask(
            {i: ("open", group, share, lanes, each_timeout, budget) for i, share in shares.items()},
            budget + each_timeout + 30)
        failures: Counter[str] = Counter()
        for answer in answers.values():
            if "error" in answer:
                raise RuntimeError(f"a client process failed:\n{answer['error']}")
            failures.update(answer["failures"])
        return {"ok": sum(a["ok"] for a in answers.values()), "failures": failures,
                "seconds": max(a["seconds"] for a in answers.values())}

    async def close(self, group: str, budget: float = 10.0) -> None:
        await self.all("close", group, budget, timeout=budget + 15)

    async def status(self, group: str, indexes: Iterable[int] | None = None) -> dict[str, Any]:
        chosen = list(range(len(self.pipes)) if indexes is None else indexes)
        answers = await self.ask(dict.fromkeys(chosen, ("status", group)), 30)
        total: dict[str, Any] = {key: sum(a[key] for a in answers.values()) for key in
                                 ("alive", "delivered", "duplicates", "out_of_order", "dropped", "stray")}
        firsts = [a["first"] for a in answers.values() if a["first"] is not None]
        lasts = [a["last"] for a in answers.values() if a["last"] is not None]
        total["first"] = min(firsts) if firsts else None
        total["last"] = max(lasts) if lasts else None
        total["cpu"] = {i: a["cpu"] for i, a in answers.items()}
        return total


# ---------------------------------------------------------------------------------------------
# the servers under test


class Server:
    """One server process: ``bench/floor_server.py``, ``python -m gateway serve`` or
    ``node bench/socketio_server.mjs``."""

    def __init__(self, mode: str, index: int, redis_url: str, directory: Path,
                 args: argparse.Namespace) -> None:
        self.mode, self.index = mode, index
        self.port = free_port()
        self.log_path = directory / f"{mode}-{index}.log"
        common = ["--port", str(self.port), "--redis-url", redis_url]
        if mode == "floor":
            self.argv = [sys.executable, str(ROOT / "bench" / "floor_server.py"), *common,
                         "--node-id", f"floor-{index}", "--host", "127.0.0.1"]
            self.cwd = ROOT
        elif mode == "socketio":
            self.argv = [shutil.which("node") or "node", str(ROOT / "bench" / "socketio_server.mjs"),
                         *common, "--node-id", f"sio-{index}", "--host", "127.0.0.1",
                         "--modules", str(args.node_dir)]
            self.cwd = ROOT
        else:
            self.argv = [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", *common,
                         "--node-id", f"bench-{index}", "--jwt-secret", SECRET, "--log-format", "text",
                         "--log-level", "WARNING", *args.gateway_arg]
            self.cwd = args.gateway_root
        self.proc: subprocess.Popen[bytes] | None = None
        self.loop = "?"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("GATEWAY_", "NODE_")) and k != "DEBUG"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=env, stdout=log, stderr=log,
                                         preexec_fn=node_preexec)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        import aiohttp

        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.proc is None or self.proc.poll() is not None:
                    raise RuntimeError(f"{self.mode} server exited:\n{tail(self.log_path)}")
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    async with session.get(f"{self.url}/readyz",
                                           timeout=aiohttp.ClientTimeout(total=2)) as response:
                        if response.status == 200:
                            if self.mode == "floor":
                                self.loop = (await response.json()).get("loop", "?")
                            elif self.mode == "socketio":  # what ran, for the table's header
                                versions = (await response.json()).get("versions", {})
                                self.loop = ", ".join(f"{k} {v}" for k, v in versions.items())
                            return
                await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.mode} server not ready in {timeout:.0f}s:\n{tail(self.log_path)}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # by its own PID; the measurements are taken
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)

    def problems(self) -> list[str]:
        """A few WARNING/ERROR lines or tracebacks of its log (the node server logs nothing
        but problems: any of its lines)."""
        lines: list[str] = []
        with contextlib.suppress(OSError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                if (" WARNING " in line or " ERROR " in line or line.startswith("Traceback")
                        or (self.mode == "socketio" and line.strip())) and len(lines) < 5:
                    lines.append(line[:200])
        return lines


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, sys) seconds of a process, from ``/proc/<pid>/stat``; zeros once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def server_cpu(servers: list[Server]) -> float:
    return sum(cpu_seconds(s.pid) or 0.0 for s in servers)


def server_sys(servers: list[Server]) -> float:
    return sum(cpu_split(s.pid)[1] for s in servers)


async def quiet(servers: list[Server], budget: float = 10.0) -> None:
    """Wait (at most ``budget``) until the servers use under 10 % of a core for half a second."""
    deadline = time.monotonic() + budget
    while time.monotonic() < deadline:
        before = server_cpu(servers)
        await asyncio.sleep(0.5)
        if server_cpu(servers) - before < 0.05:
            return


class Profiler:
    """``--profile DIR``: py-spy records each server through the delivery phases (raw stacks,
    ``DIR/<mode>-r<round>-<server>.txt``). It takes CPU from the same cores: figures of a
    profiled run are not comparable with an unprofiled one."""

    def __init__(self, directory: Path | None) -> None:
        self.dir = directory
        self.exe = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
        if directory is not None:
            if self.exe is None:
                raise SystemExit("--profile needs py-spy (.venv/bin/pip install py-spy)")
            directory.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, servers: list[Server], label: str) -> None:
        if self.dir is None or self.exe is None:
            return
        for server in servers:
            if server.mode == "socketio":  # py-spy reads Python stacks only
                continue
            out = self.dir / f"{label}-{server.index}.txt"
            self.procs.append(subprocess.Popen(
                [self.exe, "record", "-p", str(server.pid), "-f", "raw", "-o", str(out), "-r", "100",
                 "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                preexec_fn=die_with_parent))

    def stop(self) -> None:
        for proc in self.procs:  # SIGINT: py-spy writes its file and exits
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()  # by its own PID
                proc.wait(5)
        self.procs = []

    def summary(self, mode: str, top: int = 12) -> list[str]:
        """The functions where ``mode``'s servers spent their busy samples: by self time,
        then by inclusive time (each function once per stack)."""
        if self.dir is None:
            return []
        own: Counter[str] = Counter()
        inclusive: Counter[str] = Counter()
        total = 0
        for path in sorted(self.dir.glob(f"{mode}-r*-*.txt")):
            for line in path.read_text(errors="replace").splitlines():
                stack, _, count = line.rpartition(" ")
                if not stack or not count.isdigit():
                    continue
                n = int(count)
                frames = [_frame_name(f) for f in stack.split(";")]
                total += n
                own[frames[-1]] += n
                for name in set(frames):
                    inclusive[name] += n
        if not total:
            return []
        lines = [f"{TITLES[mode]}: {total} busy samples; self time:"]
        lines += [f"  {100 * n / total:5.1f} %  {name}" for name, n in own.most_common(top)]
        lines.append(f"{TITLES[mode]}: inclusive time:")
        lines += [f"  {100 * n / total:5.1f} %  {name}" for name, n in inclusive.most_common()
                  if name.split(" (")[0].rsplit(".", 1)[-1] not in _FRAME_ROOTS][:top]
        return lines


# The event loop and the interpreter's start: in every stack, so not news.
_FRAME_ROOTS = frozenset({"<module>", "run_app", "run_forever", "_run_once", "_run", "run", "main",
                          "run_until_complete", "_bootstrap", "_run_module_as_main", "_run_code",
                          "run_path", "serve", "cli"})


def _frame_name(frame: str) -> str:
    """``func (path/to/module.py:123)`` -> ``func (to/module.py)``."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({'/'.join(path.split('/')[-2:])})" if path else name


# ---------------------------------------------------------------------------------------------
# what one mode speaks


@dataclass(frozen=True)
class Dialect:
    """Paths and credentials of the floor or the gateway."""

    mode: str
    floor_transport: str

    def kind(self, receiver: int) -> str:
        """The wire format of receiver ``receiver`` (receivers alternate servers one by one)."""
        if self.mode != "floor":
            return self.mode
        if self.floor_transport != "mixed":
            return self.floor_transport
        return ("ws", "sse")[(receiver // 2) % 2]

    def request(self, kind: str, port: int, room: str, user: str) -> bytes:
        lines: list[str] = []
        if self.mode == "floor":
            path = f"/rooms/{room}/{kind}"
        elif self.mode == "socketio":  # the room is the handshake's query (socket.io's `query`)
            path = f"/socket.io/?EIO=4&transport=websocket&room={room}"
        else:
            path = f"/v1/orgs/{ORG}/workspaces/{room}/sync/{'ws' if kind == 'ws' else 'stream'}"
            lines = [f"Authorization: Bearer {token(user)}"]
        lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", *lines]
        if kind != "sse":
            key = base64.b64encode(os.urandom(16)).decode()
            lines += ["Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
                      "Sec-WebSocket-Version: 13"]
            if self.mode == "ws":
                lines.append(f"Sec-WebSocket-Protocol: {WS_SUBPROTOCOL}")
        else:
            lines += ["Accept: text/event-stream", "Cache-Control: no-cache"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def targets(self, servers: list[Server], room: str, publish: str,
                redis_url: str) -> list[tuple[Any, ...]]:
        """Where the publisher sends: each server's HTTP publish, or Redis itself."""
        if publish == "xadd":  # the stream and channel each server follows (docs/redis.md)
            prefix = f"floor:{{{ORG}:{room}}}" if self.mode == "floor" else f"gw:{{{ORG}:{room}}}"
            return [("xadd", redis_url, f"{prefix}:log", f"{prefix}:notify")]
        if self.mode in ("floor", "socketio"):
            return [("http", f"{s.url}/rooms/{room}/events", {}) for s in servers]
        headers = {"Authorization": f"Bearer {token('bench-publisher', publisher=True)}"}
        return [("http", f"{s.url}/v1/orgs/{ORG}/workspaces/{room}/sync/events", headers)
                for s in servers]


_TOKENS: dict[tuple[str, bool], str] = {}


def token(user: str, publisher: bool = False) -> str:
    if (user, publisher) not in _TOKENS:
        from gateway.auth import mint_token  # of the gateway under test (--gateway-root)

        if publisher:
            minted = mint_token(SECRET, sub=user, org_id=ORG, workspaces="*", ttl=3 * 3600,
                                permissions=["events:publish"], extra={"kind": "service"})
        else:
            minted = mint_token(SECRET, sub=user, org_id=ORG, workspaces="*", ttl=3 * 3600)
        _TOKENS[user, publisher] = minted
    return _TOKENS[user, publisher]


# ---------------------------------------------------------------------------------------------
# one run: one mode on two fresh servers


@dataclass
class PhaseResult:
    published: int = 0
    expected: int = 0
    delivered: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    server_cpu: float = 0.0
    server_sys: float = 0.0  # of which in the kernel
    redis_cpu: float = 0.0
    seconds: float | None = None  # first publish to last delivery
    receiver_cpu: float = 0.0  # % of a core, the busiest receiver process
    publisher_cpu: float = 0.0  # % of a core
    cross: list[float] = field(default_factory=list)  # ms

    @property
    def us_per_delivery(self) -> float | None:
        return 1e6 * self.server_cpu / self.delivered if self.delivered else None

    @property
    def sys_share(self) -> float | None:
        return 100 * self.server_sys / self.server_cpu if self.server_cpu else None

    @property
    def rate(self) -> float | None:
        return self.delivered / self.seconds if self.seconds else None


@dataclass
class Run:
    mode: str
    round: int
    idle_opened: int = 0
    connect_us: float | None = None
    kib_per_conn: float | None = None
    per_event_us: float | None = None
    paced: PhaseResult | None = None
    saturated: PhaseResult | None = None
    errors: Counter[str] = field(default_factory=Counter)
    loop: str = ""


class Bench:
    def __init__(self, args: argparse.Namespace, workers: Workers, redis: RedisProc, tmp: Path) -> None:
        self.args, self.workers, self.redis, self.tmp = args, workers, redis, tmp
        self.phase_ids = iter(range(1, 1_000_000))
        self.profiler = Profiler(args.profile)
        self.receiver_procs = list(range(1, len(workers.pipes)))

    async def run(self, run: Run) -> None:
        """Measure ``run.mode`` into ``run`` (what was measured stays there if interrupted)."""
        args, mode, rnd = self.args, run.mode, run.round
        dialect = Dialect(mode, args.floor_transport)
        directory = Path(tempfile.mkdtemp(prefix=f"{mode}-{rnd}-", dir=self.tmp))
        servers = [Server(mode, i, self.redis.url, directory, args) for i in (0, 1)]
        started = time.monotonic()
        try:
            for server in servers:
                server.start()
            await asyncio.gather(*(server.wait_ready() for server in servers))
            run.loop = servers[0].loop
            await self.warm_up(run, dialect, servers)
            await self.idle(run, dialect, servers)
            await self.deliveries(run, dialect, servers)
        except Exception as exc:  # recorded; the other runs still happen
            run.errors[f"run aborted: {type(exc).__name__}: {str(exc)[:300]}"] += 1
            with contextlib.suppress(Exception):
                for group in ("warm", "idle", "live"):
                    await self.workers.close(group)
        finally:
            for server in servers:
                server.stop()
                for line in server.problems():
                    run.errors[f"{mode} server {server.index} log: {line}"] += 1
            with contextlib.suppress(Exception), self.redis_client() as client:
                client.flushall()  # the next run starts from an empty Redis
        print(f"  round {rnd} {TITLES[mode]:<12} done in {time.monotonic() - started:.0f}s"
              + (f"  ({sum(run.errors.values())} problems)" if run.errors else ""), flush=True)

    def redis_client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.redis.port, socket_timeout=10)

    def spread(self, dialect: Dialect, servers: list[Server], room: str, count: int, user: str,
               first_receiver: int = 0) -> dict[int, list[Any]]:
        """Receivers ``first_receiver..count-1`` of ``room`` over the receiver processes:
        receiver ``r`` on server ``r % 2``, each process getting both servers alike."""
        shares: dict[int, list[Any]] = {i: [] for i in self.receiver_procs}
        procs = len(self.receiver_procs)
        for r in range(first_receiver, count):
            node = r % 2
            kind = dialect.kind(r)
            proc = self.receiver_procs[(r // 2) % procs]
            shares[proc].append((servers[node].port, node, kind,
                                 dialect.request(kind, servers[node].port, room, f"{user}{r}"), False))
        return {i: share for i, share in shares.items() if share}

    async def open(self, run: Run, group: str, shares: dict[int, list[Any]]) -> int:
        args = self.args
        n = sum(len(share) for share in shares.values())
        opened = await self.workers.open(group, shares, args.connect_concurrency, args.each_timeout,
                                         30 + n * 0.02)
        for why, count in opened["failures"].items():
            run.errors[f"open {group}: {why}"] += count
        return int(opened["ok"])

    async def warm_up(self, run: Run, dialect: Dialect, servers: list[Server]) -> None:
        """One probe receiver per server (in the publisher's process); a first round of
        events (lazy imports, first feeds), then the measured per-event cost."""
        probes = {0: [(s.port, s.index, dialect.kind(2 * s.index),
                       dialect.request(dialect.kind(2 * s.index), s.port, "warm", f"probe{s.index}"),
                       True) for s in servers]}
        if await self.open(run, "warm", probes) != 2:
            raise RuntimeError("warm-up receivers did not open")
        await self.phase(run, dialect, servers, "warm", 2, 50, rate=0, window=16)
        await quiet(servers, 5)
        n = self.args.per_event
        cpu = server_cpu(servers)
        result = await self.phase(run, dialect, servers, "warm", 2, n, rate=0, window=16)
        if result.published:
            run.per_event_us = 1e6 * (server_cpu(servers) - cpu) / result.published
        await self.workers.close("warm")

    async def idle(self, run: Run, dialect: Dialect, servers: list[Server]) -> None:
        await quiet(servers)
        rss = [rss_kib(s.pid) or 0 for s in servers]
        cpu = server_cpu(servers)
        run.idle_opened = await self.open(run, "idle", self.spread(
            dialect, servers, "idle", self.args.idle, "idle"))
        cpu = server_cpu(servers) - cpu
        await asyncio.sleep(1.0)  # let the servers finish what the opens started
        grown = sum((rss_kib(s.pid) or 0) - before for s, before in zip(servers, rss, strict=True))
        if run.idle_opened:
            run.connect_us = 1e6 * cpu / run.idle_opened
            run.kib_per_conn = grown / run.idle_opened
        print(f"  round {run.round} {TITLES[run.mode]:<12} idle: {run.idle_opened}/{self.args.idle} "
              f"open, {fmt(run.connect_us, '.0f')} µs CPU each, {fmt(run.kib_per_conn, '.1f')} "
              f"KiB each", flush=True)
        await self.workers.close("idle")
        await quiet(servers)

    async def deliveries(self, run: Run, dialect: Dialect, servers: list[Server]) -> None:
        args = self.args
        probes = {0: [(s.port, s.index, dialect.kind(s.index),
                       dialect.request(dialect.kind(s.index), s.port, "live", f"live{s.index}"), True)
                      for s in servers]}
        shares = {**probes, **self.spread(dialect, servers, "live", args.receivers, "live", 2)}
        receivers = await self.open(run, "live", shares)
        if receivers < args.receivers:
            run.errors["live receivers not opened"] += args.receivers - receivers
        await quiet(servers)
        self.profiler.start(servers, f"{run.mode}-r{run.round}")
        try:
            run.paced = await self.phase(run, dialect, servers, "live", receivers, args.events,
                                         rate=args.rate, window=args.in_flight, latency=True)
            await quiet(servers)
            run.saturated = await self.phase(run, dialect, servers, "live", receivers,
                                             args.saturate_events, rate=0, window=args.in_flight)
        finally:
            self.profiler.stop()
        for name, p in (("paced", run.paced), ("saturated", run.saturated)):
            print(f"  round {run.round} {TITLES[run.mode]:<12} {name}: {p.delivered}/{p.expected} "
                  f"delivered ({p.out_of_order} out of order), {fmt(p.us_per_delivery, '.2f')} µs CPU each, "
                  f"{fmt(p.rate, ',.0f')}/s, receivers' busiest process {p.receiver_cpu:.0f} %, "
                  f"publisher {p.publisher_cpu:.0f} %", flush=True)
        await self.workers.close("live")

    async def phase(self, run: Run, dialect: Dialect, servers: list[Server], group: str,
                    receivers: int, count: int, *, rate: float, window: int,
                    latency: bool = False) -> PhaseResult:
        """Publish ``count`` events to ``group``'s room; wait (bounded) until each of its
        ``receivers`` has them all; measure."""
        args = self.args
        room = {"warm": "warm", "live": "live"}[group]
        phase_id = next(self.phase_ids)
        result = PhaseResult()
        await self.workers.all("phase", phase_id, count, latency)
        before = await self.workers.status(group)
        cpu0, sys0 = server_cpu(servers), server_sys(servers)
        redis0, t0 = cpu_seconds(self.redis.pid) or 0.0, time.monotonic()
        budget = 30 + (count / rate if rate else count * 0.05)
        published = (await self.workers.ask(
            {0: ("publish", dialect.targets(servers, room, args.publish, self.redis.url), group,
                 count, rate, window, phase_id, args.event_bytes, budget)}, budget + 60))[0]
        for why, n in published["failures"].items():
            run.errors[f"publish: {why}"] += n
        result.published = published["ok"]
        result.expected = receivers * result.published
        deadline = time.monotonic() + args.deliver_timeout
        while True:
            state = await self.workers.status(group)
            if state["delivered"] >= result.expected or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
        elapsed = time.monotonic() - t0
        result.server_cpu = server_cpu(servers) - cpu0
        result.server_sys = server_sys(servers) - sys0
        result.redis_cpu = (cpu_seconds(self.redis.pid) or 0.0) - redis0
        for key in ("delivered", "duplicates", "out_of_order"):
            setattr(result, key, state[key])
        if state["last"] is not None:
            result.seconds = state["last"] - published["first_send"]
        busy = {i: 100 * (state["cpu"][i] - before["cpu"][i]) / elapsed for i in state["cpu"]}
        result.publisher_cpu = busy.pop(0)
        result.receiver_cpu = max(busy.values(), default=0.0)
        for key, what in (("dropped", "receivers closed by the server"),
                          ("stray", "events of no phase or unreadable")):
            if state[key] > before[key]:
                run.errors[what] += state[key] - before[key]
        if result.delivered < result.expected:
            run.errors[f"{group}: not delivered within --deliver-timeout"] += \
                result.expected - result.delivered
        if latency:
            for answer in await self.workers.all("latencies"):
                samples = array("d")
                samples.frombytes(answer["cross"])
                result.cross.extend(1000 * s for s in samples)
        return result


# ---------------------------------------------------------------------------------------------
# the report


def fmt(value: float | None, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def ratio(value: float | None, floor: float | None) -> str:
    return "-" if value is None or not floor else f"{value / floor:.2f}x"


@dataclass
class Column:
    """The medians (and totals) of one mode's runs."""

    runs: list[Run]

    def med(self, pick: Callable[[Run], float | None]) -> float | None:
        return median(pick(run) for run in self.runs)

    def phases(self) -> list[PhaseResult]:
        return [p for run in self.runs for p in (run.paced, run.saturated) if p is not None]

    def total(self, name: str) -> int:
        return sum(getattr(p, name) for p in self.phases())


def rows(columns: dict[str, Column], publish: str) -> list[tuple[str, dict[str, str], dict[str, str]]]:
    """(figure, value per mode, ratio to the floor per gateway mode)."""
    where = "cross-node" if publish == "http" else "XADD to receipt"

    def paced(run: Run) -> PhaseResult | None:
        return run.paced

    def sat(run: Run) -> PhaseResult | None:
        return run.saturated

    def figure(pick: Callable[[Run], float | None], spec: str) -> tuple[dict[str, str], dict[str, str]]:
        values = {mode: column.med(pick) for mode, column in columns.items()}
        floor = values.get("floor")
        return ({mode: fmt(value, spec) for mode, value in values.items()},
                {mode: ratio(value, floor) for mode, value in values.items() if mode != "floor"})

    def of(phase: Callable[[Run], PhaseResult | None], attribute: str) -> Callable[[Run], float | None]:
        def pick(run: Run) -> float | None:
            p = phase(run)
            return None if p is None else getattr(p, attribute)
        return pick

    def latency(q: float) -> Callable[[Run], float | None]:
        return lambda run: None if run.paced is None else percentile(run.paced.cross, q)

    out = [
        ("server CPU µs per delivery, paced", *figure(of(paced, "us_per_delivery"), ".2f")),
        ("server CPU µs per delivery, saturated", *figure(of(sat, "us_per_delivery"), ".2f")),
        ("of which in the kernel (sys), %, paced / saturated",
         {mode: f"{fmt(c.med(of(paced, 'sys_share')), '.0f')} / {fmt(c.med(of(sat, 'sys_share')), '.0f')}"
          for mode, c in columns.items()}, {}),
        ("deliveries/s, saturated", *figure(of(sat, "rate"), ",.0f")),
    ]
    delivered = {mode: f"{c.total('delivered') / c.total('expected'):.4f}" if c.total("expected") else "-"
                 for mode, c in columns.items()}
    out.append(("delivered fraction (all phases and rounds)", delivered, {}))
    out.append(("out-of-order deliveries", {m: str(c.total("out_of_order")) for m, c in columns.items()}, {}))
    out.append(("duplicate deliveries", {m: str(c.total("duplicates")) for m, c in columns.items()}, {}))
    p50, r50 = figure(latency(0.50), ".1f")
    p99, r99 = figure(latency(0.99), ".1f")
    out.append((f"latency p50 / p99 ms, paced, {where}",
                {m: f"{p50[m]} / {p99[m]}" for m in columns},
                {m: f"{r50[m]} / {r99[m]}" for m in r50}))
    out += [
        ("RSS KiB per idle connection", *figure(lambda run: run.kib_per_conn, ".1f")),
        ("server CPU µs per connect + subscribe", *figure(lambda run: run.connect_us, ".0f")),
        (f"server CPU µs per event, 2 receivers ({'publish + ' if publish == 'http' else ''}read)",
         *figure(lambda run: run.per_event_us, ".0f")),
        ("Redis CPU µs per event, saturated",
         *figure(lambda run: None if run.saturated is None or not run.saturated.published
                 else 1e6 * run.saturated.redis_cpu / run.saturated.published, ".0f")),
    ]
    busiest: dict[str, str] = {}
    for mode, column in columns.items():
        paced_busy = column.med(of(paced, "receiver_cpu"))
        sat_busy = column.med(of(sat, "receiver_cpu"))
        flag = " client-bound?" if (paced_busy or 0) > CLIENT_BOUND else ""
        busiest[mode] = f"{fmt(paced_busy, '.0f')} / {fmt(sat_busy, '.0f')}{flag}"
    out.append(("busiest receiver process, % of a core, paced / saturated", busiest, {}))
    out.append(("publisher process, % of a core, saturated",
                figure(of(sat, "publisher_cpu"), ".0f")[0], {}))
    return out


def print_report(columns: dict[str, Column], args: argparse.Namespace, loop: str, peer: str,
                 elapsed: float, profiler: Profiler | None = None) -> None:
    modes = list(columns)
    header = ["figure"]
    for mode in modes:
        header.append(TITLES[mode])
        if mode != "floor" and "floor" in columns:
            header.append("x floor")
    print()
    print(f"bench_delivery: {args.rounds} round(s), median; 2 servers on one redis-server; "
          f"{args.receivers} receivers; {args.events} events of ~{args.event_bytes} B at "
          f"{args.rate:g}/s, then {args.saturate_events} with ≤ {args.in_flight} in flight, "
          f"published by {'HTTP' if args.publish == 'http' else 'XADD'}; "
          f"{args.idle} idle connections; "
          + (f"floor: {args.floor_transport} receivers, {loop} loop; " if "floor" in columns else "")
          + (f"socket.io: {peer}; " if "socketio" in columns else "") +
          f"nproc {os.cpu_count()}; {elapsed:.0f} s; load average at start "
          f"{args.load_at_start:.2f}, at the end {os.getloadavg()[0]:.2f} (1 min)")
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for name, values, ratios in rows(columns, args.publish):
        cells = [name]
        for mode in modes:
            cells.append(values.get(mode, "-"))
            if mode != "floor" and "floor" in columns:
                cells.append(ratios.get(mode, ""))
        print("| " + " | ".join(cells) + " |")
    problems: Counter[str] = Counter()
    for mode, column in columns.items():
        for run in column.runs:
            for what, count in run.errors.items():
                problems[f"{TITLES[mode]}: {what}"] += count
    if problems:
        print("\nproblems (count, what):")
        for what, count in problems.most_common(30):
            print(f"  {count} x {what}")
    if profiler is not None and profiler.dir is not None:
        print(f"\npy-spy, paced + saturated phases, all rounds (raw stacks in {profiler.dir}):")
        for mode in columns:
            for line in profiler.summary(mode):
                print(line)


# ---------------------------------------------------------------------------------------------
# the socket.io peer's packages: installed beside the benchmark, never into the package

NODE_PACKAGES = {"socket.io": "4.8", "@socket.io/redis-streams-adapter": "0.3", "redis": "5"}


def socketio_unavailable(args: argparse.Namespace) -> str | None:
    """Why the socket.io column cannot run, or None once ``NODE_PACKAGES`` are in
    ``--node-dir`` (``npm install --no-save --prefix`` there when one is missing)."""
    if args.publish == "xadd":
        return ("--publish xadd appends the gateway's entry format, which the socket.io "
                "adapter does not read")
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "node and npm are not both installed (Debian: apt-get install nodejs npm)"

    def installed(name: str, version: str) -> bool:
        try:
            found = json.loads((args.node_dir / "node_modules" / name / "package.json").read_text())
        except (OSError, ValueError):
            return False
        return f"{found.get('version')}.".startswith(f"{version}.")

    if all(installed(name, version) for name, version in NODE_PACKAGES.items()):
        return None
    print(f"bench_delivery: installing {', '.join(NODE_PACKAGES)} into {args.node_dir}", flush=True)
    args.node_dir.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            ["npm", "install", "--no-save", "--no-audit", "--no-fund", "--prefix", str(args.node_dir),
             *(f"{name}@{version}" for name, version in NODE_PACKAGES.items())],
            capture_output=True, text=True, timeout=300, preexec_fn=die_with_parent)
    except subprocess.TimeoutExpired:
        return "npm install did not finish in 300 s"
    if done.returncode != 0:
        return f"npm install failed: {(done.stderr or done.stdout).strip()[-300:]}"
    if not all(installed(name, version) for name, version in NODE_PACKAGES.items()):
        return f"npm install left {args.node_dir} without {', '.join(NODE_PACKAGES)}"
    return None


async def main(args: argparse.Namespace) -> int:
    started = time.monotonic()
    args.load_at_start = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    if "socketio" in args.modes and (why := socketio_unavailable(args)) is not None:
        print(f"bench_delivery: no node socket.io column: {why}", flush=True)
        args.modes.remove("socketio")
        if not args.modes:
            return 2
    sys.path.insert(0, str(args.gateway_root))  # gateway.auth.mint_token of the code under test
    want = 2 * (args.idle + args.receivers) + 4096
    raise_nofile(want)
    workers = Workers(1 + args.client_procs, want)
    runs: dict[str, list[Run]] = {mode: [] for mode in args.modes}
    loop, peer = "?", "?"
    bench: Bench | None = None
    try:
        with scratch_redis("bench-delivery-") as (tmp, redis):
            bench = Bench(args, workers, redis, tmp)
            for rnd in range(1, args.rounds + 1):
                for mode in args.modes:  # alternating: no mode runs all its rounds in a row
                    run = Run(mode, rnd)
                    runs[mode].append(run)  # reported even if interrupted
                    await bench.run(run)
                    if mode == "floor":
                        loop = run.loop
                    elif mode == "socketio":
                        peer = run.loop
    finally:  # also on Ctrl-C and on --timeout: report what was measured
        workers.shutdown()
        print_report({mode: Column(r) for mode, r in runs.items() if r}, args, loop, peer,
                     time.monotonic() - started, bench.profiler if bench is not None else None)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a ~1-minute smoke run: 1 round, 40 receivers, 100 + 400 events, "
                             "200 idle connections (flags given explicitly still win)")
    parser.add_argument("--rounds", type=int, default=None, help="3")
    parser.add_argument("--receivers", type=int, default=None, help="200 (even: half per server)")
    parser.add_argument("--events", type=int, default=None, help="paced events: 500")
    parser.add_argument("--rate", type=float, default=50.0, help="paced events per second")
    parser.add_argument("--saturate-events", type=int, default=None, help="2000")
    parser.add_argument("--in-flight", type=int, default=128)
    parser.add_argument("--idle", type=int, default=None, help="idle connections: 2000")
    parser.add_argument("--per-event", type=int, default=None, help="events of the per-event phase: 200")
    parser.add_argument("--event-bytes", type=int, default=200, help="size of an event's data JSON")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="columns, in the order they run (socketio is left out, with a note, "
                             "without node and npm, and with --publish xadd)")
    parser.add_argument("--node-dir", type=Path, default=ROOT / "bench" / ".node",
                        help="where npm installs the socket.io peer's packages when missing "
                             "(default bench/.node, ignored by git)")
    parser.add_argument("--floor-transport", choices=("mixed", "ws", "sse"), default="mixed")
    parser.add_argument("--publish", choices=("http", "xadd"), default="http",
                        help="each server's HTTP publish (its cost is in the server figures), or "
                             "MULTI XADD + SPUBLISH straight to Redis (delivery alone)")
    parser.add_argument("--client-procs", type=int, default=2, help="receiver processes")
    parser.add_argument("--connect-concurrency", type=int, default=50)
    parser.add_argument("--each-timeout", type=float, default=30.0,
                        help="seconds one receiver may take to be ready")
    parser.add_argument("--deliver-timeout", type=float, default=30.0,
                        help="seconds after the last publish to wait for deliveries")
    parser.add_argument("--timeout", type=float, default=None,
                        help="the whole benchmark stops after this many seconds (1200; quick 300)")
    parser.add_argument("--gateway-arg", action="append", default=[],
                        help="extra argument for `gateway serve` (repeat it)")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="record the servers with py-spy through the delivery phases into DIR "
                             "and print where their time went (perturbs the figures)")
    parser.add_argument("--gateway-root", type=Path, default=ROOT,
                        help="directory whose gateway/ package runs (default: this checkout)")
    args = parser.parse_args(argv)
    defaults = ({"rounds": 1, "receivers": 40, "events": 100, "saturate_events": 400, "idle": 200,
                 "per_event": 50, "timeout": 300.0} if args.quick else
                {"rounds": 3, "receivers": 200, "events": 500, "saturate_events": 2000, "idle": 2000,
                 "per_event": 200, "timeout": 1200.0})
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or any(m not in MODES for m in args.modes):
        parser.error(f"--modes takes some of {','.join(MODES)}")
    if args.receivers < 2 or args.client_procs < 1 or args.rounds < 1:
        parser.error("need --receivers ≥ 2, --client-procs ≥ 1, --rounds ≥ 1")
    args.gateway_root = args.gateway_root.resolve()
    args.node_dir = args.node_dir.resolve()
    return args


if __name__ == "__main__":
    run_bounded("bench_delivery", main, parse_args())
