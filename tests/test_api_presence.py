"""Presence on one node as users see it: one member per user, TTL, stream keep-alive, grace."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from gateway.auth import Identity
from gateway.handlers.common import GATEWAY
from protocol.envelope import WorkspaceKey
from tests.conftest import BASE, ORG, WORKSPACE, auth
from tests.sse_client import SSEReader

KEY = WorkspaceKey(ORG, WORKSPACE)


async def watch(client, token):
    """A stream held by an observer; returns the reader positioned after the snapshot."""
    response = await client.get(f"{BASE}/stream", headers=auth(token("observer")))
    reader = SSEReader(response)
    snapshot = await reader.next()
    assert snapshot.event == "sync.snapshot"
    return response, reader


async def members(client, token, query=""):
    response = await client.get(f"{BASE}/presence{query}", headers=auth(token("observer")))
    assert response.status == 200
    return await response.json()


async def no_event(reader, client, token):
    """Nothing pending: a marker event published now arrives next."""
    await client.post(f"{BASE}/events", json={"type": "test.marker"}, headers=auth(token()))
    event = await reader.next()
    assert event.event == "test.marker", f"unexpected {event.event}: {event.data}"


async def test_join_answers_the_callers_presence_and_emits_joined(client, token):
    _, reader = await watch(client, token)
    response = await client.post(f"{BASE}/presence/join",
                                 headers=auth(token("alice", name="Alice")))
    assert response.status == 200
    body = await response.json()
    assert body["user_id"] == "alice" and body["present"] is True and body["sessions"] == 1
    assert body["viewing"] == []
    assert body["actor"] == {"type": "user", "id": "alice", "name": "Alice"}
    event = await reader.next()
    assert event.event == "presence.joined"
    assert event.envelope["actor"] == {"type": "user", "id": "alice", "name": "Alice"}
    assert event.envelope["data"]["user_id"] == "alice"
    snapshot = await members(client, token)
    assert [m["user_id"] for m in snapshot["members"]] == ["alice"]
    assert snapshot["last_event_id"] == event.id


async def test_join_twice_is_one_member_one_event(client, token):
    _, reader = await watch(client, token)
    for _ in range(3):
        await client.post(f"{BASE}/presence/join", headers=auth(token("alice")))
    assert (await reader.next()).event == "presence.joined"
    await no_event(reader, client, token)


async def test_three_sessions_of_one_user_are_one_member(client, token):
    gateway = client.app[GATEWAY]
    identity = gateway.verifier.verify(token("alice"))
    assert isinstance(identity, Identity)
    _, reader = await watch(client, token)
    await client.post(f"{BASE}/presence/join", headers=auth(token("alice")))
    await gateway.session_join(identity, KEY, "tab-1")
    await gateway.session_join(identity, KEY, "tab-2")
    assert (await reader.next()).event == "presence.joined"
    assert len((await members(client, token))["members"]) == 1
    left = await client.post(f"{BASE}/presence/leave", headers=auth(token("alice")))
    assert (await left.json())["present"] is True  # two tabs remain
    await gateway.session_leave(identity, KEY, "tab-1")
    await no_event(reader, client, token)
    await gateway.session_leave(identity, KEY, "tab-2")
    event = await reader.next()
    assert event.event == "presence.left"
    assert event.envelope["data"] == {"user_id": "alice", "reason": "leave"}
    assert (await members(client, token))["members"] == []


async def test_leave_without_join_changes_nothing(client, token):
    _, reader = await watch(client, token)
    response = await client.post(f"{BASE}/presence/leave", headers=auth(token("alice")))
    assert await response.json() == {"user_id": "alice", "present": False, "viewing": [],
                                     "sessions": 0}
    await no_event(reader, client, token)


async def test_viewing_emits_only_on_change_and_filters_presence(client, token):
    _, reader = await watch(client, token)
    url = f"{BASE}/presence/viewing?resource_type=document&resource_id=d1"
    response = await client.post(url, headers=auth(token("alice")))
    assert (await response.json())["viewing"] == [{"resource_type": "document", "resource_id": "d1"}]
    # viewing creates the session: joined carries what is viewed
    joined = await reader.next()
    assert joined.event == "presence.joined"
    assert joined.envelope["data"]["viewing"] == [{"resource_type": "document", "resource_id": "d1"}]
    await client.post(url, headers=auth(token("alice")))
    await no_event(reader, client, token)
    await client.post(f"{BASE}/presence/viewing?resource_type=document&resource_id=d2",
                      headers=auth(token("alice")))
    changed = await reader.next()
    assert changed.event == "presence.viewing"
    assert changed.envelope["data"]["viewing"] == [{"resource_type": "document", "resource_id": "d2"}]
    await client.post(f"{BASE}/presence/join", headers=auth(token("bob")))
    await reader.next()
    d2 = await members(client, token, "?resource_type=document&resource_id=d2")
    assert [m["user_id"] for m in d2["members"]] == ["alice"]
    d1 = await members(client, token, "?resource_type=document&resource_id=d1")
    assert d1["members"] == []
    everyone = await members(client, token)
    assert [m["user_id"] for m in everyone["members"]] == ["alice", "bob"]


async def test_two_tabs_viewing_two_documents(client, token):
    gateway = client.app[GATEWAY]
    from gateway.presence import Resource

    alice = gateway.verifier.verify(token("alice"))
    await gateway.session_viewing(alice, KEY, "tab-1", Resource("document", "d1"))
    await gateway.session_viewing(alice, KEY, "tab-2", Resource("document", "d2"))
    for doc in ("d1", "d2"):
        viewers = await members(client, token, f"?resource_type=document&resource_id={doc}")
        assert [m["user_id"] for m in viewers["members"]] == ["alice"]
    await gateway.session_leave(alice, KEY, "tab-2")
    assert (await members(client, token, "?resource_type=document&resource_id=d2"))["members"] == []


async def test_rest_session_expires_after_ttl(client, token, clock):
    _, reader = await watch(client, token)
    await client.post(f"{BASE}/presence/join", headers=auth(token("alice")))
    assert (await reader.next()).event == "presence.joined"
    clock.advance(29)
    await no_event(reader, client, token)
    await client.post(f"{BASE}/presence/join", headers=auth(token("alice")))  # refresh
    clock.advance(29)
    await no_event(reader, client, token)
    clock.advance(2)
    event = await reader.next()
    assert event.event == "presence.left"
    assert event.envelope["data"] == {"user_id": "alice", "reason": "expired"}


async def close_and_wait(client, token, response, subscribers_left: int) -> None:
    """Close a stream and wait until the node has let go of it (it notices on its next write)."""
    response.close()
    feed = client.app[GATEWAY].hub.existing_feed(KEY)
    for _ in range(100):
        if feed.subscriber_count == subscribers_left:
            return
        await client.post(f"{BASE}/events", json={"type": "test.tick"}, headers=auth(token()))
        await asyncio.sleep(0.01)
    raise AssertionError("the node never noticed the closed stream")


async def next_presence(reader):
    """The next presence event, skipping ticks and markers."""
    while True:
        event = await reader.next()
        if not event.event.startswith("test."):
            return event


async def test_open_stream_keeps_the_rest_session_then_grace(client, token, clock):
    _, observer = await watch(client, token)
    mine = await client.get(f"{BASE}/stream", headers=auth(token("alice")))
    await SSEReader(mine).next()
    await client.post(f"{BASE}/presence/join", headers=auth(token("alice")))
    assert (await observer.next()).event == "presence.joined"
    clock.advance(300)  # ten TTLs: the open stream keeps alice present
    await no_event(observer, client, token)
    await close_and_wait(client, token, mine, subscribers_left=1)
    clock.advance(4)  # within disconnect_grace (5 s)
    await client.post(f"{BASE}/events", json={"type": "x.done"}, headers=auth(token()))
    assert (await next_presence(observer)).event == "x.done"
    clock.advance(2)
    left = await next_presence(observer)
    assert left.event == "presence.left"
    assert left.envelope["data"] == {"user_id": "alice", "reason": "expired"}


async def test_a_closed_stream_is_let_go_of_at_once_with_nothing_written_to_it(client, token):
    """No event and no keep-alive is due (15 s): the node still notices the client gone, and
    the user's stream hold ends (presence.left after the grace) without waiting for a write."""
    _, observer = await watch(client, token)
    mine = await client.get(f"{BASE}/stream", headers=auth(token("alice")))
    await SSEReader(mine).next()
    feed = client.app[GATEWAY].hub.existing_feed(KEY)
    assert feed.subscriber_count == 2
    mine.close()
    async with asyncio.timeout(3):
        while feed.subscriber_count != 1:  # noqa: ASYNC110 (the node changes on its own)
            await asyncio.sleep(0.01)
    text = await (await client.get("/metrics")).text()
    assert 'gateway_connections{transport="sse"} 1.0' in text


async def test_reconnect_within_grace_shows_no_flicker(client, token, clock):
    _, observer = await watch(client, token)
    first = await client.get(f"{BASE}/stream", headers=auth(token("alice")))
    await SSEReader(first).next()
    await client.post(f"{BASE}/presence/join", headers=auth(token("alice")))
    assert (await observer.next()).event == "presence.joined"
    await close_and_wait(client, token, first, subscribers_left=1)
    clock.advance(3)
    again = await client.get(f"{BASE}/stream", headers=auth(token("alice")))  # page reload
    await SSEReader(again).next()
    clock.advance(600)
    await client.post(f"{BASE}/events", json={"type": "x.done"}, headers=auth(token()))
    assert (await next_presence(observer)).event == "x.done"
    assert [m["user_id"] for m in (await members(client, token))["members"]] == ["alice"]
    again.close()


async def test_stream_alone_does_not_make_a_member(client, token, clock):
    _, observer = await watch(client, token)
    mine = await client.get(f"{BASE}/stream", headers=auth(token("alice")))
    await SSEReader(mine).next()
    assert [m["user_id"] for m in (await members(client, token))["members"]] == []
    await no_event(observer, client, token)
    mine.close()


async def test_leave_is_immediate_even_with_an_open_stream(client, token):
    _, observer = await watch(client, token)
    mine = await client.get(f"{BASE}/stream", headers=auth(token("alice")))
    await SSEReader(mine).next()
    await client.post(f"{BASE}/presence/join", headers=auth(token("alice")))
    assert (await observer.next()).event == "presence.joined"
    await client.post(f"{BASE}/presence/leave", headers=auth(token("alice")))
    left = await observer.next()
    assert left.envelope["data"] == {"user_id": "alice", "reason": "leave"}
    mine.close()


async def test_published_event_carries_actor_and_data(client, token):
    _, observer = await watch(client, token)
    response = await client.post(
        f"{BASE}/events", json={"type": "doc.updated", "data": {"doc": "d1", "rev": 7}},
        headers=auth(token("billing", kind="service")))
    published = await response.json()
    event = await observer.next()
    assert event.envelope == published
    assert published["actor"] == {"type": "service", "id": "billing"}
    assert published["data"] == {"doc": "d1", "rev": 7}
    assert published["type"] == "doc.updated"


async def test_presence_read_your_writes_on_a_fresh_node(app_factory, settings, token):
    client = await app_factory(replace(settings, node_id="fresh"))
    await client.post(f"{BASE}/presence/join", headers=auth(token("alice")))
    assert [m["user_id"] for m in (await members(client, token))["members"]] == ["alice"]
    await client.post(f"{BASE}/presence/join", headers=auth(token("bob")))
    assert [m["user_id"] for m in (await members(client, token))["members"]] == ["alice", "bob"]
    await client.post(f"{BASE}/presence/leave", headers=auth(token("alice")))
    assert [m["user_id"] for m in (await members(client, token))["members"]] == ["bob"]


async def test_health_endpoints(client):
    health = await client.get("/healthz")
    assert health.status == 200 and (await health.json())["status"] == "ok"
    ready = await client.get("/readyz")
    assert ready.status == 200 and (await ready.json())["status"] == "ready"
    metrics = await client.get("/metrics")
    assert "gateway_connections" in await metrics.text()


async def test_a_lingering_socket_session_expires_even_while_the_user_streams(client, token, clock):
    """A drained socket's session is kept for the grace only; an SSE stream of the same user
    keeps the REST session alive, not that one."""
    gateway = client.app[GATEWAY]
    alice = gateway.verifier.verify(token("alice"))
    _, observer = await watch(client, token)
    mine = await client.get(f"{BASE}/stream", headers=auth(token("alice")))
    await SSEReader(mine).next()
    await gateway.session_join(alice, KEY, "tab-1")
    assert (await observer.next()).event == "presence.joined"
    await gateway.session_linger(alice, KEY, "tab-1")  # its node drains
    clock.advance(4)
    await no_event(observer, client, token)
    clock.advance(2)
    left = await next_presence(observer)
    assert left.envelope["data"] == {"user_id": "alice", "reason": "expired"}
    mine.close()


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_metrics_count_what_happened(client, token):
    response, reader = await watch(client, token)
    await client.post(f"{BASE}/presence/join", headers=auth(token("alice")))
    await client.post(f"{BASE}/events", json={"type": "doc.updated"}, headers=auth(token()))
    await reader.events(2)
    text = await (await client.get("/metrics")).text()
    assert _metric(text, 'gateway_connections{transport="sse"}') == 1
    assert _metric(text, "gateway_events_published_total") == 1
    # Every event written counts, on SSE as on WebSocket: the snapshot, the join, the update.
    assert _metric(text, 'gateway_events_delivered_total{transport="sse"}') == 3
    assert _metric(text, "gateway_presence_members") == 1
    assert _metric(text, "gateway_presence_local_holdings") == 1  # the observer's stream
    assert _metric(text, 'gateway_backend_seconds_count{op="presence"}') >= 1
    assert _metric(text, 'gateway_backend_seconds_count{op="append"}') == 1
    response.close()


async def test_feeds_made_for_presence_reads_are_let_go(client, token):
    hub = client.app[GATEWAY].hub
    for n in range(5):
        url = f"/v1/orgs/{ORG}/workspaces/w{n}/sync/presence"
        assert (await client.get(url, headers=auth(token(workspaces="*")))).status == 200
    assert all(hub.existing_feed(WorkspaceKey(ORG, f"w{n}")) for n in range(5))
    await hub.reap_idle(0)
    assert not any(hub.existing_feed(WorkspaceKey(ORG, f"w{n}")) for n in range(5))


# -- a stream of a user who is not present defers its hold ----------------------------------


async def test_a_stream_of_a_user_who_is_not_present_writes_nothing_to_the_backend(
    app_factory, settings, token, broker
):
    """An open stream only keeps a REST session alive: for a user who has none (not present),
    opening and closing it changes nothing in the backend, and costs no write."""
    client = await app_factory(settings, broker=broker)
    _, observer = await watch(client, token)
    writes = []
    change_presence = broker.change_presence

    async def counting(*args, **kwargs):
        writes.append(args[:2])
        return await change_presence(*args, **kwargs)

    broker.change_presence = counting
    try:
        streams = [await client.get(f"{BASE}/stream", headers=auth(token("bob")))
                   for _ in range(2)]
        for stream in streams:
            assert (await SSEReader(stream).next()).event == "sync.snapshot"
        for left, stream in enumerate(streams, start=1):
            await close_and_wait(client, token, stream, subscribers_left=3 - left)
        assert writes == []
        assert client.app[GATEWAY].holdings.get(KEY, "bob") is None
    finally:
        broker.change_presence = change_presence
    await client.post(f"{BASE}/events", json={"type": "x.done"}, headers=auth(token()))
    assert (await next_presence(observer)).event == "x.done"  # no presence event meanwhile


async def test_a_stream_opened_before_the_user_joins_on_another_node_keeps_the_session(
    app_factory, settings, token, clock, broker
):
    """The deferred hold is written once the stream's node sees the user present, however
    they joined; from then on it keeps the REST session alive, and its close ends it after
    the grace, as any stream's."""
    node_a = await app_factory(replace(settings, node_id="node-a"), broker=broker)
    node_b = await app_factory(replace(settings, node_id="node-b"), broker=broker)
    _, observer = await watch(node_a, token)
    mine = await node_a.get(f"{BASE}/stream", headers=auth(token("alice")))
    await SSEReader(mine).next()
    assert (await node_b.post(f"{BASE}/presence/join", headers=auth(token("alice")))).status == 200
    assert (await observer.next()).event == "presence.joined"
    holdings = node_a.app[GATEWAY].holdings
    async with asyncio.timeout(5):  # the hold is written in the background
        while (holding := holdings.get(KEY, "alice")) is None or holding.streams != 1 \
                or node_a.app[GATEWAY]._promotions:  # noqa: ASYNC110 (the node writes it)
            await asyncio.sleep(0.01)
    clock.advance(300)  # ten TTLs: the stream keeps alice present
    await broker.sweep()
    assert "alice" in (await broker.presence_snapshot(KEY)).members
    await close_and_wait(node_a, token, mine, subscribers_left=1)
    clock.advance(settings.disconnect_grace + 1)
    await broker.sweep()
    assert "alice" not in (await broker.presence_snapshot(KEY)).members
    left = await next_presence(observer)
    assert left.event == "presence.left"
    assert left.envelope["data"] == {"user_id": "alice", "reason": "expired"}
