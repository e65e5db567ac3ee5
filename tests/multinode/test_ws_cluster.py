"""The WebSocket channel across real nodes: the same envelopes as SSE, and a drain hand-over."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import aiohttp
import msgpack
import pytest

from tests.multinode.conftest import Spawner
from tests.multinode.harness import BASE, ORG, WORKSPACE, Stream, auth, call, members

pytestmark = pytest.mark.multinode

NODE_TIMEOUT = 3.0
GRACE = 2.0


class MsgpackSocket:
    """A msgpack WebSocket client that keeps every event it receives."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self.replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.closed_with: int | None = None
        self._changed = asyncio.Condition()
        self._task = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, session: aiohttp.ClientSession, url: str, user: str) -> MsgpackSocket:
        ws = await session.ws_connect(f"{url.replace('http', 'ws')}/v1/sync/ws",
                                      protocols=("mm-sync.v1.msgpack",), headers=auth(user))
        assert ws.protocol == "mm-sync.v1.msgpack"
        return cls(ws)

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type != aiohttp.WSMsgType.BINARY:
                continue
            decoded = msgpack.unpackb(message.data)
            if decoded["op"] == "event":
                self.events.append(decoded["event"])
            else:
                await self.replies.put(decoded)
            async with self._changed:
                self._changed.notify_all()
        self.closed_with = self.ws.close_code
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, predicate: Any, timeout: float) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: predicate(self))

    async def ask(self, **message: Any) -> dict[str, Any]:
        await self.ws.send_bytes(msgpack.packb({"ref": 1, **message}))
        return await asyncio.wait_for(self.replies.get(), 5)

    async def close(self) -> None:
        await self.ws.close()
        self._task.cancel()


async def test_a_websocket_on_one_node_and_sse_on_another_see_identical_envelopes(
    spawn: Spawner, session: aiohttp.ClientSession
) -> None:
    redis = spawn.redis()
    a, b = await spawn.start(redis, "node-a", "node-b")
    sse = await Stream(session, b, "sse-reader").open()
    await sse.wait_for(lambda s: bool(s.of_type("sync.snapshot")), 5)
    socket = await MsgpackSocket.connect(session, a.url, "u2")
    where = {"org_id": ORG, "workspace_id": WORKSPACE}
    reply = await socket.ask(op="subscribe", **where)
    assert reply["op"] == "reply" and "members" in str(reply["data"])

    await call(session, "POST", f"{b.url}{BASE}/events", "svc",
               json={"type": "doc.updated", "data": {"from": "rest-on-b", "n": [1, 2.5, None]}})
    assert (await socket.ask(op="join", **where))["op"] == "reply"
    assert (await socket.ask(op="viewing", resource_type="document", resource_id="d1",
                             **where))["op"] == "reply"
    assert (await socket.ask(op="publish", type="doc.commented", data={"text": "zwölf 🚀"},
                             **where))["op"] == "reply"
    await call(session, "POST", f"{a.url}{BASE}/presence/join", "u3")

    def logged(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [e for e in events if not e["type"].startswith("sync.")]

    await socket.wait_for(lambda s: len(logged(s.events)) >= 5, 5)
    await sse.wait_for(lambda s: len(logged([e.data or {"type": "sync."} for e in s.events])) >= 5, 5)
    from_ws = logged(socket.events)
    assert [e["type"] for e in from_ws] == [
        "doc.updated", "presence.joined", "presence.viewing", "doc.commented", "presence.joined"]
    assert from_ws == logged([e.data or {} for e in sse.events])  # same ids, order, content
    assert socket.events[0]["type"] == "sync.snapshot"  # as an SSE stream starts
    await socket.close()
    await sse.close()


async def test_a_drained_websocket_moves_to_another_node_without_flicker(
    spawn: Spawner, session: aiohttp.ClientSession
) -> None:
    redis = spawn.redis()
    a, b = await spawn.start(redis, "node-a", "node-b", node_timeout=NODE_TIMEOUT)
    watcher = await Stream(session, a, "watcher").open()
    where = {"org_id": ORG, "workspace_id": WORKSPACE}
    on_b = await MsgpackSocket.connect(session, b.url, "u1")
    assert (await on_b.ask(op="join", **where))["op"] == "reply"
    await watcher.wait_for(lambda s: ("presence.joined", "u1") in s.presence(), 5)

    b.signal(signal.SIGTERM)
    await on_b.wait_for(lambda s: s.closed_with is not None, 10)
    assert on_b.closed_with == 1012  # "service restart": reconnect elsewhere
    on_a = await MsgpackSocket.connect(session, a.url, "u1")
    assert (await on_a.ask(op="join", **where))["op"] == "reply"
    assert b.wait_exit(15) == 0
    await asyncio.sleep(GRACE + NODE_TIMEOUT + 1.0)  # past the grace and b's liveness
    assert watcher.presence() == [("presence.joined", "u1")]  # no left, no second joined
    assert await members(session, a) == ["u1"]
    await on_a.close()
    assert (await call(session, "GET", f"{a.url}{BASE}/presence", "observer"))[0] == 200
    await watcher.close()
