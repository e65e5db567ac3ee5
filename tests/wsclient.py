"""A small WebSocket test client speaking the channel's messages in either encoding."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import aiohttp

from protocol.codecs import JSON, MSGPACK, Codec
from protocol.ws import SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK

ENCODINGS = {"json": (SUBPROTOCOL_JSON, JSON), "msgpack": (SUBPROTOCOL_MSGPACK, MSGPACK)}
TIMEOUT = 5.0


class Peer:
    """One client socket. ``request`` sends and returns the answer to its ``ref``,
    keeping the events that arrive meanwhile for ``event``."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, codec: Codec) -> None:
        self.ws = ws
        self.codec = codec
        self.events: deque[dict[str, Any]] = deque()
        self.answers: deque[dict[str, Any]] = deque()
        self._refs = 0

    async def send(self, message: dict[str, Any]) -> None:
        data = self.codec.encode(message)
        if self.codec is JSON:
            await self.ws.send_str(data.decode())
        else:
            await self.ws.send_bytes(data)

    async def receive(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next server message; fails on a close or on a frame of the wrong kind."""
        message = await self.ws.receive(timeout=timeout)
        expected = aiohttp.WSMsgType.TEXT if self.codec is JSON else aiohttp.WSMsgType.BINARY
        assert message.type == expected, (message.type, message.data, message.extra)
        raw = message.data.encode() if isinstance(message.data, str) else message.data
        decoded = self.codec.decode(raw)
        assert isinstance(decoded, dict) and decoded.get("op") in (
            "event", "reply", "error", "pong"), decoded
        return decoded

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        self._refs += 1
        ref = f"r{self._refs}"
        await self.send({"op": op, "ref": ref, **fields})
        return await self.answer(ref)

    async def answer(self, ref: Any, timeout: float = TIMEOUT) -> dict[str, Any]:
        for index, item in enumerate(self.answers):
            if item.get("ref") == ref:
                del self.answers[index]
                return item
        async with asyncio.timeout(timeout):
            while True:
                message = await self.receive()
                if message["op"] == "event":
                    self.events.append(message["event"])
                elif message.get("ref") == ref:
                    return message
                else:
                    self.answers.append(message)

    async def event(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        if self.events:
            return self.events.popleft()
        async with asyncio.timeout(timeout):
            while True:
                message = await self.receive()
                if message["op"] == "event":
                    return message["event"]
                self.answers.append(message)

    async def closed(self, timeout: float = TIMEOUT) -> tuple[int | None, list[dict[str, Any]]]:
        """Read until the server closes; the close code and the messages before it."""
        before: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout):
            while True:
                message = await self.ws.receive()
                if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                    aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR):
                    return self.ws.close_code, before
                raw = message.data.encode() if isinstance(message.data, str) else message.data
                before.append(self.codec.decode(raw))

    async def close(self) -> None:
        await self.ws.close()


async def connect(
    client: Any, path: str = "/v1/sync/ws", *, encoding: str = "json",
    token: str | None = None, headers: dict[str, str] | None = None, **kwargs: Any,
) -> Peer:
    """Open a socket through an aiohttp ``TestClient``; with ``token``, header auth."""
    subprotocol, codec = ENCODINGS[encoding]
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    ws = await client.ws_connect(path, protocols=(subprotocol,), headers=all_headers, **kwargs)
    assert ws.protocol == subprotocol
    return Peer(ws, codec)
