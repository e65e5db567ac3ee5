"""What only the Redis backend has: several nodes on one Redis, outside writers, lost data,
node liveness, the key layout."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from gateway.broker import BackendUnavailable, HistoryGone, PresenceOutcome, tail
from gateway.broker_redis import RedisBroker, workspace_tag
from gateway.clock import ManualClock
from gateway.presence import (
    PresenceChange,
    Replica,
    Resource,
    Session,
    rest_leave,
    rest_touch,
    restore,
    session_join,
    session_leave,
    session_viewing,
    stream_opened,
)
from gateway.tasks import stop
from protocol.envelope import PRESENCE_JOINED, PRESENCE_LEFT, Envelope, EventId, WorkspaceKey
from tests.multinode.harness import RedisServer
from tests.redis_nodes import WS, actor, collect, real_time_clock

pytestmark = pytest.mark.redis

clock = pytest.fixture(real_time_clock)



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


async def _service_append(raw: Redis, prefix: str, *, notify: bool) -> bytes:
    """Exactly what docs/redis.md shows a backend service doing (optionally without the
    notification)."""
    log_key, channel = f"{prefix}:{{org-1:ws-1}}:log", f"{prefix}:{{org-1:ws-1}}:notify"
    async with raw.pipeline(transaction=True) as pipe:
        pipe.xadd(log_key, {"type": "doc.updated", "actor": '{"type":"service","id":"billing"}',
                            "data": '{"id":"doc-1","title":"Q3"}'})
        if notify:
            pipe.execute_command("SPUBLISH", channel, "")
        entry_id = (await pipe.execute())[0]
    assert isinstance(entry_id, bytes)
    return entry_id


@pytest.mark.parametrize("notify", [True, False], ids=["xadd-and-spublish", "plain-xadd"])
async def test_an_entry_a_service_appends_in_the_documented_format_is_delivered(
    nodes: Callable[..., Any], raw: Redis, prefix: str, notify: bool
) -> None:
    # Without the notification, the audit (here every second) still finds it.
    broker = await nodes("node-a", audit_period=1.0)
    start = (await broker.presence_snapshot(WS)).position
    reader = asyncio.create_task(collect(broker, start, 1))
    await asyncio.sleep(0.05)
    entry_id = await _service_append(raw, prefix, notify=notify)
    (event,) = await reader
    epoch = (await broker.presence_snapshot(WS)).position.epoch
    assert event.id == f"{epoch}:{entry_id.decode()}"
    assert (event.type, event.actor, event.data) == (
        "doc.updated", {"type": "service", "id": "billing"}, {"id": "doc-1", "title": "Q3"})
    assert await broker.read_after(WS, start) == [event]


async def test_a_notified_append_reaches_a_follower_at_once_and_idle_logs_cost_no_reads(
    nodes: Callable[..., Any], raw: Redis, prefix: str
) -> None:
    # The audit only every minute, the heartbeat every 20 s (a script and the three
    # commands it runs would count): the second measured below is quiet by design.
    broker = await nodes("node-a", node_timeout=60.0)
    start = (await broker.presence_snapshot(WS)).position
    reader = asyncio.create_task(collect(broker, start, 1, timeout=5))
    await asyncio.sleep(0.2)
    before = await _commands_processed(raw)
    await asyncio.sleep(1.0)  # followed but idle: no command at all
    assert await _commands_processed(raw) - before <= 2  # the two INFO calls themselves
    await _service_append(raw, prefix, notify=True)
    assert len(await reader) == 1


async def _commands_processed(raw: Redis) -> int:
    return int((await raw.info("stats"))["total_commands_processed"])


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


async def test_a_page_cut_short_by_malformed_entries_is_not_the_end_of_the_log(
    nodes: Callable[..., Any], raw: Redis, prefix: str
) -> None:
    broker = await nodes("node-a")
    start = (await broker.presence_snapshot(WS)).position
    first = await broker.append(WS, "doc.updated", actor("svc"), {"n": 1})
    for _ in range(3):
        await raw.xadd(f"{prefix}:{{org-1:ws-1}}:log", {"type": "doc.updated"})  # no actor
    rest = [await broker.append(WS, "doc.updated", actor("svc"), {"n": n}) for n in (2, 3)]
    # A reader asking for pages of 2 gets full pages while there is more to read.
    assert await broker.read_after(WS, start, 2) == [first, rest[0]]
    assert await broker.read_after(WS, EventId.parse(rest[0].id), 2) == [rest[1]]


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
        await tailing  # the live reader notices too (the new append notifies it)


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
    assert doomed._liveness._heartbeat_task is not None
    doomed._liveness._heartbeat_task.cancel()  # as if SIGKILLed: no goodbye, the key just expires
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
    task = paused._liveness._heartbeat_task
    assert task is not None
    task.cancel()  # SIGSTOP
    await asyncio.sleep(0.8)
    await peer.sweep()
    assert (await peer.presence_snapshot(WS)).members == {}
    paused._liveness._heartbeat_task = asyncio.create_task(paused._liveness._heartbeat_loop())  # SIGCONT
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


# -- outside entries that are not what the format says -----------------------------------


async def test_entries_too_deep_or_not_portable_are_skipped_and_the_feed_goes_on(
    nodes: Callable[..., Any], raw: Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    broker = await nodes("node-a")
    start = (await broker.presence_snapshot(WS)).position
    reader = asyncio.create_task(collect(broker, start, 2))
    await asyncio.sleep(0.05)
    key = f"{prefix}:{{org-1:ws-1}}:log"
    service = '{"type":"service","id":"billing"}'
    bad: list[dict[Any, Any]] = [
        {"type": "doc.updated", "actor": "[" * 100_000, "data": "{}"},  # JSON parsers recurse
        {"type": "doc.updated", "actor": service, "data": '{"a":' * 100_000 + "1" + "}" * 100_000},
        # Valid JSON that msgpack subscribers could not get:
        {"type": "doc.updated", "actor": service, "data": '{"a":' * 40 + "1" + "}" * 40},
        {"type": "doc.updated", "actor": service, "data": '{"n":NaN}'},
        {"type": "doc.updated", "actor": service, "data": '{"n":1e999}'},
        {"type": "doc.updated", "actor": service, "data": '{"n":' + "9" * 30 + "}"},
        {"type": "doc.updated", "actor": '{"id":"\\ud800"}', "data": "{}"},
    ]
    for fields in bad[:3]:
        await raw.xadd(key, fields)
    good = await broker.append(WS, "doc.updated", actor("svc"), {"ok": 1})
    for fields in bad[3:]:
        await raw.xadd(key, fields)
    second = await broker.append(WS, "doc.updated", actor("svc"), {"ok": 2})
    assert await reader == [good, second]
    # A resume across them works too (it used to answer 500).
    assert await broker.read_after(WS, start) == [good, second]
    warnings = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(warnings) == 1


async def test_node_written_presence_entries_of_the_wrong_shape_are_skipped(
    nodes: Callable[..., Any], raw: Redis, prefix: str
) -> None:
    broker = await nodes("node-a")
    start = (await broker.presence_snapshot(WS)).position
    key = f"{prefix}:{{org-1:ws-1}}:log"
    member = {"user_id": "u9", "actor": actor("u9"), "viewing": [], "joined_at": "2026-01-01T00:00:00Z"}
    wrong: list[dict[str, Any]] = [
        {"user_id": "u9"},  # no member at all
        {**member, "viewing": "doc-1"},
        {**member, "viewing": [{"resource_type": "doc"}]},
        {**member, "viewing": [{"resource_type": "doc", "resource_id": 7}]},
        {**member, "actor": "u9"},
        {**member, "joined_at": 0},
        {**member, "user_id": 9},
    ]
    for data in wrong:
        for event_type in (PRESENCE_JOINED, "presence.viewing"):
            await raw.xadd(key, {"type": event_type, "actor": "{}", "data": json.dumps(data),
                                 "node": "node-x"})
    await raw.xadd(key, {"type": PRESENCE_LEFT, "actor": "{}", "data": '{"user_id":9}', "node": "node-x"})
    joined = (await broker.change_presence(
        WS, "u1", session_viewing("u1", actor("u1"), "s1", "node-a", Resource("doc", "d1")))).events
    events = await broker.read_after(WS, start)
    assert events == list(joined)
    replica = Replica({}, start)
    for event in events:
        replica.apply(event)
    assert [m["user_id"] for m in replica.snapshot(Resource("doc", "d1"))["members"]] == ["u1"]


# -- a reaper racing the node it reaps ---------------------------------------------------


async def test_a_reaper_racing_a_paused_node_leaves_no_ghost(nodes: Callable[..., Any]) -> None:
    w1, w2 = WorkspaceKey("org-1", "ws-1"), WorkspaceKey("org-1", "ws-2")
    paused = await nodes("node-a", node_timeout=3.0)
    reaper = await nodes("node-b", node_timeout=3.0)
    held: dict[tuple[WorkspaceKey, str], dict[str, Resource | None]] = {}

    async def join(workspace: WorkspaceKey, user: str, session: str) -> None:
        await paused.change_presence(workspace, user, session_join(user, actor(user), session, "node-a"))
        held[(workspace, user)] = {session: None}

    reasserted = asyncio.Event()

    async def reassert() -> None:  # what the node's gateway does (core.Gateway.reassert)
        for workspace, user in sorted(set(held) | await paused.bound_to_node(), key=str):
            await paused.change_presence(workspace, user, restore(
                user, actor(user), "node-a", _holding(held.get((workspace, user), {}))))
        reasserted.set()

    paused.on_reassert(reassert)
    await join(w1, "u1", "s1")
    assert paused._liveness._heartbeat_task is not None
    await stop(paused._liveness._heartbeat_task)  # SIGSTOP, long enough for the key to expire
    await paused._redis.delete(paused.keys.alive("node-a"))
    # The reaper works on ws-1 while the node, running again, has a user join ws-2.
    original = reaper.change_presence

    async def racing(workspace: WorkspaceKey, user: str, change: PresenceChange) -> PresenceOutcome:
        outcome = await original(workspace, user, change)
        if (w2, "u2") not in held:
            await join(w2, "u2", "s2")
        return outcome

    reaper.change_presence = racing  # type: ignore[method-assign]
    await reaper._liveness.reap("node-a", force=False)
    reaper.change_presence = original  # type: ignore[method-assign]
    # The node beats again: it was reaped, so it re-asserts what it holds.
    paused._liveness._heartbeat_task = asyncio.create_task(paused._liveness._heartbeat_loop())
    await asyncio.wait_for(reasserted.wait(), 5)
    assert sorted((await reaper.presence_snapshot(w1)).members) == ["u1"]
    assert sorted((await reaper.presence_snapshot(w2)).members) == ["u2"]
    # Now the node dies for good: every user it held must go.
    await stop(paused._liveness._heartbeat_task)
    paused._liveness._heartbeat_task = None
    await paused._redis.delete(paused.keys.alive("node-a"))
    await reaper.sweep()
    assert (await reaper.presence_snapshot(w1)).members == {}
    assert (await reaper.presence_snapshot(w2)).members == {}  # no ghost


def _holding(
    sessions: dict[str, Resource | None],
) -> Callable[[], tuple[int, Mapping[str, Resource | None], Session | None]]:
    return lambda: (0, sessions, None)


async def test_an_unchanged_record_still_indexes_the_workspace_for_the_reaper(
    nodes: Callable[..., Any], raw: Redis
) -> None:
    node = await nodes("node-a")
    await node.change_presence(WS, "u1", session_join("u1", actor("u1"), "s1", "node-a"))
    await raw.delete(node.keys.node_workspaces("node-a"))  # a reaper removed it meanwhile
    node._indexed.clear()  # ... and the node re-asserts
    outcome = await node.change_presence(WS, "u1", session_join("u1", actor("u1"), "s1", "node-a"))
    assert outcome.events == ()
    assert await node.bound_to_node() == {(WS, "u1")}


# -- a log that went back in time with its epoch intact ------------------------------------


async def _rollback_setup(
    nodes: Callable[..., Any], raw: Redis, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[RedisBroker], list[str], EventId, Envelope, dict[str, bytes | None]]:
    # A restore is no append: nothing notifies the followers; the audit reads every second.
    brokers = [await nodes("node-a", audit_period=0.2), await nodes("node-b", audit_period=0.2)]
    reasserted: list[str] = []
    for broker in brokers:
        broker.on_reassert(functools.partial(_note, reasserted, broker.node_id))
    start = (await brokers[0].presence_snapshot(WS)).position
    first = await brokers[0].append(WS, "doc.updated", actor("svc"), {"n": 1})
    # The replica Redis will fail over to was last in sync here.
    keys = brokers[0].keys
    saved = {key: await raw.dump(key) for key in (keys.log(WS), keys.records(WS))}
    return brokers, reasserted, start, first, saved


async def _note(calls: list[str], node: str) -> None:
    calls.append(node)


async def _restore(raw: Redis, saved: dict[str, bytes | None]) -> None:
    for key, value in saved.items():
        if value is None:
            await raw.delete(key)
        else:
            await raw.restore(key, 0, value, replace=True)


async def _follow(broker: RedisBroker, after: EventId, got: list[Envelope]) -> None:
    async for batch in tail(broker, WS, after):
        got.extend(batch)


async def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


@pytest.mark.parametrize("append_after", [False, True], ids=["quiet", "appended-after"])
async def test_a_log_that_lost_entries_it_had_gets_a_new_epoch(
    nodes: Callable[..., Any], raw: Redis, monkeypatch: pytest.MonkeyPatch, clock: ManualClock,
    append_after: bool,
) -> None:
    (a, b), reasserted, start, first, saved = await _rollback_setup(nodes, raw, monkeypatch)
    seen: list[list[Envelope]] = [[], []]
    tails = [asyncio.create_task(_follow(node, start, got)) for node, got in zip((a, b), seen, strict=True)]
    lost = [await a.append(WS, "doc.updated", actor("svc"), {"n": 2})]
    lost += (await a.change_presence(WS, "ghost", session_join("ghost", actor("ghost"), "s", "node-a"))).events
    await _until(lambda: all(len(got) == 3 for got in seen))
    # Failover to the lagging replica: the epoch key survived, the log and records went back.
    await _restore(raw, saved)
    if append_after:  # a write lands before any reader looks: ids are newer than those lost
        clock.advance(1)
        await a.append(WS, "doc.updated", actor("svc"), {"n": 3})
    for reader in tails:
        with pytest.raises(HistoryGone):
            await asyncio.wait_for(reader, 10)
    assert all(got == [first, *lost] for got in seen)  # nothing after the loss was delivered
    assert (await a.presence_snapshot(WS)).position.epoch != start.epoch
    # A client that had read only the first event is reset too, not handed a silent gap.
    with pytest.raises(HistoryGone):
        await b.read_after(WS, EventId.parse(first.id))
    # Both nodes re-assert what they hold (the records went back in time too).
    await _until(lambda: sorted(set(reasserted)) == ["node-a", "node-b"])


async def test_a_client_id_newer_than_a_log_that_went_back_resets_everyone(
    nodes: Callable[..., Any], raw: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    (a, b), reasserted, start, first, saved = await _rollback_setup(nodes, raw, monkeypatch)
    lost = await a.append(WS, "doc.updated", actor("svc"), {"n": 2})
    await _restore(raw, saved)  # and no node follows the workspace
    with pytest.raises(HistoryGone):
        await b.read_after(WS, EventId.parse(lost.id))
    # Another client, at the first event, must not read on past the lost one unawares.
    with pytest.raises(HistoryGone):
        await a.read_after(WS, EventId.parse(first.id))
    assert (await a.presence_snapshot(WS)).position.epoch != start.epoch
    await _until(lambda: reasserted == ["node-b"])


# -- liveness while re-asserting ------------------------------------------------------------


async def test_the_heartbeat_goes_on_while_a_long_re_assertion_runs(
    nodes: Callable[..., Any], raw: Redis
) -> None:
    node = await nodes("node-a", node_timeout=0.6)
    peer = await nodes("node-b", node_timeout=0.6)
    runs: list[float] = []

    async def slow_reassert() -> None:  # e.g. thousands of holdings
        runs.append(time.monotonic())
        await asyncio.sleep(1.5)  # longer than node_timeout

    node.on_reassert(slow_reassert)
    start = (await peer.presence_snapshot(WS)).position
    await node.change_presence(WS, "u1", session_join("u1", actor("u1"), "s1", "node-a"))
    await raw.delete(node.keys.alive("node-a"))  # one missed beat
    await _until(lambda: bool(runs))
    for _ in range(15):  # the peer sweeps while the re-assertion runs
        await peer.sweep()
        await asyncio.sleep(0.1)
    assert [e.type for e in await peer.read_after(WS, start)] == [PRESENCE_JOINED]
    assert len(runs) == 1


# -- connection pools ------------------------------------------------------------------------


async def test_bursts_beyond_the_pool_size_wait_for_a_connection(nodes: Callable[..., Any]) -> None:
    broker = await nodes("node-a")
    workspaces = [WorkspaceKey("org-1", f"ws-{n}") for n in range(150)]
    starts = [(await broker.presence_snapshot(ws)).position for ws in workspaces]

    async def first_two(workspace: WorkspaceKey, after: EventId) -> list[Envelope]:
        got: list[Envelope] = []
        async for batch in tail(broker, workspace, after):
            got.extend(batch)
            if len(got) >= 2:
                break
        return got

    # 150 followed logs and 300 concurrent writes through a pool of 6 connections: the
    # writes wait for a connection, the follows hold none.
    tails = asyncio.gather(*(first_two(ws, start) for ws, start in zip(workspaces, starts, strict=True)))
    await asyncio.sleep(0.3)  # every log is followed (its subscription confirmed)
    sent = await asyncio.gather(*(
        broker.append(ws, "doc.updated", actor("svc"), {"n": n}) for n in range(2) for ws in workspaces
    ))
    got = await asyncio.wait_for(tails, 10)
    # Each tail got its workspace's two events, in log order (the two appends raced).
    assert [event for events in got for event in events] == sorted(
        sent, key=lambda e: (int(e.workspace_id.removeprefix("ws-")), EventId.parse(e.id).entry))


async def test_a_pool_with_no_free_connection_is_backend_unavailable(
    nodes: Callable[..., Any], raw: Redis
) -> None:
    broker = await nodes("node-a", max_connections=2, pool_wait=0.2)
    hold = [asyncio.create_task(broker._redis.blpop([f"nothing-{n}"], timeout=1)) for n in range(2)]
    await asyncio.sleep(0.1)
    with pytest.raises(BackendUnavailable):
        await broker.append(WS, "doc.updated", actor("svc"), {})
    await asyncio.gather(*hold)
    await broker.append(WS, "doc.updated", actor("svc"), {})  # free again


# -- sweeping around what cannot be swept ------------------------------------------------------


async def test_a_corrupt_record_does_not_stop_the_sweep(
    nodes: Callable[..., Any], raw: Redis, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    doomed = await nodes("node-doomed", node_timeout=0.6)
    survivor = await nodes("node-s", node_timeout=0.6)
    other = WorkspaceKey("org-1", "ws-2")
    await doomed.change_presence(other, "u1", session_join("u1", actor("u1"), "s1", "node-doomed"))
    await survivor.change_presence(WS, "u2", rest_touch("u2", actor("u2"), "node-s", 30.0))
    keys = survivor.keys
    await raw.hset(keys.records(WS), "bad", "{not json")
    await raw.zadd(keys.expiry(WS), {"bad": clock.now() + 1})
    await raw.zadd(keys.expiring, {workspace_tag(WS): clock.now() + 1})
    assert doomed._liveness._heartbeat_task is not None
    await stop(doomed._liveness._heartbeat_task)
    await raw.delete(keys.alive("node-doomed"))
    clock.advance(60)
    await survivor.sweep()
    await survivor.sweep()
    assert (await survivor.presence_snapshot(WS)).members == {}  # u2 expired all the same
    assert (await survivor.presence_snapshot(other)).members == {}  # the dead node was reaped
    assert len([r for r in caplog.records if "cannot sweep" in r.getMessage()]) == 1


async def test_dead_nodes_are_reaped_however_many_nodes_are_alive(
    nodes: Callable[..., Any], raw: Redis
) -> None:
    doomed = await nodes("node-doomed", node_timeout=0.6)
    survivor = await nodes("node-s", node_timeout=0.6)
    await doomed.change_presence(WS, "u1", session_join("u1", actor("u1"), "s1", "node-doomed"))
    keys = survivor.keys
    alive = [f"node-{n}" for n in range(1000)]  # a large fleet, all beating
    async with raw.pipeline(transaction=False) as pipe:
        for node in alive:
            pipe.set(keys.alive(node), "x", px=60_000)
        pipe.sadd(keys.nodes, *alive)
        await pipe.execute()
    assert doomed._liveness._heartbeat_task is not None
    await stop(doomed._liveness._heartbeat_task)
    await raw.delete(keys.alive("node-doomed"))
    for _ in range(30):
        await survivor.sweep()
        if not (await survivor.presence_snapshot(WS)).members:
            break
    assert (await survivor.presence_snapshot(WS)).members == {}


@pytest.mark.parametrize("kept", [3, 2])
async def test_a_resume_from_a_trimmed_id_resets_even_when_few_entries_follow(
    nodes: Callable[..., Any], raw: Redis, prefix: str, kept: int
) -> None:
    """Redis 7.0 does not move max-deleted-entry-id when it trims, and an exact trim can
    leave max_len entries or fewer after a trimmed id: that must be a reset, not a gap."""
    broker = await nodes("node-a", history_max_len=3)
    sent = [await broker.append(WS, "doc.updated", actor("svc"), {"n": n}) for n in range(10)]
    await raw.xtrim(f"{prefix}:{{org-1:ws-1}}:log", maxlen=kept, approximate=False)
    with pytest.raises(HistoryGone):
        await broker.read_after(WS, EventId.parse(sent[0].id))
    # What is still there resumes as before, exactly.
    still = EventId.parse(sent[10 - kept].id)
    assert [e.id for e in await broker.read_after(WS, still)] == [e.id for e in sent[11 - kept:]]


async def test_a_redis_that_refuses_time_leaves_the_node_on_its_own_clock(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A managed Redis may deny commands by ACL: the node starts, says so once, and works.
    server = RedisServer(tmp_path / "redis", persist=False)
    server.start()
    try:
        admin = Redis.from_url(server.url)
        await admin.execute_command("ACL", "SETUSER", "gw", "on", ">pw", "~*", "&*", "+@all", "-time")
        await admin.aclose()
        broker = RedisBroker(f"redis://gw:pw@127.0.0.1:{server.port}/0", node_id="node-a",
                             key_prefix="no-time")
        with caplog.at_level(logging.WARNING, logger="gateway.broker_redis"):
            await broker.start()
        try:
            sent = await broker.append(WS, "doc.updated", actor("svc"), {"n": 1})
            assert EventId.parse(sent.id).entry.ms == pytest.approx(time.time() * 1000, abs=5_000)
            assert [r.message for r in caplog.records if "TIME" in r.message] == [
                "cannot read Redis's clock (TIME); shared deadlines use this node's clock, "
                "which must then agree with its peers'"]
        finally:
            await broker.close()
    finally:
        server.stop()
