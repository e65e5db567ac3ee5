"""What only the Redis backend has: several nodes on one Redis, outside writers, lost data,
node liveness, the key layout."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from gateway.broker import BackendUnavailable, HistoryGone
from gateway.broker_redis import RedisBroker, workspace_tag
from gateway.clock import ManualClock
from gateway.presence import (
    rest_leave,
    rest_touch,
    session_join,
    session_leave,
    stream_opened,
)
from protocol.envelope import PRESENCE_JOINED, PRESENCE_LEFT, Envelope, EventId, WorkspaceKey
from tests.conftest import redis_url

pytestmark = pytest.mark.redis

WS = WorkspaceKey("org-1", "ws-1")


def actor(user: str) -> dict[str, Any]:
    return {"type": "user", "id": user}


@pytest.fixture
def clock() -> ManualClock:
    """Starts at the real time: entries appended with a plain ``XADD *`` carry Redis's clock."""
    return ManualClock(time.time())


@pytest.fixture
def prefix() -> str:
    return f"test-{secrets.token_hex(6)}"


@pytest.fixture
async def raw() -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url())
    yield client
    await client.aclose()


@pytest.fixture
async def nodes(prefix: str, clock: ManualClock) -> AsyncIterator[Callable[..., Any]]:
    """``await nodes("a", node_timeout=..)``: started RedisBrokers sharing one key prefix."""
    started: list[RedisBroker] = []

    async def make(node_id: str, **kwargs: Any) -> RedisBroker:
        options: dict[str, Any] = {
            "clock": clock, "history_max_len": 1000, "history_max_age": 3600.0,
            "node_timeout": 15.0, "disconnect_grace": 5.0, "key_prefix": prefix, **kwargs,
        }
        broker = RedisBroker(redis_url(), node_id=node_id, **options)
        await broker.start()
        started.append(broker)
        return broker

    yield make
    for broker in started:
        await broker.close()


async def collect(broker: RedisBroker, after: EventId, count: int, timeout: float = 10) -> list[Envelope]:
    got: list[Envelope] = []

    async def run() -> None:
        async for batch in broker.tail(WS, after):
            got.extend(batch)
            if len(got) >= count:
                return

    await asyncio.wait_for(run(), timeout)
    return got


async def test_concurrent_changes_from_several_nodes_yield_one_event_per_transition(
    nodes: Callable[..., Any],
) -> None:
    brokers = [await nodes(f"node-{n}") for n in range(3)]
    start = (await brokers[0].presence_snapshot(WS)).position
    for round_ in range(5):
        # Every node joins the same user with its own session, at once, many times.
        await asyncio.gather(*(
            broker.change_presence(WS, "u1", session_join("u1", actor("u1"), f"s{n}-{k}", broker.node_id))
            for k in range(4) for n, broker in enumerate(brokers)
        ))
        await asyncio.gather(*(
            broker.change_presence(WS, "u1", rest_touch("u1", actor("u1"), broker.node_id, 30.0))
            for broker in brokers
        ))
        # ... then every session leaves at once, and the REST session too.
        await asyncio.gather(*(
            broker.change_presence(WS, "u1", session_leave(f"s{n}-{k}"))
            for k in range(4) for n, broker in enumerate(brokers)
        ))
        await asyncio.gather(*(broker.change_presence(WS, "u1", rest_leave()) for broker in brokers))
        logged = [e.type for e in await brokers[round_ % 3].read_after(WS, start)]
        assert logged == [PRESENCE_JOINED, PRESENCE_LEFT] * (round_ + 1)


async def test_every_node_reads_the_same_log(nodes: Callable[..., Any]) -> None:
    a, b = await nodes("node-a"), await nodes("node-b")
    start = (await a.presence_snapshot(WS)).position
    reader = asyncio.create_task(collect(b, start, 20))
    await asyncio.sleep(0.05)
    sent: list[Envelope] = []
    for n in range(10):
        source = a if n % 2 else b
        sent.append(await source.append(WS, "doc.updated", actor("svc"), {"n": n}))
        sent.extend((await source.change_presence(
            WS, f"u{n}", session_join(f"u{n}", actor(f"u{n}"), "s", source.node_id))).events)
    assert await reader == sent
    assert await a.read_after(WS, start) == sent == await b.read_after(WS, start)
    assert (await a.presence_snapshot(WS)) == (await b.presence_snapshot(WS))


async def test_a_plain_xadd_in_the_documented_format_is_delivered(
    nodes: Callable[..., Any], raw: Redis, prefix: str
) -> None:
    broker = await nodes("node-a")
    start = (await broker.presence_snapshot(WS)).position
    reader = asyncio.create_task(collect(broker, start, 1))
    await asyncio.sleep(0.05)
    # Exactly what docs/redis.md shows a backend service doing.
    entry_id = await raw.xadd(
        f"{prefix}:{{org-1:ws-1}}:log",
        {"type": "doc.updated", "actor": '{"type":"service","id":"billing"}',
         "data": '{"id":"doc-1","title":"Q3"}'},
    )
    (event,) = await reader
    assert isinstance(entry_id, bytes)
    assert event.id == f"{start.epoch}:{entry_id.decode()}"
    assert (event.type, event.actor, event.data) == (
        "doc.updated", {"type": "service", "id": "billing"}, {"id": "doc-1", "title": "Q3"})
    assert await broker.read_after(WS, start) == [event]


async def test_malformed_entries_are_skipped_and_the_feed_goes_on(
    nodes: Callable[..., Any], raw: Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    broker = await nodes("node-a")
    start = (await broker.presence_snapshot(WS)).position
    reader = asyncio.create_task(collect(broker, start, 2))
    await asyncio.sleep(0.05)
    key = f"{prefix}:{{org-1:ws-1}}:log"
    bad: list[dict[Any, Any]] = [
        {"type": "doc.updated"},  # no actor
        {"type": "doc.updated", "actor": "{not json", "data": "{}"},
        {"type": "doc.updated", "actor": "[1]", "data": "{}"},  # actor not an object
        {"type": "Bad Type", "actor": "{}", "data": "{}"},
        {"type": "presence.joined", "actor": "{}", "data": '{"user_id":"ghost"}'},  # forged
        {"type": b"\xff\xfe", "actor": "{}", "data": "{}"},  # not UTF-8
        {"actor": "{}", "data": "{}"},  # no type
    ]
    for fields in bad:
        await raw.xadd(key, fields)
    good = await broker.append(WS, "doc.updated", actor("svc"), {"ok": True})
    await raw.xadd(key, {"type": "doc.updated", "actor": "{}", "data": "[]"})
    second = await broker.append(WS, "doc.updated", actor("svc"), {"ok": 2})
    assert await reader == [good, second]
    assert await broker.read_after(WS, start) == [good, second]
    assert "ghost" not in (await broker.presence_snapshot(WS)).members
    warnings = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(warnings) == 1  # logged once, not once per entry or per read


async def test_lost_data_means_history_gone_even_for_newer_looking_ids(
    nodes: Callable[..., Any], raw: Redis, prefix: str, clock: ManualClock
) -> None:
    broker = await nodes("node-a")
    start = (await broker.presence_snapshot(WS)).position
    old = await broker.append(WS, "doc.updated", actor("svc"), {"n": 1})
    tailing = asyncio.create_task(collect(broker, EventId.parse(old.id), 5, timeout=15))
    await asyncio.sleep(0.05)
    # Redis loses the workspace (restart without persistence, failover to a stale replica).
    lost = [key async for key in raw.scan_iter(match=f"{prefix}:{{org-1:ws-1}}:*")]
    await raw.delete(*lost)
    clock.advance(60)
    new = await broker.append(WS, "doc.updated", actor("svc"), {"n": 2})
    assert EventId.parse(new.id).entry > EventId.parse(old.id).entry  # looks newer ...
    assert EventId.parse(new.id).epoch != start.epoch  # ... but is of another epoch
    for gone in (start, EventId.parse(old.id)):
        with pytest.raises(HistoryGone):
            await broker.read_after(WS, gone)
    with pytest.raises(HistoryGone):
        await tailing  # the live reader notices too (at the latest after one blocking read)


async def test_a_node_that_stops_heartbeating_is_reaped_once_with_one_left_per_user(
    nodes: Callable[..., Any],
) -> None:
    doomed = await nodes("node-doomed", node_timeout=0.6)
    survivors = [await nodes("node-s1", node_timeout=0.6), await nodes("node-s2", node_timeout=0.6)]
    start = (await doomed.presence_snapshot(WS)).position
    # u1: two sockets on the doomed node. u2: a stream there and REST presence.
    # u3: a socket on the doomed node and one on a survivor (stays present).
    for session in ("a", "b"):
        await doomed.change_presence(WS, "u1", session_join("u1", actor("u1"), session, doomed.node_id))
    await doomed.change_presence(WS, "u2", rest_touch("u2", actor("u2"), doomed.node_id, 60.0))
    await doomed.change_presence(WS, "u2", stream_opened("u2", actor("u2"), doomed.node_id))
    await doomed.change_presence(WS, "u3", session_join("u3", actor("u3"), "c", doomed.node_id))
    await survivors[0].change_presence(WS, "u3", session_join("u3", actor("u3"), "d", "node-s1"))
    assert doomed._heartbeat_task is not None
    doomed._heartbeat_task.cancel()  # as if SIGKILLed: no goodbye, the key just expires
    await asyncio.sleep(0.8)
    await asyncio.gather(*(s.sweep() for s in survivors), *(s.sweep() for s in survivors))
    for survivor in survivors:
        await survivor.sweep()
    events = await survivors[0].read_after(WS, start)
    left = sorted((e.data["user_id"], e.data["reason"]) for e in events if e.type == PRESENCE_LEFT)
    # u2's REST session was kept alive by its stream only: node_timeout was its grace.
    assert left == [("u1", "node_down"), ("u2", "node_down")]
    members = (await survivors[1].presence_snapshot(WS)).members
    assert sorted(members) == ["u3"]
    assert await doomed.bound_to_node() == set()


async def test_a_node_that_lapsed_re_asserts_after_being_reaped(nodes: Callable[..., Any]) -> None:
    paused = await nodes("node-paused", node_timeout=0.6)
    peer = await nodes("node-peer", node_timeout=0.6)
    start = (await peer.presence_snapshot(WS)).position
    calls: list[str] = []

    async def reassert() -> None:
        calls.append("reassert")
        # What the node's gateway would do: put back the sessions it still holds.
        await paused.change_presence(WS, "u1", session_join("u1", actor("u1"), "s1", paused.node_id))

    paused.on_reassert(reassert)
    await paused.change_presence(WS, "u1", session_join("u1", actor("u1"), "s1", paused.node_id))
    task = paused._heartbeat_task
    assert task is not None
    task.cancel()  # SIGSTOP
    await asyncio.sleep(0.8)
    await peer.sweep()
    assert (await peer.presence_snapshot(WS)).members == {}
    paused._heartbeat_task = asyncio.create_task(paused._heartbeat_loop())  # SIGCONT
    for _ in range(50):
        if calls:
            break
        await asyncio.sleep(0.05)
    assert calls == ["reassert"]
    logged = [(e.type, e.data["user_id"]) for e in await peer.read_after(WS, start)]
    assert logged == [("presence.joined", "u1"), ("presence.left", "u1"), ("presence.joined", "u1")]


async def test_keys_of_a_workspace_share_one_cluster_slot(
    nodes: Callable[..., Any], raw: Redis, prefix: str, clock: ManualClock
) -> None:
    broker = await nodes("node-a")
    odd = WorkspaceKey("org:with{braces}", "ws/é:1")
    for workspace in (WS, odd):
        await broker.append(workspace, "doc.updated", actor("svc"), {})
        await broker.change_presence(workspace, "u1", rest_touch("u1", actor("u1"), "node-a", 30.0))
        await broker.change_presence(workspace, "u1", stream_opened("u1", actor("u1"), "node-a"))
        await broker.change_presence(workspace, "u2", session_join("u2", actor("u2"), "s", "node-a"))
        slots = {key_slot(key) async for key in raw.scan_iter(match=f"{prefix}:{{{_tag(workspace)}}}:*")}
        assert len(slots) == 1
    assert (await broker.presence_snapshot(odd)).members.keys() == {"u1", "u2"}
    clock.advance(1)
    assert await broker.bound_to_node() == {(WS, "u1"), (WS, "u2"), (odd, "u1"), (odd, "u2")}


def _tag(workspace: WorkspaceKey) -> str:
    return workspace_tag(workspace).replace("[", "\\[").replace("*", "\\*").replace("?", "\\?")


async def test_an_unreachable_redis_is_backend_unavailable(clock: ManualClock) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    broker = RedisBroker(f"redis://127.0.0.1:{port}/0", node_id="node-x", clock=clock)
    with pytest.raises(BackendUnavailable):
        await broker.start()
    with pytest.raises(BackendUnavailable):
        await broker.ping()
    with pytest.raises(BackendUnavailable):
        await broker.append(WS, "doc.updated", actor("svc"), {})
    with pytest.raises(BackendUnavailable):
        await broker.change_presence(WS, "u1", rest_touch("u1", actor("u1"), "node-x", 30.0))
    with pytest.raises(BackendUnavailable):
        await broker.presence_snapshot(WS)
    await broker.close()


def test_bad_prefixes_and_node_ids_are_refused() -> None:
    with pytest.raises(ValueError):
        RedisBroker("redis://127.0.0.1:1/0", node_id="a{b}")
    with pytest.raises(ValueError):
        RedisBroker("redis://127.0.0.1:1/0", node_id="a", key_prefix="{gw}")
