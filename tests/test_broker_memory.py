"""What only the embedded backend has to get right: it hands its own objects around."""

from __future__ import annotations

import asyncio

from gateway.broker_memory import MemoryBroker
from gateway.hub import Hub, Outbox, encoded
from protocol.envelope import ZERO, Envelope, EventId, WorkspaceKey

WS = WorkspaceKey("org-1", "ws-1")


async def test_encodings_of_delivered_events_are_not_pinned_to_the_retained_history() -> None:
    broker = MemoryBroker(history_max_len=100)
    hub = Hub(broker)
    feed = await hub.feed(WS)
    outbox = Outbox(10)
    feed.attach(outbox)
    await asyncio.sleep(0)  # the feed catches up and goes live
    await broker.append(WS, "doc.updated", {"type": "service", "id": "x"}, {"blob": "y" * 10_000})
    delivered = await asyncio.wait_for(outbox.next(), 1)
    assert isinstance(delivered, Envelope)
    encoded(delivered, "sse", lambda envelope: envelope.id.encode() * 1000)  # as a transport does
    [retained] = await broker.read_after(WS, EventId(broker.epoch, ZERO))
    assert retained == delivered
    assert all(not envelope._encoded for _, envelope in broker._logs[WS].entries)
    await hub.close()
