"""The floor for ``bench/bench_delivery.py``: the gateway's delivery job and nothing else.

A minimal aiohttp fan-out server on the same Redis, in the gateway's stream entry format
(``docs/redis.md``, ``gateway/log_entries.py``). Clients subscribe to a room (a workspace)
over a WebSocket (JSON text frames ``{"op":"event","event":<envelope>}``) or SSE
(``id:``/``event:``/``data:``, chunked as aiohttp sends it). Each room's Redis stream is
followed by one task with ``XREAD BLOCK`` on a dedicated connection (no pub/sub
notification); every batch it reads is encoded once per wire format in use and the same
bytes are written straight to each client's transport from that loop: no task, queue or
await per client or per delivery. A client with more than ``--max-buffer`` bytes unsent
is cut (it would resume elsewhere). The envelopes match the gateway's field for field.

Left out on purpose: authentication, presence, resume, epochs, entry validation — the floor
is what delivery itself costs on this stack (aiohttp, redis-py with hiredis, and uvloop when
it is installed; ``GET /readyz`` says which loop runs).

Routes: ``GET /rooms/{room}/ws``, ``GET /rooms/{room}/sse`` (the first frame is a ``ready``
event: the subscriber is attached and misses nothing appended after it), ``POST
/rooms/{room}/events`` (``{"type", "data"}`` -> one ``XADD ... MAXLEN ~``; answers the event
id), ``GET /readyz``.

    .venv/bin/python bench/floor_server.py --port 8091 --redis-url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, cast

from aiohttp import web
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

try:
    import uvloop
except ImportError:  # the stdlib loop: still a floor, of a slower stack
    uvloop = None

log = logging.getLogger("floor")

ORG: Final = "bench"
EPOCH: Final = "f100f100"  # the gateway's ids are "<8 hex epoch>:<entry id>"; same length here
ACTOR: Final = json.dumps({"type": "service", "id": "bench-publisher"}, separators=(",", ":"))
TYPE: Final = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
READ_BATCH: Final = 256  # entries per XREAD
BLOCK_MS: Final = 5_000
WS_READY: Final = b'{"op":"ready"}'
SSE_READY: Final = b"retry: 3000\n\nevent: ready\ndata: {}\n\n"
SSE_PING: Final = b": ping\n\n"


@dataclass(frozen=True, slots=True)
class Config:
    redis_url: str
    node_id: str
    keepalive: float
    max_buffer: int
    history_max_len: int


# -- wire formats: pure ----------------------------------------------------------------------


def ws_text_frame(payload: bytes) -> bytes:
    """An unmasked, final WebSocket text frame (servers never mask)."""
    size = len(payload)
    if size < 126:
        head = bytes((0x81, size))
    elif size < 65_536:
        head = bytes((0x81, 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((0x81, 127)) + size.to_bytes(8, "big")
    return head + payload


def http_chunk(data: bytes) -> bytes:
    """``data`` as one chunk of a ``Transfer-Encoding: chunked`` body (what aiohttp writes)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def envelope_json(room: str, entry_id: bytes, fields: dict[bytes, bytes]) -> tuple[str, bytes]:
    """(type, envelope JSON) of one stream entry, in the gateway's envelope shape."""
    entry = entry_id.decode()
    event_type = fields[b"type"].decode()
    ms = int(entry.partition("-")[0])
    envelope = {
        "id": f"{EPOCH}:{entry}",
        "type": event_type,
        "org_id": ORG,
        "workspace_id": room,
        "actor": json.loads(fields[b"actor"]),
        "data": json.loads(fields[b"data"]) if b"data" in fields else {},
        "timestamp": datetime.fromtimestamp(ms / 1000, UTC).replace(tzinfo=None).isoformat(
            timespec="microseconds"),
    }
    return event_type, json.dumps(envelope, separators=(",", ":"), ensure_ascii=False).encode()


def stream_key(room: str) -> str:
    return f"floor:{{{ORG}:{room}}}:log"


# -- rooms -----------------------------------------------------------------------------------


class Room:
    """A room's subscribers (transport -> "ws" | "sse") and the task that follows its stream.

    Every entry appended after ``start()`` returned reaches every subscriber attached at the
    time it is read, in stream order; a subscriber whose transport holds more than
    ``max_buffer`` unsent bytes is aborted and dropped, nobody waits for it.
    """

    def __init__(self, name: str, config: Config) -> None:
        self.name = name
        self.key = stream_key(name)
        self.config = config
        self.subscribers: dict[asyncio.Transport, str] = {}
        self.kinds = {"ws": 0, "sse": 0}
        self.position = b"0-0"
        self.task: asyncio.Task[None] | None = None

    async def start(self, commands: Redis) -> None:
        newest = cast(list[Any], await commands.xrevrange(self.key, count=1))
        self.position = newest[0][0] if newest else b"0-0"
        self.task = asyncio.create_task(self._follow(), name=f"room {self.name}")

    def attach(self, transport: asyncio.Transport, kind: str) -> None:
        self.subscribers[transport] = kind
        self.kinds[kind] += 1

    def detach(self, transport: asyncio.Transport) -> None:
        kind = self.subscribers.pop(transport, None)
        if kind is not None:
            self.kinds[kind] -= 1

    async def _follow(self) -> None:
        connection = Redis.from_url(self.config.redis_url, single_connection_client=True,
                                    socket_timeout=BLOCK_MS / 1000 + 5)  # outlasts a BLOCK
        pause = 0.0  # 0: reading; else the next retry's delay (capped backoff)
        try:
            while True:  # until the server stops (cancelled by the cleanup context)
                try:
                    reply = cast(list[Any], await connection.xread(
                        {self.key: self.position}, count=READ_BATCH, block=BLOCK_MS))
                except (RedisError, OSError) as exc:
                    if not pause:  # logged once per outage
                        log.warning("room %s: XREAD failed, retrying: %s", self.name, exc)
                    pause = min(2.0, pause * 2 or 0.1)
                    await asyncio.sleep(pause)
                    continue
                if pause:
                    log.warning("room %s: reading again", self.name)
                    pause = 0.0
                if reply:
                    self._deliver(reply[0][1])
        finally:
            await connection.aclose()

    def _deliver(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        """Encode the batch once per wire format in use; one write per subscriber."""
        self.position = entries[-1][0]
        ws_parts: list[bytes] = []
        sse_parts: list[bytes] = []
        want_ws, want_sse = self.kinds["ws"] > 0, self.kinds["sse"] > 0
        for entry_id, fields in entries:
            try:
                event_type, body = envelope_json(self.name, entry_id, fields)
            except (KeyError, ValueError):
                continue  # not in the entry format: skipped, as the gateway does
            if want_ws:
                ws_parts.append(ws_text_frame(b'{"op":"event","event":' + body + b"}"))
            if want_sse:
                sse_parts.append(b"id: %b:%b\nevent: %b\ndata: %b\n\n"
                                 % (EPOCH.encode(), entry_id, event_type.encode(), body))
        if not ws_parts and not sse_parts:
            return
        payloads = {"ws": b"".join(ws_parts), "sse": http_chunk(b"".join(sse_parts))}
        limit = self.config.max_buffer
        for transport, kind in list(self.subscribers.items()):
            if transport.is_closing():
                self.detach(transport)
            elif transport.get_write_buffer_size() > limit:
                self.detach(transport)
                transport.abort()  # too slow: cut, never waited for
            else:
                transport.write(payloads[kind])


class Rooms:
    """Rooms by name, each started once (concurrent first subscribers share the start)."""

    def __init__(self, config: Config, commands: Redis) -> None:
        self.config = config
        self.commands = commands
        self.rooms: dict[str, Room] = {}
        self.starting: dict[str, asyncio.Task[None]] = {}

    async def get(self, name: str) -> Room:
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = Room(name, self.config)
            self.starting[name] = asyncio.create_task(room.start(self.commands))
        starting = self.starting.get(name)
        if starting is not None:
            try:
                await asyncio.shield(starting)
            except BaseException:
                if self.rooms.get(name) is room and starting.done():
                    del self.rooms[name]  # a failed start is tried again by the next subscriber
                    self.starting.pop(name, None)
                raise
            self.starting.pop(name, None)
        return room

    async def stop(self) -> None:
        tasks = [room.task for room in self.rooms.values() if room.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


CONFIG: Final = web.AppKey("config", Config)
ROOMS: Final = web.AppKey("rooms", Rooms)
COMMANDS: Final = web.AppKey("commands", Redis)


# -- handlers --------------------------------------------------------------------------------


async def ws_handler(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    room = await request.app[ROOMS].get(request.match_info["room"])
    ws = web.WebSocketResponse(heartbeat=config.keepalive, compress=False)
    await ws.prepare(request)
    transport = request.transport
    assert transport is not None
    room.attach(transport, "ws")
    try:
        transport.write(ws_text_frame(WS_READY))
        async for _ in ws:  # client frames are ignored; the loop ends when the socket closes
            pass
    finally:
        room.detach(transport)
    return ws


async def sse_handler(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    room = await request.app[ROOMS].get(request.match_info["room"])
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    transport = request.transport
    assert transport is not None
    room.attach(transport, "sse")
    try:
        # Through aiohttp, so the headers are surely out first; written before any await, so
        # before any event the room writes to this transport.
        await response.write(SSE_READY)
        # Only the keep-alive wakes this task; a failed write (client gone) ends it.
        while not transport.is_closing():
            await asyncio.sleep(config.keepalive)
            if not transport.is_closing():
                transport.write(http_chunk(SSE_PING))
    finally:
        room.detach(transport)
    return response


async def publish_handler(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    room = request.match_info["room"]
    try:
        body = await request.json()
    except ValueError:
        return web.json_response({"error": "body is not JSON"}, status=422)
    event_type = body.get("type") if isinstance(body, dict) else None
    data = body.get("data", {}) if isinstance(body, dict) else None
    if not isinstance(event_type, str) or not TYPE.fullmatch(event_type) or not isinstance(data, dict):
        return web.json_response({"error": "want {type, data}"}, status=422)
    fields = {"type": event_type, "actor": ACTOR,
              "data": json.dumps(data, separators=(",", ":"), ensure_ascii=False),
              "node": config.node_id}
    try:
        entry_id = cast(bytes, await request.app[COMMANDS].xadd(
            stream_key(room), fields, maxlen=config.history_max_len, approximate=True))  # type: ignore[arg-type]
    except (RedisError, OSError):
        return web.json_response({"error": "redis unavailable"}, status=503)
    return web.json_response({"id": f"{EPOCH}:{entry_id.decode()}"})


async def readyz(request: web.Request) -> web.Response:
    try:
        await request.app[COMMANDS].ping()
    except (RedisError, OSError):
        return web.json_response({"ready": False}, status=503)
    loop = "uvloop" if uvloop is not None and isinstance(asyncio.get_running_loop(),
                                                          uvloop.Loop) else "asyncio"
    return web.json_response({"ready": True, "loop": loop, "node": request.app[CONFIG].node_id})


async def redis_context(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    pool = BlockingConnectionPool.from_url(config.redis_url, max_connections=6, timeout=2)
    app[COMMANDS] = Redis(connection_pool=pool)
    app[ROOMS] = Rooms(config, app[COMMANDS])
    yield
    await app[ROOMS].stop()
    await app[COMMANDS].aclose()
    await pool.disconnect()


def create_app(config: Config) -> web.Application:
    app = web.Application()
    app[CONFIG] = config
    app.cleanup_ctx.append(redis_context)
    app.router.add_get("/rooms/{room}/ws", ws_handler)
    app.router.add_get("/rooms/{room}/sse", sse_handler)
    app.router.add_post("/rooms/{room}/events", publish_handler)
    app.router.add_get("/readyz", readyz)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8091)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--node-id", default="floor")
    parser.add_argument("--keepalive", type=float, default=15.0,
                        help="seconds between keep-alives (WebSocket ping, SSE comment)")
    parser.add_argument("--max-buffer", type=int, default=1 << 20,
                        help="unsent bytes after which a subscriber is cut")
    parser.add_argument("--history-max-len", type=int, default=10_000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if uvloop is not None:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    config = Config(args.redis_url, args.node_id, args.keepalive, args.max_buffer,
                    args.history_max_len)
    with contextlib.suppress(KeyboardInterrupt):
        web.run_app(create_app(config), host=args.host, port=args.port, access_log=None,
                    print=None, shutdown_timeout=1.0)


if __name__ == "__main__":
    main()
