"""The Redis read path at scale and under hostile input (issue: Redis cost that grows with
events, not with workspaces). Real RedisBrokers on the suite's redis-server."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from gateway.broker import HistoryGone, tail
from gateway.broker_redis import RedisBroker
from gateway.presence import session_join, session_leave
from gateway.redis_topology import LIVENESS_CONNECTIONS
from protocol.envelope import EntryId, Envelope, EventId, WorkspaceKey
from tests.redis_nodes import WS, actor, collect, real_time_clock

pytestmark = pytest.mark.redis

clock = pytest.fixture(real_time_clock)


async def _connections(raw: Redis) -> int:
    return len(await raw.client_list())


async def test_following_many_workspaces_holds_a_fixed_number_of_connections(
    nodes: Callable[..., Any], raw: Redis
) -> None:
    before = await _connections(raw)
    broker: RedisBroker = await nodes("node-a", max_connections=4)
    workspaces = [WorkspaceKey("org-1", f"ws-{n}") for n in range(300)]
    starts = [(await broker.presence_snapshot(ws)).position for ws in workspaces]

    async def first(workspace: WorkspaceKey, after: EventId) -> Envelope:
        async for batch in tail(broker, workspace, after):
            return batch[0]
        raise AssertionError("tail ended")

    readers = [asyncio.create_task(first(ws, start)) for ws, start in zip(workspaces, starts, strict=True)]
    await asyncio.sleep(0.5)
    # 300 followed workspaces: the commands' pool (4), one pub/sub connection and the
    # node's reserved liveness connections, no more.
    assert await _connections(raw) - before <= 4 + 1 + LIVENESS_CONNECTIONS
    sent = await asyncio.gather(*(broker.append(ws, "doc.updated", actor("svc"), {"n": n})
                                  for n, ws in enumerate(workspaces)))
    got = await asyncio.wait_for(asyncio.gather(*readers), 10)
    assert got == sent
    assert await _connections(raw) - before <= 4 + 1 + LIVENESS_CONNECTIONS


async def test_following_and_dropping_never_waits_for_a_blocked_read(
    nodes: Callable[..., Any]
) -> None:
    broker: RedisBroker = await nodes("node-a")
    # Churn: follow and drop 200 workspaces, then follow one more and write to it; it must
    # arrive long before any blocking read (there is none) or the audit (a minute) would.
    for n in range(200):
        workspace = WorkspaceKey("org-1", f"churn-{n}")
        start = (await broker.presence_snapshot(workspace)).position
        reader = asyncio.create_task(anext(tail(broker, workspace, start)))
        await asyncio.sleep(0)
        reader.cancel()
    start = (await broker.presence_snapshot(WS)).position
    reader = asyncio.create_task(collect(broker, start, 1, timeout=5))
    await asyncio.sleep(0.2)
    sent = await broker.append(WS, "doc.updated", actor("svc"), {})
    assert await reader == [sent]
    assert broker.followed == 0  # the churned ones were dropped


async def test_a_forged_resume_id_resets_only_that_client(
    nodes: Callable[..., Any], clock: Any
) -> None:
    a: RedisBroker = await nodes("node-a")
    b: RedisBroker = await nodes("node-b")
    reasserted: list[str] = []

    async def note() -> None:
        reasserted.append("b")

    b.on_reassert(note)
    start = (await a.presence_snapshot(WS)).position
    sent = [await a.append(WS, "doc.updated", actor("svc"), {"n": n}) for n in range(3)]
    live = asyncio.create_task(collect(b, EventId.parse(sent[-1].id), 1, timeout=10))
    epoch = EventId.parse(sent[0].id).epoch
    # A client with sync:read sends an id 20 s in the future (and one in the middle).
    future = EventId(epoch, EntryId(int((clock.now() + 20) * 1000), 0))
    middle = EventId(epoch, EntryId(EventId.parse(sent[1].id).entry.ms, 7))
    for forged in (future, middle):
        with pytest.raises(HistoryGone):
            await b.read_after(WS, forged)
    # Nobody else noticed: same epoch, saved cursors still resume, no re-assertion, and
    # the live follower goes on.
    assert (await a.presence_snapshot(WS)).position.epoch == epoch
    assert await a.read_after(WS, start) == sent
    assert await b.read_after(WS, EventId.parse(sent[0].id)) == sent[1:]
    after = await a.append(WS, "doc.updated", actor("svc"), {"n": 3})
    assert await live == [after]
    await asyncio.sleep(0.2)
    assert reasserted == []


async def test_a_resume_is_read_a_page_at_a_time(nodes: Callable[..., Any], raw: Redis) -> None:
    broker: RedisBroker = await nodes("node-a", history_max_len=5000)
    start = (await broker.presence_snapshot(WS)).position
    big = {"blob": "x" * 60_000}
    sent = [await broker.append(WS, "doc.updated", actor("svc"), big) for _ in range(40)]
    page = await broker.read_after(WS, start, 16)
    assert page == sent[:16]  # 16 entries of 60 KB, not the 2.4 MB of history
    rest: list[Envelope] = []
    cursor = EventId.parse(page[-1].id)
    while batch := await broker.read_after(WS, cursor, 16):
        rest.extend(batch)
        cursor = EventId.parse(batch[-1].id)
    assert page + rest == sent


@pytest.mark.parametrize("entry_id", ["253402300800000-0", "18446744073709551615-0"],
                         ids=["year-10000", "largest-id"])
async def test_an_entry_with_an_id_past_year_9999_stops_nothing(
    nodes: Callable[..., Any], raw: Redis, prefix: str, entry_id: str
) -> None:
    broker: RedisBroker = await nodes("node-a")
    start = (await broker.presence_snapshot(WS)).position
    reader = asyncio.create_task(collect(broker, start, 2, timeout=10))
    await asyncio.sleep(0.1)
    before = await broker.append(WS, "doc.updated", actor("svc"), {"n": 1})
    # A service writing microseconds (or anything) as ids, in the documented format.
    await raw.xadd(f"{prefix}:{{org-1:ws-1}}:log",
                   {"type": "doc.updated", "actor": '{"type":"service","id":"x"}', "data": "{}"},
                   id=entry_id)
    await raw.execute_command("SPUBLISH", f"{prefix}:{{org-1:ws-1}}:notify", "")
    got = await reader
    assert got[0] == before
    assert got[1].id.endswith(entry_id) and got[1].timestamp.startswith("9999-12-31T")
    if entry_id.startswith("1844"):
        return  # the largest id: no entry can follow it (Redis refuses appends: 503)
    # Later publishes still answer with their envelope (ids continue after the foreign one).
    after = await broker.append(WS, "doc.updated", actor("svc"), {"n": 2})
    assert EventId.parse(after.id).entry > EntryId.parse(entry_id)
    assert await broker.read_after(WS, EventId.parse(before.id)) == [got[1], after]


@pytest.mark.parametrize("last_event_id", [
    "abcd:99999999999999999999-0", "abcd:1-99999999999999999999", "abcd:1-0\n", "0:0-0",
])
async def test_an_unparseable_or_out_of_range_resume_id_is_history_gone(
    nodes: Callable[..., Any], last_event_id: str
) -> None:
    broker: RedisBroker = await nodes("node-a")
    await broker.append(WS, "doc.updated", actor("svc"), {})
    with pytest.raises((HistoryGone, ValueError)):
        await broker.read_after(WS, EventId.parse(last_event_id))


async def test_reading_idle_workspaces_leaves_no_lasting_state(
    nodes: Callable[..., Any], raw: Redis, prefix: str
) -> None:
    broker: RedisBroker = await nodes("node-a")
    before = await _connections(raw)
    for _ in range(200):
        workspace = WorkspaceKey("org-1", secrets.token_hex(6))
        snapshot = await broker.presence_snapshot(workspace)
        assert snapshot.members == {}
    keys = [key async for key in raw.scan_iter(match=f"{prefix}:{{org-1:*")]
    assert len(keys) == 200  # one epoch each (so ids stay checkable) ...
    ttls = [await raw.pttl(key) for key in keys]
    assert all(0 < ttl <= 600_000 for ttl in ttls)  # ... that expires within 10 minutes
    assert await _connections(raw) - before <= 6 + 1
    # The first write makes the epoch permanent.
    workspace = WorkspaceKey("org-1", "written")
    start = (await broker.presence_snapshot(workspace)).position
    sent = await broker.append(workspace, "doc.updated", actor("svc"), {})
    assert EventId.parse(sent.id).epoch == start.epoch
    assert await raw.pttl(f"{prefix}:{{org-1:written}}:epoch") == -1
    # So does the first read after a service's plain XADD made the log.
    workspace = WorkspaceKey("org-1", "xadded")
    start = (await broker.presence_snapshot(workspace)).position
    await raw.xadd(f"{prefix}:{{org-1:xadded}}:log",
                   {"type": "doc.updated", "actor": '{"type":"service","id":"x"}'})
    assert await raw.pttl(f"{prefix}:{{org-1:xadded}}:epoch") > 0
    [event] = await broker.read_after(workspace, start)
    assert EventId.parse(event.id).epoch == start.epoch
    assert await raw.pttl(f"{prefix}:{{org-1:xadded}}:epoch") == -1


async def test_a_live_follower_that_falls_more_than_max_len_behind_is_told_history_is_gone(
    nodes: Callable[..., Any], raw: Redis, prefix: str
) -> None:
    broker: RedisBroker = await nodes("node-a", history_max_len=10)
    start = (await broker.presence_snapshot(WS)).position
    first = await broker.append(WS, "doc.updated", actor("svc"), {"n": 0})
    got: list[Envelope] = []
    gone = asyncio.Event()

    async def follow() -> None:
        try:
            async for batch in tail(broker, WS, start):
                got.extend(batch)
        except HistoryGone:
            gone.set()

    reader = asyncio.create_task(follow())
    for _ in range(100):
        if got:
            break
        await asyncio.sleep(0.02)
    assert got == [first]
    # 500 entries written and trimmed to 10 with no notification between (a burst a
    # service wrote, a node that was paused): one notification afterwards.
    log_key = f"{prefix}:{{org-1:ws-1}}:log"
    async with raw.pipeline(transaction=False) as pipe:
        for n in range(500):
            pipe.xadd(log_key, {"type": "doc.updated", "actor": '{"type":"service","id":"x"}',
                                "data": f'{{"n":{n + 1}}}'}, maxlen=10, approximate=False)
        await pipe.execute()
    await raw.execute_command("SPUBLISH", f"{prefix}:{{org-1:ws-1}}:notify", "")
    await asyncio.wait_for(gone.wait(), 10)  # not a silent gap
    assert got == [first]
    await reader


async def test_a_thousand_concurrent_changes_of_one_user_all_succeed(
    nodes: Callable[..., Any]
) -> None:
    a: RedisBroker = await nodes("node-a")
    b: RedisBroker = await nodes("node-b")
    start = (await a.presence_snapshot(WS)).position
    # One user's sessions opened at once (tabs, a mass reconnect): 700 on one node, 300 on
    # another (contention across nodes too), then all closed at once. No 503, none lost.
    placed = [(n, a if n < 700 else b) for n in range(1000)]
    outcomes = await asyncio.gather(*(
        node.change_presence(WS, "u1", session_join("u1", actor("u1"), f"s{n}", node.node_id))
        for n, node in placed))
    assert len(outcomes) == 1000
    record = outcomes[-1].record
    assert record is not None and len(record.sessions) >= 1
    members = (await a.presence_snapshot(WS)).members
    assert list(members) == ["u1"]
    await asyncio.gather(*(node.change_presence(WS, "u1", session_leave(f"s{n}"))
                           for n, node in placed))
    assert (await b.presence_snapshot(WS)).members == {}
    log = await a.read_after(WS, start, 5000)
    # Exactly one event per transition: joined when the first appeared, left with the last.
    assert [event.type for event in log] == ["presence.joined", "presence.left"]


async def _script_exists_calls(raw: Redis) -> int:
    stats = await raw.info("commandstats")
    return int(stats.get("cmdstat_script|exists", {}).get("calls", 0))


async def test_a_batch_read_is_one_round_trip_and_survives_lost_scripts(
    nodes: Callable[..., Any], raw: Redis
) -> None:
    """Following reads with EVALSHA in one pipeline: no SCRIPT EXISTS before each batch (redis-py
    asks it for a script registered on a pipeline), and a Redis that lost its scripts (a
    restart, a failover, SCRIPT FLUSH) is given the script again, missing no event."""
    broker: RedisBroker = await nodes("node-a")
    start = (await broker.presence_snapshot(WS)).position
    got: list[Envelope] = []

    async def follow() -> None:
        async for batch in tail(broker, WS, start):
            got.extend(batch)

    async def until(count: int) -> None:
        async with asyncio.timeout(10):
            while len(got) < count:  # noqa: ASYNC110 (filled by the follower task)
                await asyncio.sleep(0.01)

    follower = asyncio.create_task(follow())
    try:
        before = await _script_exists_calls(raw)
        sent = [await broker.append(WS, "doc.updated", actor("svc"), {"n": n}) for n in range(20)]
        await until(20)
        assert await _script_exists_calls(raw) == before
        await raw.script_flush()
        sent += [await broker.append(WS, "doc.updated", actor("svc"), {"n": n})
                 for n in range(20, 30)]
        await until(30)
        assert got == sent
    finally:
        follower.cancel()
