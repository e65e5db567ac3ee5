"""A small SSE reader for tests: raw bytes when framing matters, parsed events otherwise."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import ClientPayloadError, ClientResponse


@dataclass
class Event:
    id: str | None = None
    event: str | None = None
    data: str = ""
    retry: int | None = None
    comments: list[str] = field(default_factory=list)

    @property
    def envelope(self) -> dict[str, Any]:
        return json.loads(self.data)


class SSEReader:
    def __init__(self, response: ClientResponse) -> None:
        self.response = response
        self.buffer = b""
        self.eof = False
        self.aborted = False  # the server cut the connection mid-body

    async def _fill(self, timeout: float) -> bool:
        try:
            chunk = await asyncio.wait_for(self.response.content.readany(), timeout)
        except ClientPayloadError:
            self.eof = self.aborted = True
            return False
        if not chunk:
            self.eof = True
            return False
        self.buffer += chunk
        return True

    async def raw(self, size: int, timeout: float = 5.0) -> bytes:
        """Exactly the next ``size`` bytes of the body."""
        async with asyncio.timeout(timeout):
            while len(self.buffer) < size:
                if not await self._fill(timeout):
                    break
        out, self.buffer = self.buffer[:size], self.buffer[size:]
        return out

    async def block(self, timeout: float = 5.0) -> bytes | None:
        """The next raw block (up to and including its blank line), or None at EOF."""
        async with asyncio.timeout(timeout):
            while b"\n\n" not in self.buffer:
                if not await self._fill(timeout):
                    return None
        block, _, self.buffer = self.buffer.partition(b"\n\n")
        return block + b"\n\n"

    async def next(self, timeout: float = 5.0, *, skip_comments: bool = True) -> Event | None:
        """The next event (blocks holding only ``retry:`` or comments are skipped)."""
        while True:
            block = await self.block(timeout)
            if block is None:
                return None
            event = parse_block(block)
            if event.event is None and not event.data:
                if skip_comments or not event.comments:
                    continue
            return event

    async def events(self, count: int, timeout: float = 5.0) -> list[Event]:
        out = []
        for _ in range(count):
            event = await self.next(timeout)
            assert event is not None, f"stream ended after {len(out)} of {count} events"
            out.append(event)
        return out

    async def until_eof(self, timeout: float = 5.0) -> list[Event]:
        out = []
        while True:
            event = await self.next(timeout)
            if event is None:
                return out
            out.append(event)


def parse_block(block: bytes) -> Event:
    event = Event()
    data_lines = []
    for line in block.decode().split("\n"):
        if not line:
            continue
        if line.startswith(":"):
            event.comments.append(line[1:].strip())
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "id":
            event.id = value
        elif name == "event":
            event.event = value
        elif name == "data":
            data_lines.append(value)
        elif name == "retry":
            event.retry = int(value)
    event.data = "\n".join(data_lines)
    return event
