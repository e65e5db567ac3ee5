"""Scale of one gateway node on Redis: many workspaces, many subscribers, one user many times.

For each N in ``--sizes`` a private redis-server (no persistence) and ONE gateway node are
started on loopback; N subscribers are opened on N distinct workspaces (org ``bench``,
workspaces ``w0``..``w{N-1}``, one subscriber each) over the WebSocket channel (default) or
SSE, and the table reports:

* the Redis connections the node holds (``CLIENT LIST`` minus this script's own, named,
  client) and ``INFO clients`` connected_clients;
* the node's RSS before and after the opens, and per subscriber (KiB);
* the node's idle CPU over ``--idle-seconds`` (subscribers connected, nothing published);
* the fan-out time: one event published to each workspace (``POST .../sync/events`` by
  default, or an ``XADD`` pipeline with ``--publish xadd``), from the first publish to the
  last delivery, and how many subscribers got their event.

Once, the same for ``max(sizes)`` subscribers all on ONE workspace (the reference for the
RSS-per-subscriber target), and the one-user case: 1,000 SSE streams of one user on one
workspace opened 50 at a time (non-200 answers, node CPU per open), then 1,000 distinct users.

Run: ``.venv/bin/python bench/bench_scale.py [--sizes 1000,5000,10000] [--transport ws|sse]
[--idle-seconds 20] [--publish http|xadd]``. The client is a minimal asyncio protocol (raw
HTTP upgrade / SSE request, no per-connection task) spread over ``--client-procs`` child
processes driven through pipes. Every wait is bounded; on a timeout the case is reported as
failed. Only processes started here are stopped, by their own PIDs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ctypes
import json
import multiprocessing
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NoReturn, cast

ROOT = Path(__file__).resolve().parent.parent

SECRET = "bench-scale-secret-" + "s" * 32
ORG = "bench"
BENCH_CLIENT_NAME = "bench-scale"  # CLIENT SETNAME of this script's own Redis connection
TICK = "bench.tick"
WS_SUBPROTOCOL = "mm-sync.v1.json"
KEY_PREFIX = "gw"  # docs/redis.md: <p>:{<org>:<ws>}:log

TARGET_REDIS_CONNS = 8
TARGET_IDLE_CPU = 3.0
TARGET_RSS_RATIO = 1.2


# ---------------------------------------------------------------------------------------
# small helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raise_nofile(want: int) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE (the hard limit too when allowed); answer the limits now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and want > hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want, want
    target = hard if hard != resource.RLIM_INFINITY else max(soft, want)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the benchmark dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def node_preexec() -> None:  # soft RLIMIT_NOFILE = hard, and die with the benchmark
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    die_with_parent()


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


# ---------------------------------------------------------------------------------------
# the client: one asyncio Protocol per subscriber, no task per connection


class Stats:
    """What one client process saw; sent to the parent as a dict."""

    def __init__(self) -> None:
        self.ok = 0
        self.failures: Counter[str] = Counter()
        self.examples: dict[str, str] = {}  # failure kind -> first body seen
        self.dropped: Counter[str] = Counter()  # ready subscribers the server closed
        self.delivered = 0
        self.duplicates = 0
        self.first_delivery: float | None = None
        self.last_delivery: float | None = None

    def fail(self, kind: str, example: str = "") -> None:
        self.failures[kind] += 1
        if kind not in self.examples:
            self.examples[kind] = example[:400]


class Subscriber(asyncio.Protocol):
    """One WebSocket (``ws``) or SSE (``sse``) subscription over a raw socket."""

    HEAD, BODY, WS, SSE = range(4)
    SSE_MARKERS = (b"event: sync.snapshot\n", b"event: " + TICK.encode() + b"\n")
    CARRY = max(len(m) for m in SSE_MARKERS) - 1

    def __init__(self, kind: str, request: bytes, stats: Stats,
                 ready: asyncio.Future[None]) -> None:
        self.kind = kind
        self.request = request
        self.stats = stats
        self.ready = ready
        self.state = self.HEAD
        self.buf = bytearray()
        self.status = 0
        self.body_left = 0
        self.fragments: list[bytes] = []
        self.ticks = 0
        self.closing = False
        self.transport: asyncio.Transport | None = None

    # -- plumbing ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses: no isinstance here)
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            if self.state == self.BODY:
                self._fail(f"HTTP {self.status}", bytes(self.buf).decode(errors="replace"))
            else:
                self._fail("closed before ready", repr(exc) if exc else "EOF")
        elif not self.closing and self.is_ready():
            self.stats.dropped["connection lost" if exc else "server closed (EOF)"] += 1

    def _fail(self, kind: str, example: str = "") -> None:
        if not self.ready.done():
            self.ready.set_exception(Failure(kind, example))
        if self.transport is not None:
            self.closing = True
            self.transport.abort()

    def is_ready(self) -> bool:
        ready = self.ready
        return ready.done() and not ready.cancelled() and ready.exception() is None

    def _ready(self) -> None:
        if not self.ready.done():
            self.ready.set_result(None)

    def _tick(self) -> None:
        now = time.monotonic()
        self.ticks += 1
        stats = self.stats
        if self.ticks > 1:
            stats.duplicates += 1
            return
        stats.delivered += 1
        if stats.first_delivery is None:
            stats.first_delivery = now
        stats.last_delivery = now

    def close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            if self.kind == "ws" and self.state == self.WS:
                self.transport.write(masked_frame(0x8, (1000).to_bytes(2, "big")))
            self.transport.close()

    # -- bytes in ---------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.state == self.WS:
            self._ws(data)
        elif self.state == self.SSE:
            self._sse(data)
        elif self.state == self.HEAD:
            self._head(data)
        else:
            self._body(data)

    def _head(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > 65536:
                self._fail("bad response head")
            return
        head = bytes(self.buf[:end]).decode("latin-1")
        rest = bytes(self.buf[end + 4:])
        self.buf = bytearray()
        try:
            self.status = int(head.split(" ", 2)[1])
        except (IndexError, ValueError):
            self._fail("bad status line", head[:200])
            return
        expected = 101 if self.kind == "ws" else 200
        if self.status != expected:
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    with contextlib.suppress(ValueError):
                        length = int(value.strip())
            self.state, self.body_left = self.BODY, length
            self._body(rest)
            return
        if self.kind == "ws":
            self.state = self.WS
            if rest:
                self._ws(rest)
        else:
            self.state = self.SSE
            if rest:
                self._sse(rest)

    def _body(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) >= self.body_left:
            self._fail(f"HTTP {self.status}", bytes(self.buf).decode(errors="replace"))

    def _sse(self, data: bytes) -> None:
        # Markers are searched in the raw (chunked) bytes: every event is one write, so one
        # chunk; a marker split across reads is caught by the carried tail, and a match is
        # only counted if it ends in the new bytes (the carry is shorter than any marker).
        carry = len(self.buf)
        window = bytes(self.buf) + data if carry else data
        snapshot, tick = self.SSE_MARKERS
        if not self.ready.done() and window.find(snapshot) >= 0:
            self._ready()
        start = 0
        while True:
            at = window.find(tick, start)
            if at < 0:
                break
            if at + len(tick) > carry:
                self._tick()
            start = at + 1
        self.buf = bytearray(window[-self.CARRY:])

    def _ws(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        while (frame := next_frame(buf, pos)) is not None:
            fin, opcode, masked, payload, pos = frame
            if masked:
                self._fail("masked server frame")
                return
            self._frame(fin, opcode, payload)
            if self.transport is None or self.transport.is_closing():
                break
        del buf[:pos]

    def _frame(self, fin: int, opcode: int, payload: bytes) -> None:
        if opcode == 0x9:  # ping -> pong (the server's heartbeat)
            assert self.transport is not None
            self.transport.write(masked_frame(0xA, payload))
            return
        if opcode == 0x8:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            reason = payload[2:].decode(errors="replace")
            if not self.ready.done():
                self._fail(f"ws close {code}", reason)
            elif not self.closing:
                self.stats.dropped[f"ws close {code}"] += 1
                self.closing = True
                assert self.transport is not None
                self.transport.close()
            return
        if opcode in (0x1, 0x2, 0x0):
            self.fragments.append(payload)
            if not fin:
                return
            message = b"".join(self.fragments)
            self.fragments = []
            self._message(message)

    def _message(self, raw: bytes) -> None:
        try:
            message = json.loads(raw)
        except ValueError:
            self._fail("undecodable ws message", raw[:200].decode(errors="replace"))
            return
        op = message.get("op")
        if op == "event":
            kind = message.get("event", {}).get("type")
            if kind == "sync.snapshot":
                self._ready()
            elif kind == TICK:
                self._tick()
        elif op == "error":
            error = message.get("error") or {}
            status = error.get("status_code", "?") if isinstance(error, dict) else "?"
            if not self.ready.done():
                self._fail(f"ws error {status}", raw.decode(errors="replace"))
            else:
                self.stats.dropped[f"ws error {status} after ready"] += 1


class Failure(Exception):
    def __init__(self, kind: str, example: str) -> None:
        super().__init__(kind)
        self.kind, self.example = kind, example


def next_frame(buf: bytearray, pos: int) -> tuple[int, int, int, bytes, int] | None:
    """The server frame that starts at ``buf[pos]`` as ``(fin, opcode, masked, payload,
    next_pos)``, or None while it has not arrived whole."""
    size = len(buf)
    if size - pos < 2:
        return None
    b0, b1 = buf[pos], buf[pos + 1]
    length, head = b1 & 0x7F, 2
    if length == 126:
        if size - pos < 4:
            return None
        length, head = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
    elif length == 127:
        if size - pos < 10:
            return None
        length, head = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
    if size - pos < head + length:
        return None
    payload = bytes(buf[pos + head:pos + head + length])
    return b0 & 0x80, b0 & 0x0F, b1 & 0x80, payload, pos + head + length


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """A client frame (clients must mask); control frames only, so ``len(payload) < 126``."""
    mask = os.urandom(4)
    body = bytes(byte ^ mask[i & 3] for i, byte in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | len(payload))) + mask + body


def build_request(kind: str, host: str, port: int, path: str, token: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", f"Authorization: Bearer {token}"]
    if kind == "ws":
        key = base64.b64encode(os.urandom(16)).decode()
        lines += ["Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
                  "Sec-WebSocket-Version: 13", f"Sec-WebSocket-Protocol: {WS_SUBPROTOCOL}"]
    else:
        lines += ["Accept: text/event-stream", "Cache-Control: no-cache"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class ClientProcess:
    """The body of one client process: holds its subscribers, answers the parent's commands."""

    def __init__(self) -> None:
        self.stats = Stats()
        self.subscribers: list[Subscriber] = []

    async def open(self, host: str, port: int, kind: str, specs: list[tuple[str, str]],
                   concurrency: int, each_timeout: float, budget: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        stats = self.stats
        pending = iter(specs)
        started = time.monotonic()
        cpu = own_cpu()

        async def one(path: str, token: str) -> None:
            ready: asyncio.Future[None] = loop.create_future()
            sub = Subscriber(kind, build_request(kind, host, port, path, token), stats, ready)
            limit = max(0.1, min(each_timeout, deadline - loop.time()))
            try:
                async with asyncio.timeout(limit):
                    await loop.create_connection(lambda: sub, host, port)
                    await ready
            except Failure as failure:
                stats.fail(failure.kind, failure.example)
                return
            except TimeoutError:
                waited = ("HTTP answer", "complete error body", "sync.snapshot event",
                          "sync.snapshot event")[sub.state]
                if sub.transport is None:
                    waited = "TCP connection"
                stats.fail("timeout", f"no {waited} within {limit:.1f}s")
                sub.closing = True
                if sub.transport is not None:
                    sub.transport.abort()
                return
            except OSError as exc:
                stats.fail(f"connect: {exc.strerror or type(exc).__name__}", repr(exc))
                return
            finally:
                self.subscribers.append(sub)
            stats.ok += 1

        async def lane() -> None:
            for path, token in pending:
                if loop.time() >= deadline:
                    stats.fail("not attempted (open budget spent)")
                    continue
                await one(path, token)

        await asyncio.gather(*(lane() for _ in range(max(1, concurrency))))
        return {"seconds": time.monotonic() - started, "cpu": own_cpu() - cpu}

    def status(self) -> dict[str, Any]:
        s = self.stats
        alive = sum(1 for sub in self.subscribers
                    if sub.is_ready() and not sub.closing
                    and sub.transport is not None and not sub.transport.is_closing())
        return {"ok": s.ok, "failures": dict(s.failures), "examples": s.examples,
                "dropped": dict(s.dropped), "delivered": s.delivered, "duplicates": s.duplicates,
                "first_delivery": s.first_delivery, "last_delivery": s.last_delivery,
                "alive": alive, "cpu": own_cpu()}

    def reset_deliveries(self) -> None:
        s = self.stats
        s.delivered = s.duplicates = 0
        s.first_delivery = s.last_delivery = None
        for sub in self.subscribers:
            sub.ticks = 0

    async def close_all(self, budget: float) -> dict[str, Any]:
        for sub in self.subscribers:
            sub.close()
        for _ in range(max(1, int(budget / 0.05))):
            if not any(sub.transport is not None and not sub.transport.is_closing()
                       for sub in self.subscribers):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # let the loop run the close callbacks
        for sub in self.subscribers:
            if sub.transport is not None and not sub.transport.is_closing():
                sub.transport.abort()
        self.subscribers = []
        self.stats = Stats()
        return {}

    async def serve(self, conn: Connection) -> None:
        await serve_pipe(conn, self.answer, lambda: self.close_all(2.0))

    async def answer(self, command: str, args: list[Any]) -> Any:
        if command == "open":
            return await self.open(*args)
        if command == "status":
            return self.status()
        if command == "reset":
            self.reset_deliveries()
            return {}
        if command == "close":
            return await self.close_all(*args)
        return {"error": f"unknown command {command}"}


async def serve_pipe(conn: Connection, answer: Callable[[str, list[Any]], Awaitable[Any]],
                     leave: Callable[[], Awaitable[Any]]) -> None:
    """A worker's side of its ``Pool`` pipe: each ``(command, *args)`` answered in turn (an
    exception becomes ``{"error": traceback}``), until ``exit`` (after ``leave``) or the
    parent is gone (a worker never outlives its benchmark)."""
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[Any] = asyncio.Queue()
    parent = os.getppid()

    def readable() -> None:
        try:
            inbox.put_nowait(conn.recv())
        except (EOFError, OSError):
            inbox.put_nowait(("exit",))
            loop.remove_reader(conn.fileno())

    loop.add_reader(conn.fileno(), readable)
    while True:
        try:
            command, *args = await asyncio.wait_for(inbox.get(), 1.0)
        except TimeoutError:
            if os.getppid() != parent:
                return
            continue
        if command == "exit":
            await leave()
            return
        try:
            result = await answer(command, args)
        except Exception:
            result = {"error": traceback.format_exc()}
        conn.send(result)


def client_main(conn: Connection, nofile: int) -> None:
    raise_nofile(nofile)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; it tells us to exit
    asyncio.run(ClientProcess().serve(conn))


class Pool:
    """The parent's side of ``procs`` worker processes (``target(conn, nofile)``), each
    answering one message at a time on its pipe; stopped by ``shutdown`` (by their PIDs)."""

    def __init__(self, procs: int, target: Callable[[Connection, int], None], nofile: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        for _ in range(procs):
            parent_end, child_end = context.Pipe()
            proc = context.Process(target=target, args=(child_end, nofile), daemon=True)
            proc.start()
            child_end.close()
            self.pipes.append(parent_end)
            self.procs.append(proc)

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self.procs]

    async def ask(self, messages: dict[int, tuple[Any, ...]], timeout: float) -> dict[int, Any]:
        """Send each process (by index) its message; their answers (an ``error`` raises)."""
        for index, message in messages.items():
            self.pipes[index].send(message)
        answers: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(answers) < len(messages):
            for index in messages:
                if index not in answers and self.pipes[index].poll(0):
                    answers[index] = self.pipes[index].recv()
            if len(answers) < len(messages):
                if time.monotonic() > deadline:
                    first = next(iter(messages.values()))[0]
                    raise TimeoutError(f"worker processes did not answer {first!r} in {timeout:.0f}s")
                await asyncio.sleep(0.01)
        for answer in answers.values():
            if isinstance(answer, dict) and "error" in answer:
                raise RuntimeError(f"worker process failed:\n{answer['error']}")
        return answers

    async def all(self, *message: Any, timeout: float = 30.0) -> list[Any]:
        answers = await self.ask(dict.fromkeys(range(len(self.pipes)), message), timeout)
        return [answers[i] for i in range(len(self.pipes))]

    def shutdown(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError, ValueError):
                pipe.send(("exit",))
        deadline = time.monotonic() + 10
        for proc in self.procs:
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()  # by its own PID
                proc.join(5)


class Clients(Pool):
    """``procs`` client processes, each owning a share of the sockets."""

    def __init__(self, procs: int, nofile: int) -> None:
        super().__init__(procs, client_main, nofile)

    async def open(self, host: str, port: int, kind: str, specs: list[tuple[str, str]],
                   concurrency: int, each_timeout: float, budget: float) -> dict[str, Any]:
        n = len(self.pipes)
        shares = [specs[i::n] for i in range(n)]
        lanes = [max(1, concurrency // n + (1 if i < concurrency % n else 0)) for i in range(n)]
        answers = (await self.ask(
            {i: ("open", host, port, kind, share, lane, each_timeout, budget)
             for i, (share, lane) in enumerate(zip(shares, lanes, strict=True))},
            budget + each_timeout + 30)).values()
        return {"seconds": max(a["seconds"] for a in answers),
                "cpu": sum(a["cpu"] for a in answers)}

    async def status(self) -> dict[str, Any]:
        answers = await self.all("status", timeout=30)
        total: dict[str, Any] = {"ok": 0, "failures": Counter(), "examples": {},
                                 "dropped": Counter(), "delivered": 0, "duplicates": 0,
                                 "first_delivery": None, "last_delivery": None, "alive": 0,
                                 "cpu": 0.0}
        for a in answers:
            for key in ("ok", "delivered", "duplicates", "alive", "cpu"):
                total[key] += a[key]
            total["failures"].update(a["failures"])
            total["dropped"].update(a["dropped"])
            for kind, example in a["examples"].items():
                total["examples"].setdefault(kind, example)
            for key, pick in (("first_delivery", min), ("last_delivery", max)):
                values = [v for v in (total[key], a[key]) if v is not None]
                total[key] = pick(values) if values else None
        return total

    async def close(self, budget: float = 20.0) -> None:
        await self.all("close", budget, timeout=budget + 15)


# ---------------------------------------------------------------------------------------
# the processes under test


class RedisProc:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir),
             "--logfile", str(self.dir / "redis.log"), "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start:\n{tail(self.dir / 'redis.log')}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        self.proc = None


@contextlib.contextmanager
def scratch_redis(prefix: str) -> Iterator[tuple[Path, RedisProc]]:
    """A temporary directory (``prefix``) and a private redis-server started in it; both
    gone afterwards, also when the benchmark is interrupted."""
    with tempfile.TemporaryDirectory(prefix=prefix) as name:
        tmp = Path(name)
        redis = RedisProc(tmp / "redis")
        redis.start()
        try:
            yield tmp, redis
        finally:
            redis.stop()


class NodeProc:
    """``python -m gateway serve`` run from ``root`` (its ``gateway`` package is the one run)."""

    root = ROOT

    def __init__(self, directory: Path, redis_url: str, extra: list[str]) -> None:
        self.port = free_port()
        self.log_path = directory / "node.log"
        self.args = [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1",
                     "--port", str(self.port), "--redis-url", redis_url, "--node-id", "bench",
                     "--jwt-secret", SECRET, "--log-format", "text", *extra]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, cwd=self.root, env=env, stdout=log, stderr=log,
                                         preexec_fn=node_preexec)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def wait_ready(self, session: Any, timeout: float = 30.0) -> None:
        import aiohttp

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"node exited:\n{tail(self.log_path)}")
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with session.get(f"{self.url}/readyz",
                                       timeout=aiohttp.ClientTimeout(total=2)) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"node not ready in {timeout}s:\n{tail(self.log_path)}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def log_problems(self) -> tuple[Counter[str], list[str]]:
        """Counts of WARNING/ERROR/CRITICAL lines and Tracebacks, and a few distinct ones."""
        counts: Counter[str] = Counter()
        samples: list[str] = []
        seen: set[str] = set()
        in_traceback = False
        with contextlib.suppress(OSError), open(self.log_path, errors="replace") as log:
            for line in log:
                # "%(asctime)s %(levelname)s %(name)s %(message)s"; asctime has a space.
                parts = line.split(" ", 4)
                level = parts[2] if len(parts) > 3 else ""
                if line.startswith("Traceback"):
                    counts["Traceback"] += 1
                    in_traceback = True
                elif level in ("WARNING", "ERROR", "CRITICAL"):
                    in_traceback = False
                    counts[level] += 1
                    key = " ".join(parts[2:4]) + " " + parts[4][:40] if len(parts) > 4 else line
                    if key not in seen and len(samples) < 6:
                        seen.add(key)
                        samples.append(" ".join(parts[2:])[:200].strip())
                elif in_traceback and line.strip() and not line.startswith((" ", "\t")):
                    in_traceback = False
                    key = line[:60]
                    if key not in seen and len(samples) < 6:
                        seen.add(key)
                        samples.append("exception: " + line.strip()[:200])
        return counts, samples


def redis_client(port: int) -> Any:
    import redis

    return redis.Redis(host="127.0.0.1", port=port, client_name=BENCH_CLIENT_NAME,
                       socket_timeout=30, decode_responses=True)


def node_redis_connections(client: Any) -> tuple[int, int, int]:
    """(connections not ours, of which blocked in XREAD, INFO connected_clients)."""
    clients = client.client_list()
    theirs = [c for c in clients if c.get("name") != BENCH_CLIENT_NAME]
    blocked = sum(1 for c in theirs if c.get("cmd") in ("xread", "xreadgroup"))
    return len(theirs), blocked, int(client.info("clients")["connected_clients"])


# ---------------------------------------------------------------------------------------
# one case


@dataclass
class Row:
    label: str
    n: int
    workspaces: int
    opened: int = 0
    open_seconds: float | None = None
    open_client_cpu: float | None = None
    redis_conns: int | None = None
    redis_blocked: int | None = None
    connected_clients: int | None = None
    rss_before: int | None = None  # KiB
    rss_after: int | None = None
    idle_cpu: float | None = None  # % of one core
    idle_redis_cpu: float | None = None
    publish_seconds: float | None = None
    fanout_seconds: float | None = None
    delivered: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    log_samples: list[str] = field(default_factory=list)  # node log: counts, then examples

    @property
    def kib_per_sub(self) -> float | None:
        """RSS growth per subscriber that was open when RSS was read (N when all opened)."""
        if self.rss_before is None or self.rss_after is None or not self.opened:
            return None
        return (self.rss_after - self.rss_before) / self.opened

    def error(self, kind: str, count: int = 1, example: str = "") -> None:
        self.errors[kind] += count
        if example and kind not in self.examples:
            self.examples[kind] = example[:400]


def stream_path(workspace: str, kind: str) -> str:
    return f"/v1/orgs/{ORG}/workspaces/{workspace}/sync/{'ws' if kind == 'ws' else 'stream'}"


def tokens_for(subs: list[str]) -> list[str]:
    from gateway.auth import mint_token

    cache: dict[str, str] = {}
    for sub in subs:
        if sub not in cache:
            cache[sub] = mint_token(SECRET, sub=sub, org_id=ORG, workspaces="*", ttl=3 * 3600)
    return [cache[sub] for sub in subs]


async def publish_http(session: Any, url: str, workspaces: list[str], concurrency: int,
                       budget: float, row: Row) -> None:
    import aiohttp

    from gateway.auth import mint_token

    token = mint_token(SECRET, sub="bench-publisher", org_id=ORG, workspaces="*", ttl=3600,
                       permissions=["events:publish"], extra={"kind": "service"})
    headers = {"Authorization": f"Bearer {token}"}
    deadline = time.monotonic() + budget
    todo = iter(enumerate(workspaces))

    async def lane() -> None:
        for i, workspace in todo:
            if time.monotonic() > deadline:
                row.error("publish: not sent (budget spent)")
                continue
            try:
                async with session.post(
                        f"{url}/v1/orgs/{ORG}/workspaces/{workspace}/sync/events",
                        json={"type": TICK, "data": {"n": i}}, headers=headers,
                        timeout=aiohttp.ClientTimeout(total=15)) as response:
                    body = await response.read()
                    if response.status != 200:
                        row.error(f"publish: HTTP {response.status}",
                                  example=body.decode(errors="replace"))
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                row.error(f"publish: {type(exc).__name__}", example=repr(exc))

    await asyncio.gather(*(lane() for _ in range(max(1, concurrency))))


def publish_xadd(client: Any, workspaces: list[str], row: Row) -> None:
    actor = json.dumps({"type": "service", "id": "bench-publisher"})
    pipe = client.pipeline(transaction=False)
    for i, workspace in enumerate(workspaces):
        # As docs/redis.md shows a service appending: the XADD, then the notification.
        pipe.xadd(f"{KEY_PREFIX}:{{{ORG}:{workspace}}}:log",
                  {"type": TICK, "actor": actor, "data": json.dumps({"n": i})})
        pipe.execute_command("SPUBLISH", f"{KEY_PREFIX}:{{{ORG}:{workspace}}}:notify", "")
    for result in pipe.execute(raise_on_error=False):
        if isinstance(result, Exception):
            row.error(f"publish: XADD {type(result).__name__}", example=str(result))


async def run_case(row: Row, workspaces: list[str], subs: list[str], args: argparse.Namespace,
                   clients: Clients, tmp: Path) -> Row:
    """One redis + one node; open ``len(workspaces)`` subscribers, measure, publish, close."""
    import aiohttp

    n = len(workspaces)
    print(f"\n== {row.label}: {n} {args.transport} subscribers on {row.workspaces} workspace(s)",
          flush=True)
    directory = Path(tempfile.mkdtemp(prefix=f"case-{row.n}-", dir=tmp))
    redis = RedisProc(directory / "redis")
    node = NodeProc(directory, redis.url, args.node_arg)
    client = None
    try:
        redis.start()
        node.start()
        connector = aiohttp.TCPConnector(limit=args.publish_concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            await node.wait_ready(session)
            client = redis_client(redis.port)
            client.ping()
            tokens = tokens_for(subs)
            specs = [(stream_path(ws, args.transport), tok)
                     for ws, tok in zip(workspaces, tokens, strict=True)]

            # Warm-up on the first workspace (lazy imports, first feed), then the baseline.
            await clients.open("127.0.0.1", node.port, args.transport, specs[:1], 1, 10, 10)
            warm = await clients.status()
            if warm["ok"] != 1:
                row.error("warm-up subscriber failed", example=json.dumps(warm["examples"]))
            await clients.close()
            await asyncio.sleep(1.0)
            row.rss_before = rss_kib(node.pid)

            budget = args.open_budget or 30 + n * 0.005
            print(f"   opening {n} (concurrency {args.concurrency}, budget {budget:.0f}s)...",
                  flush=True)
            node_cpu = cpu_seconds(node.pid)
            opened = await clients.open("127.0.0.1", node.port, args.transport, specs,
                                        args.concurrency, args.each_timeout, budget)
            node_cpu = delta(node_cpu, cpu_seconds(node.pid))
            row.open_seconds, row.open_client_cpu = opened["seconds"], opened["cpu"]
            state = await clients.status()
            row.opened = state["ok"]
            for kind, count in state["failures"].items():
                row.error(f"open: {kind}", count, state["examples"].get(kind, ""))
            print(f"   opened {row.opened}/{n} in {row.open_seconds:.1f}s "
                  f"(CPU: node {fmt(node_cpu, '.1f')}s, client processes "
                  f"{row.open_client_cpu:.1f}s)", flush=True)
            await asyncio.sleep(1.0)
            if not node.alive():
                raise RuntimeError(f"node died:\n{tail(node.log_path)}")
            row.rss_after = rss_kib(node.pid)
            row.redis_conns, row.redis_blocked, row.connected_clients = \
                node_redis_connections(client)

            # Idle: subscribers connected, nothing published.
            print(f"   idle {args.idle_seconds:g}s...", flush=True)
            cpu0, rcpu0, t0 = cpu_seconds(node.pid), cpu_seconds(redis.pid), time.monotonic()
            await asyncio.sleep(args.idle_seconds)
            cpu1, rcpu1, t1 = cpu_seconds(node.pid), cpu_seconds(redis.pid), time.monotonic()
            if cpu0 is not None and cpu1 is not None:
                row.idle_cpu = 100 * (cpu1 - cpu0) / (t1 - t0)
            if rcpu0 is not None and rcpu1 is not None:
                row.idle_redis_cpu = 100 * (rcpu1 - rcpu0) / (t1 - t0)

            # Fan-out: one event per workspace, to every subscriber.
            targets = list(dict.fromkeys(workspaces))
            await clients.all("reset")
            alive_before = (await clients.status())["alive"]
            print(f"   publishing {len(targets)} event(s) ({args.publish}); "
                  f"{alive_before} subscribers alive...", flush=True)
            node_cpu, client_cpu = cpu_seconds(node.pid), (await clients.status())["cpu"]
            publisher_cpu = own_cpu()
            started = time.monotonic()
            if args.publish == "http":
                await publish_http(session, node.url, targets, args.publish_concurrency,
                                   args.publish_budget or 20 + len(targets) * 0.005, row)
            else:
                publish_xadd(client, targets, row)
            row.publish_seconds = time.monotonic() - started
            deadline = time.monotonic() + args.deliver_timeout
            state = await clients.status()
            while state["delivered"] < alive_before and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                state = await clients.status()
            row.delivered = state["delivered"]
            if state["last_delivery"] is not None:
                row.fanout_seconds = state["last_delivery"] - started
            if row.delivered < alive_before:
                row.error("fan-out: not delivered within deliver-timeout",
                          alive_before - row.delivered)
            if state["duplicates"]:
                row.error("fan-out: duplicate deliveries", state["duplicates"])
            for kind, count in state["dropped"].items():
                row.error(f"dropped: {kind}", count)
            print(f"   delivered {row.delivered}/{n}, publish {row.publish_seconds:.2f}s, "
                  f"fan-out {fmt(row.fanout_seconds, '.2f')}s (CPU: node "
                  f"{fmt(delta(node_cpu, cpu_seconds(node.pid)), '.1f')}s, publisher "
                  f"{own_cpu() - publisher_cpu:.1f}s, client processes "
                  f"{state['cpu'] - client_cpu:.1f}s)", flush=True)
            await clients.close()
    except Exception as exc:  # recorded as a failure of this case; the next one still runs
        row.error(f"case aborted: {type(exc).__name__}", example=str(exc)[-400:])
        print(f"   case aborted: {exc}", flush=True)
        with contextlib.suppress(Exception):
            await clients.close()
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        node.stop()
        redis.stop()
        counts, samples = node.log_problems()
        row.log_samples = [f"{count} x {level}" for level, count in counts.items()] + samples
    return row


@dataclass
class OpenRow:
    label: str
    opens: int
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    cpu_us_per_open: float | None = None
    seconds: float | None = None
    log_samples: list[str] = field(default_factory=list)  # the node's, both cases together


async def one_user_case(args: argparse.Namespace, clients: Clients, tmp: Path) -> list[OpenRow]:
    """1,000 SSE streams of one user on one workspace, then of 1,000 distinct users."""
    import aiohttp

    print(f"\n== one user: {args.one_user_opens} SSE streams, "
          f"{args.one_user_concurrency} at a time", flush=True)
    directory = Path(tempfile.mkdtemp(prefix="one-user-", dir=tmp))
    redis = RedisProc(directory / "redis")
    node = NodeProc(directory, redis.url, args.node_arg)
    rows = [OpenRow("one user", args.one_user_opens),
            OpenRow("distinct users", args.one_user_opens)]
    try:
        redis.start()
        node.start()
        async with aiohttp.ClientSession() as session:
            await node.wait_ready(session)
        m = args.one_user_opens
        cases = [(rows[0], "solo-a", ["solo"] * m), (rows[1], "solo-b",
                                                     [f"user-{i}" for i in range(m)])]
        # Warm-up on a third workspace so that neither case pays for lazy imports.
        warm = [(stream_path("solo-warm", "sse"), tokens_for(["warm"])[0])]
        await clients.open("127.0.0.1", node.port, "sse", warm, 1, 10, 10)
        await clients.close()
        for row, workspace, subs in cases:
            await quiet(node.pid, 10.0)
            specs = [(stream_path(workspace, "sse"), tok) for tok in tokens_for(subs)]
            cpu0 = cpu_seconds(node.pid)
            opened = await clients.open("127.0.0.1", node.port, "sse", specs,
                                        args.one_user_concurrency, args.each_timeout,
                                        args.open_budget or 60 + m * 0.05)
            cpu1 = cpu_seconds(node.pid)
            state = await clients.status()
            row.ok, row.seconds = state["ok"], opened["seconds"]
            for kind, count in state["failures"].items():
                row.errors[kind] += count
            row.examples = state["examples"]
            if cpu0 is not None and cpu1 is not None:
                row.cpu_us_per_open = 1e6 * (cpu1 - cpu0) / m
            print(f"   {row.label}: {row.ok}/{m} opened in {row.seconds:.1f}s, "
                  f"errors {sum(row.errors.values())}, "
                  f"{fmt(row.cpu_us_per_open, '.0f')} µs node CPU/open", flush=True)
            await clients.close()
    except Exception as exc:
        for row in rows:
            if not row.ok:
                row.errors[f"case aborted: {type(exc).__name__}"] += 1
                row.examples.setdefault(f"case aborted: {type(exc).__name__}", str(exc)[-400:])
        print(f"   case aborted: {exc}", flush=True)
        with contextlib.suppress(Exception):
            await clients.close()
    finally:
        node.stop()
        redis.stop()
        counts, samples = node.log_problems()
        rows[0].log_samples = [f"{count} x {level}" for level, count in counts.items()] + samples
    return rows


def delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


async def quiet(pid: int, budget: float) -> None:
    """Wait (at most ``budget``) until the node's CPU stays under 10 % for half a second."""
    deadline = time.monotonic() + budget
    while time.monotonic() < deadline:
        before = cpu_seconds(pid)
        await asyncio.sleep(0.5)
        after = cpu_seconds(pid)
        if before is None or after is None or after - before < 0.05:
            return


# ---------------------------------------------------------------------------------------
# the report


def fmt(value: float | int | None, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def mb(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"


def print_report(rows: list[Row], one_ws: Row | None, opens: list[OpenRow],
                 args: argparse.Namespace, elapsed: float) -> None:
    reference = one_ws.kib_per_sub if one_ws is not None else None
    print("\n" + "=" * 120)
    print(f"bench_scale: transport={args.transport} publish={args.publish} "
          f"idle={args.idle_seconds:g}s client-procs={args.client_procs} "
          f"concurrency={args.concurrency}  (total {elapsed:.0f}s)")
    header = (f"{'case':<20}{'N':>7}{'opened':>8}{'open s':>8}{'redis conns':>13}"
              f"{'(xread)':>8}{'clients':>8}{'RSS MB before/after':>21}{'KiB/sub':>9}"
              f"{'idle CPU%':>10}{'redis%':>7}{'pub s':>7}{'fan-out s':>10}"
              f"{'delivered/N':>13}{'errors':>8}")
    print(header)
    target = (f"{'  target':<20}{'':>7}{'':>8}{'':>8}{'≤' + str(TARGET_REDIS_CONNS):>13}"
              f"{'':>8}{'':>8}{'':>21}"
              f"{('≤' + fmt(reference and reference * TARGET_RSS_RATIO, '.1f')):>9}"
              f"{'≤' + fmt(TARGET_IDLE_CPU, 'g'):>10}{'':>7}{'':>7}{'':>10}{'N/N':>13}{'0':>8}")
    print(target)
    print("-" * len(header))
    for row in [*rows, *([one_ws] if one_ws else [])]:
        flag_conns = "!" if row.redis_conns is None or row.redis_conns > TARGET_REDIS_CONNS else " "
        flag_cpu = "!" if row.idle_cpu is None or row.idle_cpu > TARGET_IDLE_CPU else " "
        kib = row.kib_per_sub
        flag_kib = "!" if (row is not one_ws and (kib is None or reference is None
                                                  or kib > reference * TARGET_RSS_RATIO)) else " "
        flag_del = "!" if row.delivered < row.n else " "
        errors = sum(row.errors.values())
        flag_err = "!" if errors else " "
        print(f"{row.label:<20}{row.n:>7}{row.opened:>8}{fmt(row.open_seconds, '.1f'):>8}"
              f"{fmt(row.redis_conns):>12}{flag_conns}{fmt(row.redis_blocked):>8}"
              f"{fmt(row.connected_clients):>8}"
              f"{mb(row.rss_before) + ' / ' + mb(row.rss_after):>21}"
              f"{fmt(kib, '.1f'):>8}{flag_kib}{fmt(row.idle_cpu, '.2f'):>9}{flag_cpu}"
              f"{fmt(row.idle_redis_cpu, '.1f'):>7}{fmt(row.publish_seconds, '.2f'):>7}"
              f"{fmt(row.fanout_seconds, '.2f'):>10}"
              f"{f'{row.delivered}/{row.n}':>12}{flag_del}{errors:>7}{flag_err}")
    print("  '!' = misses its target. redis conns = CLIENT LIST minus this script's own (named) "
          "client; (xread) = of them blocked in XREAD when listed;\n  clients = INFO "
          "connected_clients (ours included); KiB/sub = RSS growth / subscribers opened; "
          "idle CPU and redis% = % of one core;\n  fan-out s = first publish to last delivery; "
          "pub s = time to send all publishes; errors = client-visible failures (opens, "
          "publishes, undelivered, dropped), listed below with the node's log")
    print()
    header2 = (f"{'one-user case':<20}{'opens':>7}{'ok':>7}{'errors':>8}"
               f"{'CPU µs/open':>13}{'open s':>8}")
    print(header2 + "   target: 0 errors (one user)")
    print("-" * len(header2))
    for o in opens:
        errors = sum(o.errors.values())
        flag = "!" if errors and o.label == "one user" else " "
        print(f"{o.label:<20}{o.opens:>7}{o.ok:>7}{errors:>7}{flag}"
              f"{fmt(o.cpu_us_per_open, '.0f'):>13}{fmt(o.seconds, '.1f'):>8}")

    details = [(row.label, row.errors, row.examples, row.log_samples)
               for row in [*rows, *([one_ws] if one_ws else [])]]
    details += [(o.label, o.errors, o.examples, o.log_samples) for o in opens]
    if any(counts or samples for _, counts, _, samples in details):
        print("\nerrors (count, kind; first body of each kind):")
        for label, counts, examples, samples in details:
            for kind, count in counts.most_common():
                example = examples.get(kind) or examples.get(kind.removeprefix("open: "), "")
                print(f"  {label}: {count} x {kind}" + (f"\n      {example}" if example else ""))
            for sample in samples:
                print(f"  {label}: node log: {sample}")

    if rows:
        big = max(rows, key=lambda r: r.n)
        kib = big.kib_per_sub
        ratio = (kib / reference) if kib is not None and reference else None
        one = next((o for o in opens if o.label == "one user"), None)
        one_errors = sum(one.errors.values()) if one else None
        verdicts: list[tuple[str, str, bool | None]] = [
            (f"Redis connections held by the node ≤ {TARGET_REDIS_CONNS}",
             fmt(big.redis_conns), big.redis_conns is not None
             and big.redis_conns <= TARGET_REDIS_CONNS),
            (f"idle CPU ≤ {TARGET_IDLE_CPU:g} % of a core", f"{fmt(big.idle_cpu, '.2f')} %",
             big.idle_cpu is not None and big.idle_cpu <= TARGET_IDLE_CPU),
            (f"RSS/subscriber ≤ {TARGET_RSS_RATIO}x the one-workspace figure "
             f"({fmt(reference, '.1f')} KiB)", f"{fmt(kib, '.1f')} KiB ({fmt(ratio, '.2f')}x)",
             None if reference is None else ratio is not None and ratio <= TARGET_RSS_RATIO),
            ("every event delivered", f"{big.delivered}/{big.n}", big.delivered == big.n),
            ("0 errors in the one-user case", "not run" if one is None else fmt(one_errors),
             None if one is None else one_errors == 0),
        ]
        print(f"\ntargets at the largest N ({big.n} workspaces):")
        for text, value, ok in verdicts:
            verdict = "n/a (not measured)" if ok is None else "ok" if ok else "MISSED"
            print(f"  {text:<62} {value:>22}   {verdict}")


# ---------------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> int:
    started = time.monotonic()
    root = args.gateway_root.resolve()
    sys.path.insert(0, str(root))  # gateway.auth.mint_token of the code under test
    NodeProc.root = root
    print(f"gateway under test: {root}", flush=True)
    # The node needs a socket per subscriber plus its Redis connections (today one per
    # followed workspace); each client process needs its share of the subscribers.
    want = 2 * max([*args.sizes, args.one_workspace_n, args.one_user_opens]) + 4096
    soft, hard = raise_nofile(want)
    print(f"RLIMIT_NOFILE {soft}/{hard} for this script, its client processes and the node "
          f"(wanted {want}); client processes: {args.client_procs}", flush=True)
    clients = Clients(args.client_procs, want)
    rows: list[Row] = []
    one_ws: Row | None = None
    opens: list[OpenRow] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-scale-") as name:
            tmp = Path(name)
            for n in args.sizes:
                workspaces = [f"w{i}" for i in range(n)]
                rows.append(Row(f"{n} workspaces", n, n))  # listed even if interrupted
                await run_case(rows[-1], workspaces, [f"u{i}" for i in range(n)], args,
                               clients, tmp)
            if args.one_workspace_n:
                n = args.one_workspace_n
                one_ws = Row(f"{n} on 1 workspace", n, 1)
                await run_case(one_ws, ["one"] * n, [f"u{i}" for i in range(n)], args,
                               clients, tmp)
            if args.one_user_opens:
                opens = await one_user_case(args, clients, tmp)
    finally:  # also on Ctrl-C and on --timeout: report what was measured
        clients.shutdown()
        print_report(rows, one_ws, opens, args, time.monotonic() - started)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,5000,10000",
                        help="comma-separated numbers of workspaces (one subscriber each)")
    parser.add_argument("--transport", choices=("ws", "sse"), default="ws")
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--publish", choices=("http", "xadd"), default="http",
                        help="POST .../sync/events (default) or an XADD pipeline to Redis")
    parser.add_argument("--concurrency", type=int, default=200, help="opens in flight")
    parser.add_argument("--publish-concurrency", type=int, default=64)
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument("--each-timeout", type=float, default=30.0,
                        help="seconds one subscriber may take to be ready")
    parser.add_argument("--open-budget", type=float, default=0.0,
                        help="seconds for all opens of a case (0: 30 + 5 ms per subscriber)")
    parser.add_argument("--publish-budget", type=float, default=0.0,
                        help="seconds for all publishes of a case (0: 20 + 5 ms per event)")
    parser.add_argument("--deliver-timeout", type=float, default=30.0,
                        help="seconds after the last publish to wait for deliveries")
    parser.add_argument("--one-workspace-n", type=int, default=-1,
                        help="subscribers for the 'N on 1 workspace' row (-1: max of sizes; 0: skip)")
    parser.add_argument("--one-user-opens", type=int, default=1000, help="0: skip")
    parser.add_argument("--one-user-concurrency", type=int, default=50)
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="the whole benchmark stops after this many seconds")
    parser.add_argument("--node-arg", action="append", default=[],
                        help="extra argument for `gateway serve` (repeat it), "
                             "e.g. --node-arg=--log-level --node-arg=WARNING")
    parser.add_argument("--gateway-root", type=Path, default=ROOT,
                        help="directory whose gateway/ package the node runs (default: this "
                             "checkout), e.g. an export of another commit")
    args = parser.parse_args(argv)
    args.sizes = [int(size) for size in args.sizes.split(",") if size.strip()]
    if args.one_workspace_n < 0:
        args.one_workspace_n = max(args.sizes, default=0)
    return args


def run_bounded(name: str, main: Callable[[Any], Awaitable[int]], arguments: Any) -> NoReturn:
    """Run ``main(arguments)`` for at most ``arguments.timeout`` seconds and exit with its
    code; SIGTERM cleans up like Ctrl-C (every process started is stopped by its PID)."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    async def bounded() -> int:
        return await asyncio.wait_for(main(arguments), arguments.timeout)

    try:
        sys.exit(asyncio.run(bounded()))
    except TimeoutError:
        print(f"{name}: stopped after --timeout {arguments.timeout:g}s", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    run_bounded("bench_scale", main, parse_args())
