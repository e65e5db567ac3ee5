"""Slow readers cannot grow the node's memory: a real gateway process, clients that stop
reading, ~100 MB of events pushed at them, and the process's RSS read from /proc.

Run alone to see the numbers: ``.venv/bin/python -m pytest tests/test_ws_memory.py -q -s``.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.auth import mint_token
from protocol.codecs import JSON
from tests.conftest import ORG, SECRET, WORKSPACE
from tests.processes import free_port

ROOT = Path(__file__).resolve().parent.parent
EVENT_BYTES = 32 * 1024
WARM_UP = 300
EVENTS = 3_000  # 3000 x 32 KiB = ~96 MiB offered to every slow reader
SLOW_READERS = 3
BATCH = 25
GROWTH_LIMIT_MB = 40

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def small_receive_buffer(addr_info: Any) -> socket.socket:
    family, kind, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=kind, proto=proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


BOUNDED = 64
UNBOUNDED = 1_000_000


@pytest.fixture(params=[BOUNDED, UNBOUNDED], ids=["send_buffer_64", "control_unbounded"])
def send_buffer(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
async def node(send_buffer: int) -> AsyncIterator[tuple[str, int]]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--jwt-secret", SECRET, "--node-id", "memory-test", "--send-buffer", str(send_buffer),
         "--history-max-len", "100", "--ws-rate-limit", "100000", "--ws-rate-burst", "100000",
         "--keepalive", "60", "--log-level", "WARNING"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 15
            while True:
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                try:
                    async with session.get(f"{url}/healthz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                assert time.monotonic() < deadline, "gateway did not start"
                await asyncio.sleep(0.1)
        yield url, process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def subscribe_frame() -> str:
    return JSON.encode({"op": "subscribe", "org_id": ORG, "workspace_id": WORKSPACE,
                        "ref": "s"}).decode()


async def slow_consumer_disconnects(session: aiohttp.ClientSession, url: str) -> float:
    async with session.get(f"{url}/metrics") as response:
        for line in (await response.text()).splitlines():
            if line.startswith('gateway_slow_consumer_disconnects_total{transport="ws"}'):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_slow_readers_do_not_grow_the_node_memory(node: tuple[str, int],
                                                        send_buffer: int) -> None:
    url, pid = node
    token = mint_token(SECRET, sub="load", org_id=ORG, workspaces=[WORKSPACE], ttl=3600)
    headers = {"Authorization": f"Bearer {token}"}
    socket_url = f"{url}/v1/sync/ws"
    pad = "x" * EVENT_BYTES

    async with aiohttp.ClientSession() as session, aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(socket_factory=small_receive_buffer)
    ) as slow_session:
        publisher = await session.ws_connect(socket_url, headers=headers)
        healthy = await session.ws_connect(socket_url, headers=headers, max_msg_size=0)
        await healthy.send_str(subscribe_frame())
        received = 0

        async def read_healthy() -> None:
            nonlocal received
            async for message in healthy:
                if JSON.decode(message.data.encode())["op"] == "event":
                    received += 1

        reader = asyncio.create_task(read_healthy())
        sent = 0

        async def publish(count: int) -> None:
            nonlocal sent
            for start in range(0, count, BATCH):
                size = min(BATCH, count - start)
                for n in range(size):
                    await publisher.send_str(JSON.encode({
                        "op": "publish", "org_id": ORG, "workspace_id": WORKSPACE,
                        "type": "load.chunk", "ref": sent + n, "data": {"n": sent + n, "pad": pad},
                    }).decode())
                for _ in range(size):
                    answer = JSON.decode((await publisher.receive(timeout=10)).data.encode())
                    assert answer["op"] == "reply", answer
                sent += size
                samples.append(rss_mb(pid))

        samples: list[float] = []
        await publish(WARM_UP)  # history and allocator at their steady state
        baseline = rss_mb(pid)
        samples.clear()

        slow = []
        for _ in range(SLOW_READERS):  # subscribe, then never read again
            ws = await slow_session.ws_connect(socket_url, headers=headers, max_msg_size=0)
            await ws.send_str(subscribe_frame())
            slow.append(ws)
        started = time.monotonic()
        await publish(EVENTS)
        elapsed = time.monotonic() - started
        peak = max(samples)

        async with asyncio.timeout(20):
            while received < WARM_UP + EVENTS + 1:  # noqa: ASYNC110 (a counter the reader task fills)
                await asyncio.sleep(0.05)
        cut = await slow_consumer_disconnects(session, url)
        reader.cancel()

    offered_mb = EVENTS * EVENT_BYTES / 2**20
    print(f"\nsend_buffer={send_buffer}: baseline RSS {baseline:.1f} MB, peak {peak:.1f} MB "
          f"(+{peak - baseline:.1f} MB) while {SLOW_READERS} clients that stopped reading were "
          f"offered {offered_mb:.0f} MB each; {EVENTS} events in {elapsed:.1f} s; "
          f"slow consumers cut: {cut:.0f}")
    assert received == WARM_UP + EVENTS + 1  # the healthy reader got everything (+snapshot)
    if send_buffer == BOUNDED:
        assert cut == SLOW_READERS  # each slow reader was closed ...
        assert peak - baseline < GROWTH_LIMIT_MB, (baseline, peak)
    else:  # the control: the same measurement does see memory pinned by slow readers
        assert cut == 0
        assert peak - baseline > GROWTH_LIMIT_MB, (baseline, peak)


RESUMED_WORKSPACES = 40
RESUME_EVENTS = 40  # per workspace; x 60 KiB: ~94 MiB asked for by one socket that never reads
RESUME_GROWTH_LIMIT_MB = 30  # a page held per replay would be 40 x 32 x 60 KiB = 75 MiB


async def test_one_socket_resuming_many_workspaces_holds_one_page() -> None:
    """On Redis, where a replayed page is new memory (the embedded backend's pages share
    the retained events)."""
    import secrets

    from tests.conftest import redis_url
    from tests.processes import serve

    token = mint_token(SECRET, sub="resumer", org_id=ORG, workspaces="*", ttl=3600)
    headers = {"Authorization": f"Bearer {token}"}
    with serve("--jwt-secret", SECRET, "--max-event-bytes", "70000", "--keepalive", "60",
               "--redis-url", redis_url(), "--redis-key-prefix", f"test-{secrets.token_hex(6)}",
               "--node-id", f"resume-{secrets.token_hex(3)}",
               "--log-level", "WARNING") as (process, port):
        url = f"http://127.0.0.1:{port}"
        pad = "x" * 60 * 1024
        async with aiohttp.ClientSession() as session, aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(socket_factory=small_receive_buffer)
        ) as slow:
            starts = {}
            for n in range(RESUMED_WORKSPACES):
                base = f"{url}/v1/orgs/{ORG}/workspaces/w{n}/sync"
                async with session.get(f"{base}/presence", headers=headers) as response:
                    assert response.status == 200
                async with session.post(f"{base}/events", headers=headers,
                                        json={"type": "mark", "data": {}}) as response:
                    starts[n] = (await response.json())["id"]
                for i in range(RESUME_EVENTS):
                    async with session.post(f"{base}/events", headers=headers,
                                            json={"type": "blob", "data": {"i": i, "pad": pad}}) as r:
                        assert r.status == 200
            await asyncio.sleep(0.5)
            before = rss_mb(process.pid)
            ws = await slow.ws_connect(f"{url}/v1/sync/ws", headers=headers, max_msg_size=0)
            for n in range(RESUMED_WORKSPACES):
                await ws.send_str(JSON.encode({"op": "subscribe", "org_id": ORG,
                                               "workspace_id": f"w{n}", "since": starts[n],
                                               "ref": n}).decode())
            peak = before
            for _ in range(30):  # 3 s: every replay has started (and stalls on the socket)
                await asyncio.sleep(0.1)
                peak = max(peak, rss_mb(process.pid))
            print(f"\none socket resuming {RESUMED_WORKSPACES} workspaces: RSS {before:.0f} -> "
                  f"peak {peak:.0f} MB")
            assert peak - before < RESUME_GROWTH_LIMIT_MB, (before, peak)
            # Nothing is lost by the pacing: the client reads, and gets every event.
            got = 0
            async with asyncio.timeout(60):
                while got < RESUMED_WORKSPACES * RESUME_EVENTS:
                    message = await ws.receive()
                    assert message.type == aiohttp.WSMsgType.TEXT, message
                    got += JSON.decode(message.data.encode()).get("op") == "event"
            await ws.close()


# -- what an idle socket holds (Python heap, counted with tracemalloc) ---------------------

IDLE_SOCKETS = 200
# Heap bytes an idle, authenticated, subscribed gateway socket holds beyond what a bare
# aiohttp WebSocket answering the same upgrade holds (aiohttp's own request, parser, reader,
# writer and heartbeat cancel out): ~1.2 KiB (the session, its transport and subscription,
# the identity, a deadline, its frames); it was ~4 KiB before issue 16, item 3 (middleware
# frames, a closure, eager containers, a loop timer, the token string cached as a key).
EXTRA_HEAP_LIMIT = 2_048


class _IdleClient(asyncio.Protocol):
    """One raw connection: sends its upgrade, is ready once ``ready`` arrived, then only
    reads (and drops) what comes."""

    def __init__(self, request: bytes, ready: bytes) -> None:
        self._request, self._ready, self._seen = request, ready, b""
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        if not self.opened.done():
            self._seen += data
            if self._ready in self._seen:
                self._seen = b""
                self.opened.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed before ready: {self._seen[:200]!r}"))


def upgrade_request(port: int, path: str, token: str) -> bytes:
    """The upgrade the bench's idle clients send (bearer token, JSON subprotocol)."""
    return (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: "
            f"dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Protocol: mm-sync.v1.json\r\n\r\n").encode()


async def heap_per_idle_connection(port: int, requests: list[bytes], ready: bytes) -> float:
    """Python heap bytes per connection that ``requests`` open and leave idle (each ready once
    ``ready`` arrived); the first tenth warms up (imports, caches, the feed) unmeasured."""
    import gc
    import tracemalloc

    loop = asyncio.get_running_loop()
    clients: list[_IdleClient] = []

    async def open_all(batch: list[bytes]) -> None:
        for start in range(0, len(batch), 50):
            opened = []
            for request in batch[start:start + 50]:
                client = _IdleClient(request, ready)
                await loop.create_connection(lambda c=client: c, "127.0.0.1", port)  # type: ignore[misc]
                opened.append(client)
            async with asyncio.timeout(30):
                await asyncio.gather(*(client.opened for client in opened))
            clients.extend(opened)

    warm = len(requests) // 10
    try:
        await open_all(requests[:warm])
        await asyncio.sleep(0.1)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            await open_all(requests[warm:])
            await asyncio.sleep(0.1)  # what the opens started is done
            gc.collect()
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
        grown = sum(stat.size_diff for stat in after.filter_traces(ignore).compare_to(
            before.filter_traces(ignore), "filename"))
        return grown / (len(requests) - warm)
    finally:
        for client in clients:
            if client.transport is not None:
                client.transport.abort()


async def test_an_idle_websocket_holds_little_beyond_aiohttp_s_own(
    app_factory: Any, aiohttp_server: Any, settings: Any, token: Any
) -> None:
    """Counted, not timed: an idle socket (authenticated at the upgrade, subscribed by its
    URL) against a bare aiohttp WebSocket answering the very same upgrades."""
    from aiohttp import web

    from protocol.ws import SUBPROTOCOLS

    async def bare(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(protocols=SUBPROTOCOLS, heartbeat=settings.keepalive,
                                   compress=False)
        await ws.prepare(request)
        async for _ in ws:
            pass
        return ws

    floor = web.Application()
    floor.router.add_get(f"/v1/orgs/{ORG}/workspaces/{{workspace}}/sync/ws", bare)
    floor_server = await aiohttp_server(floor)
    gateway = await app_factory(settings)
    path = f"/v1/orgs/{ORG}/workspaces/idle/sync/ws"
    tokens = [token(f"idle{n}", workspaces="*") for n in range(IDLE_SOCKETS + IDLE_SOCKETS // 9)]
    bare_bytes = await heap_per_idle_connection(
        floor_server.port, [upgrade_request(floor_server.port, path, t) for t in tokens],
        b"\r\n\r\n")
    gateway_bytes = await heap_per_idle_connection(
        gateway.port, [upgrade_request(gateway.port, path, t) for t in tokens], b"sync.snapshot")
    print(f"\nPython heap per idle WebSocket: bare aiohttp {bare_bytes:.0f} B, gateway "
          f"{gateway_bytes:.0f} B (+{gateway_bytes - bare_bytes:.0f} B)")
    assert gateway_bytes - bare_bytes < EXTRA_HEAP_LIMIT, (bare_bytes, gateway_bytes)
