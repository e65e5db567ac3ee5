"""What only the embedded backend has to get right: it hands its own objects around."""

from __future__ import annotations

import asyncio

import pytest

from gateway.broker import HistoryGone
from gateway.broker_memory import MemoryBroker
from gateway.clock import ManualClock
from gateway.hub import Hub
from gateway.presence import session_join, session_leave
from gateway.transports import SSE_CHUNKED
from protocol.envelope import ZERO, Envelope, EventId, WorkspaceKey

WS = WorkspaceKey("org-1", "ws-1")


class Recorder:
    """A subscriber as the feed sees it (``deliver``/``resync``), keeping what it is handed."""

    def __init__(self) -> None:
        self.batches: asyncio.Queue[list[Envelope]] = asyncio.Queue()
        self.delivered = self  # its own metrics counter

    def deliver(self, batch: list[Envelope]) -> int:
        self.batches.put_nowait(batch)
        return len(batch)

    def resync(self, snapshot: Envelope) -> None:
        raise AssertionError("no history is lost here")

    def inc(self, amount: float = 1) -> None:
        pass


async def test_encodings_of_delivered_events_are_not_pinned_to_the_retained_history() -> None:
    broker = MemoryBroker(history_max_len=100)
    hub = Hub(broker)
    feed = await hub.feed(WS)
    recorder = Recorder()
    feed.attach(recorder)  # type: ignore[arg-type]
    await asyncio.sleep(0)  # the feed catches up and goes live
    await broker.append(WS, "doc.updated", {"type": "service", "id": "x"}, {"blob": "y" * 10_000})
    [delivered] = await asyncio.wait_for(recorder.batches.get(), 1)
    assert SSE_CHUNKED.encoded(delivered)  # as a subscriber does: cached on the envelope
    assert delivered._encoded
    [retained] = await broker.read_after(WS, EventId(broker.epoch, ZERO))
    assert retained == delivered
    assert all(not envelope._encoded for _, envelope in broker._logs[WS].entries)
    await hub.close()


# -- the embedded backend forgets what nothing needs -----------------------------------

SERVICE = {"type": "service", "id": "svc"}


async def test_workspaces_only_read_leave_nothing_once_their_feeds_are_reaped() -> None:
    clock = ManualClock()
    broker = MemoryBroker(clock=clock)
    hub = Hub(broker)
    for n in range(2_000):  # presence reads of distinct ids, as a crawler would make
        await hub.feed(WorkspaceKey("org-1", f"ws-{n}"))
    await asyncio.sleep(0)
    await hub.reap_idle(0)
    await broker.sweep()
    assert broker._logs == {} and broker._expiring == {}


async def test_an_idle_log_is_kept_for_max_age_then_forgotten() -> None:
    clock = ManualClock()
    broker = MemoryBroker(clock=clock, history_max_age=60, idempotency_ttl=30)
    start = (await broker.presence_snapshot(WS)).position
    sent = await broker.append(WS, "doc.updated", SERVICE, {"n": 1}, "key")
    clock.advance(59)
    await broker.sweep()
    assert await broker.read_after(WS, start) == [sent]  # still within max_age: resumable
    clock.advance(2)
    await broker.sweep()
    assert WS not in broker._logs
    with pytest.raises(HistoryGone):  # resuming from the forgotten log: sync.reset
        await broker.read_after(WS, EventId.parse(sent.id))
    later = await broker.append(WS, "doc.updated", SERVICE, {"n": 2}, "key")
    assert later != sent and EventId.parse(later.id).entry > EventId.parse(sent.id).entry


async def test_an_idempotency_key_keeps_its_log_past_max_age() -> None:
    clock = ManualClock()
    broker = MemoryBroker(clock=clock, history_max_age=10, idempotency_ttl=300)
    sent = await broker.append(WS, "doc.updated", SERVICE, {}, "key")
    clock.advance(299)
    await broker.sweep()
    assert await broker.append(WS, "doc.updated", SERVICE, {}, "key") == sent  # still a retry
    clock.advance(2)
    await broker.sweep()
    assert WS not in broker._logs


async def test_followed_logs_and_present_users_are_never_forgotten() -> None:
    clock = ManualClock()
    broker = MemoryBroker(clock=clock, history_max_age=10)
    hub = Hub(broker)
    followed, joined = WorkspaceKey("org-1", "followed"), WorkspaceKey("org-1", "joined")
    feed = await hub.feed(followed)
    feed.attach(Recorder())  # type: ignore[arg-type]
    await broker.append(followed, "doc.updated", SERVICE, {})
    await broker.change_presence(joined, "alice", session_join("alice", {"type": "user", "id": "alice"},
                                                               "s1", broker.node_id))
    clock.advance(3600)
    await broker.sweep()
    assert set(broker._logs) == {followed, joined}
    assert list((await broker.presence_snapshot(joined)).members) == ["alice"]
    await hub.close()
    await broker.change_presence(joined, "alice", session_leave("s1"))
    clock.advance(11)
    await broker.sweep()
    assert broker._logs == {}


async def test_a_feed_tells_who_becomes_present_by_a_join_or_in_a_resync() -> None:
    """What a deferred stream hold waits for (``Gateway._present``): a join the feed applies,
    and, after a history loss, every member of the fresh snapshot (a join it never saw)."""
    broker = MemoryBroker(history_max_len=100)
    hub = Hub(broker)
    present: list[tuple[WorkspaceKey, str]] = []
    hub.on_present = lambda workspace, user_id: present.append((workspace, user_id))
    feed = await hub.feed(WS)
    resyncs: list[Envelope] = []
    recorder = Recorder()
    recorder.resync = resyncs.append  # type: ignore[method-assign]
    feed.attach(recorder)  # type: ignore[arg-type]
    await asyncio.sleep(0)  # the feed goes live
    await broker.change_presence(WS, "alice", session_join("alice", {"type": "user", "id": "alice"},
                                                           "s1", broker.node_id))
    assert present == [(WS, "alice")]
    present.clear()
    feed.history_gone()
    async with asyncio.timeout(5):
        while not resyncs:  # noqa: ASYNC110 (the feed resyncs in the background)
            await asyncio.sleep(0.01)
    assert present == [(WS, "alice")]
    await hub.close()
