"""One contract for every backend: the same tests run on the embedded backend and on a real Redis.

What a gateway node relies on: an ordered, retained log per workspace; ``HistoryGone``
instead of a silent gap; exactly one event per presence transition; live tails; single-use
tickets; sweeping of expired presence (on the injected clock).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from gateway.broker import Broker, HistoryGone, tail
from gateway.clock import ManualClock
from gateway.config import Settings
from gateway.presence import (
    Resource,
    rest_leave,
    rest_touch,
    session_join,
    session_leave,
    session_viewing,
    stream_closed,
    stream_opened,
)
from protocol.envelope import (
    PRESENCE_JOINED,
    PRESENCE_LEFT,
    PRESENCE_VIEWING,
    EntryId,
    Envelope,
    EventId,
    WorkspaceKey,
)
from tests.conftest import make_broker, with_settings

WS = WorkspaceKey("org-1", "ws-1")
OTHER_WS = WorkspaceKey("org-1", "ws-2")
NODE = "node-test"  # the settings fixture's node id


def actor(user: str) -> dict[str, Any]:
    return {"type": "user", "id": user, "name": user.title()}


def types(events: list[Envelope] | tuple[Envelope, ...]) -> list[str]:
    return [event.type for event in events]


async def start_of_log(broker: Broker, workspace: WorkspaceKey = WS) -> EventId:
    return (await broker.presence_snapshot(workspace)).position


@pytest.fixture
async def brokers_with(
    backend_name: str, settings: Settings, clock: ManualClock
) -> AsyncIterator[Callable[..., Any]]:
    started: list[Broker] = []

    async def make(**changes: Any) -> Broker:
        instance = make_broker(backend_name, with_settings(settings, **changes), clock)
        await instance.start()
        started.append(instance)
        return instance

    yield make
    for instance in started:
        await instance.close()


# -- the log -------------------------------------------------------------------


async def test_append_returns_the_envelope_every_reader_gets(broker: Broker) -> None:
    start = await start_of_log(broker)
    sent = await broker.append(WS, "doc.updated", {"type": "service", "id": "billing"},
                               {"id": "doc-1", "n": 1, "nested": {"ok": [1, 2.5, None, "é"]}})
    assert (sent.type, sent.org_id, sent.workspace_id) == ("doc.updated", "org-1", "ws-1")
    assert sent.actor == {"type": "service", "id": "billing"}
    assert sent.data == {"id": "doc-1", "n": 1, "nested": {"ok": [1, 2.5, None, "é"]}}
    # The id is in the log's epoch; the position before the first event (of a log that
    # did not exist yet, on Redis: reading creates nothing) resumes into it.
    assert EventId.parse(sent.id).epoch == (await start_of_log(broker)).epoch
    assert await broker.read_after(WS, start) == [sent]


async def test_read_after_gives_every_later_event_in_order(broker: Broker, clock: ManualClock) -> None:
    start = await start_of_log(broker)
    sent = []
    for n in range(12):
        sent.append(await broker.append(WS, "doc.updated", actor("svc"), {"n": n}))
        if n % 3 == 0:
            clock.advance(0.001)
    ids = [EventId.parse(event.id).entry for event in sent]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert [e.data["n"] for e in await broker.read_after(WS, start)] == list(range(12))
    assert await broker.read_after(WS, EventId.parse(sent[4].id)) == sent[5:]
    assert await broker.read_after(WS, EventId.parse(sent[-1].id)) == []


async def test_workspaces_have_separate_logs(broker: Broker) -> None:
    start = await start_of_log(broker, OTHER_WS)
    await broker.append(WS, "doc.updated", actor("svc"), {})
    assert await broker.read_after(OTHER_WS, start) == []


async def test_an_id_of_another_epoch_is_gone(broker: Broker) -> None:
    sent = await broker.append(WS, "doc.updated", actor("svc"), {})
    entry = EventId.parse(sent.id).entry
    with pytest.raises(HistoryGone):
        await broker.read_after(WS, EventId("otherepoch", entry))
    with pytest.raises(HistoryGone):
        await broker.read_after(WS, EventId("otherepoch", EntryId(0, 0)))


async def test_an_id_newer_than_the_log_is_gone(broker: Broker) -> None:
    sent = EventId.parse((await broker.append(WS, "doc.updated", actor("svc"), {})).id)
    with pytest.raises(HistoryGone):
        await broker.read_after(WS, EventId(sent.epoch, EntryId(sent.entry.ms + 1, 0)))
    with pytest.raises(HistoryGone):
        await broker.read_after(WS, EventId(sent.epoch, EntryId(sent.entry.ms, sent.entry.seq + 1)))


async def test_history_trimmed_by_count_is_gone_and_the_retained_part_is_whole(
    brokers_with: Callable[..., Any],
) -> None:
    broker = await brokers_with(history_max_len=10)
    start = await start_of_log(broker)
    sent = [await broker.append(WS, "doc.updated", actor("svc"), {"n": n}) for n in range(300)]
    with pytest.raises(HistoryGone):
        await broker.read_after(WS, start)
    with pytest.raises(HistoryGone):
        await broker.read_after(WS, EventId.parse(sent[0].id))
    # At least the last max_len events are always kept, and resuming inside them works.
    assert await broker.read_after(WS, EventId.parse(sent[-11].id)) == sent[-10:]


async def test_history_older_than_max_age_is_gone(
    brokers_with: Callable[..., Any], clock: ManualClock
) -> None:
    broker = await brokers_with(history_max_age=60.0)
    start = await start_of_log(broker)
    old = [await broker.append(WS, "doc.updated", actor("svc"), {"n": n}) for n in range(3)]
    clock.advance(30)
    assert await broker.read_after(WS, start) == old
    clock.advance(31)  # the old events are past max_age now, even with no append since
    with pytest.raises(HistoryGone):
        await broker.read_after(WS, EventId.parse(old[0].id))
    new = await broker.append(WS, "doc.updated", actor("svc"), {"n": 3})
    with pytest.raises(HistoryGone):
        await broker.read_after(WS, start)
    # Nothing after the newest expired event is missing: resuming from it is fine.
    assert await broker.read_after(WS, EventId.parse(old[-1].id)) == [new]


# -- idempotent publishing (SPEC §8) ---------------------------------------------------


async def test_a_retry_with_the_same_key_answers_the_original_and_appends_nothing(
    broker: Broker,
) -> None:
    start = await start_of_log(broker)
    first = await broker.append(WS, "doc.updated", actor("svc"), {"n": 1, "é": "ü"}, "key-1")
    # The retry's body does not matter: the key names the publish it repeats.
    again = await broker.append(WS, "doc.updated", actor("svc"), {"n": 2}, "key-1")
    assert again == first
    other = await broker.append(WS, "doc.updated", actor("svc"), {"n": 3}, "key-2")
    unkeyed = await broker.append(WS, "doc.updated", actor("svc"), {"n": 4})
    assert await broker.read_after(WS, start) == [first, other, unkeyed]


async def test_concurrent_retries_of_one_key_append_once(broker: Broker) -> None:
    start = await start_of_log(broker)
    answers = await asyncio.gather(*(
        broker.append(WS, "doc.updated", actor("svc"), {"try": n}, "same") for n in range(20)))
    assert len({answer.id for answer in answers}) == 1
    assert await broker.read_after(WS, start) == [answers[0]]


async def test_an_idempotency_key_belongs_to_its_workspace(broker: Broker) -> None:
    here = await broker.append(WS, "doc.updated", actor("svc"), {}, "key")
    there = await broker.append(OTHER_WS, "doc.updated", actor("svc"), {}, "key")
    assert (here.workspace_id, there.workspace_id) == ("ws-1", "ws-2")


async def test_an_idempotency_key_belongs_to_its_publisher(broker: Broker) -> None:
    start = await start_of_log(broker)
    mine = await broker.append(WS, "doc.updated", actor("alice"), {"secret": 1}, "key")
    # Another publisher sending the same key publishes its own event, and learns nothing.
    theirs = await broker.append(WS, "doc.updated", actor("mallory"), {}, "key")
    service = await broker.append(WS, "doc.updated", {"type": "service", "id": "alice"}, {}, "key")
    assert len({mine.id, theirs.id, service.id}) == 3 and theirs.data == {}
    assert await broker.append(WS, "doc.updated", actor("alice"), {}, "key") == mine
    assert await broker.read_after(WS, start) == [mine, theirs, service]


async def test_an_idempotency_key_is_forgotten_after_its_ttl(
    brokers_with: Callable[..., Any], clock: ManualClock
) -> None:
    broker = await brokers_with(idempotency_ttl=0.2)
    start = await start_of_log(broker)
    first = await broker.append(WS, "doc.updated", actor("svc"), {"n": 1}, "key")
    clock.advance(0.3)  # the embedded backend's clock; Redis expires keys on its own
    await asyncio.sleep(0.3)
    second = await broker.append(WS, "doc.updated", actor("svc"), {"n": 2}, "key")
    assert second != first
    assert await broker.read_after(WS, start) == [first, second]


# -- presence ------------------------------------------------------------------


async def test_a_user_with_several_sessions_joins_once_and_leaves_at_the_last(
    broker: Broker, clock: ManualClock
) -> None:
    start = await start_of_log(broker)
    first = await broker.change_presence(WS, "u1", session_join("u1", actor("u1"), "s1", NODE))
    second = await broker.change_presence(WS, "u1", session_join("u1", actor("u1"), "s2", NODE))
    third = await broker.change_presence(WS, "u1", session_join("u1", actor("u1"), "s3", NODE))
    assert types(first.events) == [PRESENCE_JOINED]
    assert first.events[0].data["user_id"] == "u1"
    assert first.events[0].actor == actor("u1")
    assert second.events == () and third.events == ()
    assert second.record is not None and len(second.record.sessions) == 2

    assert (await broker.change_presence(WS, "u1", session_leave("s1"))).events == ()
    assert (await broker.change_presence(WS, "u1", session_leave("s2"))).events == ()
    last = await broker.change_presence(WS, "u1", session_leave("s3"))
    assert last.record is None
    assert types(last.events) == [PRESENCE_LEFT]
    assert last.events[0].data == {"user_id": "u1", "reason": "leave"}

    logged = await broker.read_after(WS, start)
    assert logged == [*first.events, *last.events]
    assert (await broker.presence_snapshot(WS)).members == {}


async def test_viewing_changes_are_events_and_repeats_are_not(broker: Broker) -> None:
    doc = Resource("document", "doc-1")
    joined = await broker.change_presence(WS, "u1", session_join("u1", actor("u1"), "s1", NODE))
    viewing = await broker.change_presence(
        WS, "u1", session_viewing("u1", actor("u1"), "s1", NODE, doc))
    assert types(viewing.events) == [PRESENCE_VIEWING]
    assert viewing.events[0].data["viewing"] == [doc.to_dict()]
    again = await broker.change_presence(
        WS, "u1", session_viewing("u1", actor("u1"), "s1", NODE, doc))
    assert again.events == ()
    snapshot = await broker.presence_snapshot(WS)
    assert snapshot.members["u1"]["viewing"] == [doc.to_dict()]
    assert snapshot.members["u1"]["joined_at"] == joined.events[0].data["joined_at"]
    assert str(snapshot.position) == viewing.events[0].id


async def test_rest_presence_joins_refreshes_and_leaves(broker: Broker) -> None:
    touch = rest_touch("u1", actor("u1"), NODE, 30.0)
    assert types((await broker.change_presence(WS, "u1", touch)).events) == [PRESENCE_JOINED]
    assert (await broker.change_presence(WS, "u1", touch)).events == ()
    left = await broker.change_presence(WS, "u1", rest_leave())
    assert types(left.events) == [PRESENCE_LEFT] and left.events[0].data["reason"] == "leave"
    assert (await broker.change_presence(WS, "u1", rest_leave())).events == ()


async def test_snapshot_and_log_agree(broker: Broker) -> None:
    start = await start_of_log(broker)
    await broker.change_presence(WS, "u1", rest_touch("u1", actor("u1"), NODE, 30.0))
    await broker.append(WS, "doc.updated", actor("svc"), {})
    await broker.change_presence(WS, "u2", session_join("u2", actor("u2"), "s9", NODE))
    snapshot = await broker.presence_snapshot(WS)
    logged = await broker.read_after(WS, start)
    assert str(snapshot.position) == logged[-1].id
    assert sorted(snapshot.members) == ["u1", "u2"]
    assert await broker.read_after(WS, snapshot.position) == []


async def test_sweep_expires_rest_presence_on_the_clock(broker: Broker, clock: ManualClock) -> None:
    start = await start_of_log(broker)
    await broker.change_presence(WS, "u1", rest_touch("u1", actor("u1"), NODE, 30.0))
    await broker.change_presence(WS, "u2", rest_touch("u2", actor("u2"), NODE, 90.0))
    clock.advance(29)
    assert await broker.sweep() == 0
    assert sorted((await broker.presence_snapshot(WS)).members) == ["u1", "u2"]
    clock.advance(2)
    assert await broker.sweep() == 1
    assert sorted((await broker.presence_snapshot(WS)).members) == ["u2"]
    left = [e for e in await broker.read_after(WS, start) if e.type == PRESENCE_LEFT]
    assert [e.data for e in left] == [{"user_id": "u1", "reason": "expired"}]
    clock.advance(60)
    assert await broker.sweep() == 1
    assert (await broker.presence_snapshot(WS)).members == {}
    assert await broker.sweep() == 0


async def test_an_open_stream_keeps_rest_presence_then_grace_applies(
    broker: Broker, clock: ManualClock
) -> None:
    await broker.change_presence(WS, "u1", rest_touch("u1", actor("u1"), NODE, 30.0))
    await broker.change_presence(WS, "u1", stream_opened("u1", actor("u1"), NODE))
    clock.advance(100)
    assert await broker.sweep() == 0
    assert "u1" in (await broker.presence_snapshot(WS)).members
    closed = await broker.change_presence(WS, "u1", stream_closed(NODE, 5.0))
    assert closed.events == ()
    clock.advance(4)
    await broker.sweep()
    assert "u1" in (await broker.presence_snapshot(WS)).members
    # Reopened within the grace: no flicker, and it is kept again.
    await broker.change_presence(WS, "u1", stream_opened("u1", actor("u1"), "node-other"))
    clock.advance(10)
    await broker.sweep()
    assert "u1" in (await broker.presence_snapshot(WS)).members
    await broker.change_presence(WS, "u1", stream_closed("node-other", 5.0))
    clock.advance(6)
    assert await broker.sweep() == 1
    assert (await broker.presence_snapshot(WS)).members == {}


async def test_bindings_of_this_node_are_known(broker: Broker) -> None:
    await broker.change_presence(WS, "u1", session_join("u1", actor("u1"), "s1", NODE))
    await broker.change_presence(WS, "u2", stream_opened("u2", actor("u2"), NODE))
    await broker.change_presence(WS, "u3", rest_touch("u3", actor("u3"), NODE, 30.0))
    await broker.change_presence(OTHER_WS, "u4", session_join("u4", actor("u4"), "s4", "elsewhere"))
    assert await broker.bound_to_node() == {(WS, "u1"), (WS, "u2")}
    await broker.change_presence(WS, "u1", session_leave("s1"))
    await broker.change_presence(WS, "u2", stream_closed(NODE, 5.0))
    assert await broker.bound_to_node() == set()


# -- live tails ----------------------------------------------------------------


async def _collect(broker: Broker, after: EventId, count: int) -> list[Envelope]:
    got: list[Envelope] = []
    async for batch in tail(broker, WS, after):
        got.extend(batch)
        if len(got) >= count:
            return got
    return got


async def test_tail_delivers_appended_events_in_order(broker: Broker) -> None:
    start = await start_of_log(broker)
    early = await broker.append(WS, "doc.created", actor("svc"), {"n": 0})
    reader = asyncio.create_task(_collect(broker, start, 8))
    await asyncio.sleep(0.05)
    sent = [early]
    for n in range(1, 6):
        sent.append(await broker.append(WS, "doc.updated", actor("svc"), {"n": n}))
    sent.extend((await broker.change_presence(
        WS, "u1", session_join("u1", actor("u1"), "s1", NODE))).events)
    sent.extend((await broker.change_presence(WS, "u1", session_leave("s1"))).events)
    got = await asyncio.wait_for(reader, 10)
    assert got == sent


async def test_tail_from_a_lost_position_raises_history_gone(broker: Broker) -> None:
    await broker.append(WS, "doc.updated", actor("svc"), {})
    position = await start_of_log(broker)
    with pytest.raises(HistoryGone):
        await asyncio.wait_for(_collect(broker, EventId("otherepoch", position.entry), 1), 10)


# -- tickets -------------------------------------------------------------------


async def test_tickets_are_single_use(broker: Broker) -> None:
    await broker.put_ticket("t-1", {"user_id": "u1", "n": [1, 2]}, 30.0)
    assert await broker.take_ticket("t-1") == {"user_id": "u1", "n": [1, 2]}
    assert await broker.take_ticket("t-1") is None
    assert await broker.take_ticket("never-issued") is None


async def test_tickets_expire(broker: Broker, clock: ManualClock) -> None:
    await broker.put_ticket("t-2", {"user_id": "u1"}, 10.0)
    await broker.put_ticket("t-3", {"user_id": "u1"}, 60.0)
    clock.advance(11)
    assert await broker.take_ticket("t-2") is None
    assert await broker.take_ticket("t-3") == {"user_id": "u1"}
