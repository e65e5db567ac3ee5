"""Issue 16: a caught-up follower reads nothing, and concurrent publishes are one append.

Counted from Redis's side: a ``MONITOR`` connection sees every script call of this test's
key prefix (the suite's redis-server is shared, so other tests' keys are left out). Real
RedisBrokers on the suite's redis-server; never a timing assertion."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgpack
import pytest
from redis.asyncio import Redis

from gateway.broker import tail
from gateway.broker_redis import RedisBroker
from gateway.presence import session_join, session_leave
from gateway.redis_follow import Notice
from protocol.envelope import EntryId, Envelope, EventId
from tests.conftest import BASE, ORG, WORKSPACE, auth, redis_url
from tests.redis_nodes import WS, actor, real_time_clock
from tests.wsclient import connect

pytestmark = pytest.mark.redis

clock = pytest.fixture(real_time_clock)
HERE = {"org_id": ORG, "workspace_id": WORKSPACE}


class Calls:
    """The script calls Redis runs on this test's keys, as ``MONITOR`` shows them."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.seen: list[str] = []

    def of(self, broker: RedisBroker, script: str) -> int:
        """How many calls of ``script`` ("read", "append", "presence") were seen."""
        sha = getattr(broker, f"_{script}").sha
        return sum(1 for command in self.seen
                   if command.startswith(("EVALSHA", "EVAL ")) and sha in command
                   and self.prefix in command)


@contextlib.asynccontextmanager
async def monitored(prefix: str) -> AsyncIterator[Calls]:
    calls = Calls(prefix)
    client = Redis.from_url(redis_url())
    async with client.monitor() as monitor:

        async def listen() -> None:
            async for command in monitor.listen():
                calls.seen.append(command["command"])

        listener = asyncio.create_task(listen())
        try:
            yield calls
            # Everything before this marker was run by Redis before it: the log is complete.
            marker = Redis.from_url(redis_url())
            await marker.echo(f"{prefix}-done")
            await marker.aclose()
            async with asyncio.timeout(10):
                while not any(f"{prefix}-done" in command for command in calls.seen):  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
        finally:
            listener.cancel()
            with contextlib.suppress(BaseException):
                await listener
    await client.aclose()


class Follower:
    """What one node's follower of WS received, in order."""

    def __init__(self, broker: RedisBroker, after: EventId) -> None:
        self.broker = broker
        self.got: list[Envelope] = []
        self._task = asyncio.create_task(self._run(after))

    async def _run(self, after: EventId) -> None:
        async for batch in tail(self.broker, WS, after):
            self.got.extend(batch)

    async def until(self, count: int, timeout: float = 10) -> list[Envelope]:
        async with asyncio.timeout(timeout):
            while len(self.got) < count:  # noqa: ASYNC110 (filled by the follower's task)
                await asyncio.sleep(0.01)
        return self.got

    async def settled(self) -> None:
        """Its subscription confirmed and the read that follows done."""
        reader = self.broker._reader
        async with asyncio.timeout(10):
            while reader.reads == 0 or reader._dirty or any(  # noqa: ASYNC110
                    f.reading for fs in reader._followers.values() for f in fs):
                await asyncio.sleep(0.01)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task


@pytest.fixture
async def follow() -> AsyncIterator[Callable[[RedisBroker], Any]]:
    started: list[Follower] = []

    async def make(broker: RedisBroker) -> Follower:
        follower = Follower(broker, (await broker.presence_snapshot(WS)).position)
        started.append(follower)
        await follower.settled()
        return follower

    yield make
    for follower in started:
        await follower.close()


def _ids(envelopes: list[Envelope]) -> list[str]:
    return [envelope.id for envelope in envelopes]


async def test_caught_up_followers_on_every_node_read_nothing_per_event(
    nodes: Callable[..., Any], follow: Callable[..., Any], prefix: str
) -> None:
    a: RedisBroker = await nodes("node-a")
    b: RedisBroker = await nodes("node-b")
    on_a, on_b = await follow(a), await follow(b)
    reads = a._reader.reads, b._reader.reads
    async with monitored(prefix) as calls:
        sent = [await a.append(WS, "doc.updated", actor("svc"), {"n": n}) for n in range(20)]
        sent += await asyncio.gather(*(b.append(WS, "doc.updated", actor("svc"), {"n": n})
                                       for n in range(20, 60)))
        for change in (session_join("ann", actor("ann"), "s1", "node-a"), session_leave("s1")):
            sent += (await a.change_presence(WS, "ann", change)).events
        got_a, got_b = await on_a.until(len(sent)), await on_b.until(len(sent))
    sent.sort(key=lambda envelope: EventId.parse(envelope.id).entry)
    assert _ids(got_a) == _ids(got_b) == _ids(sent)  # every event once, in log order
    assert got_a == sent
    assert [e.type for e in sent[-2:]] == ["presence.joined", "presence.left"]
    # Redis ran no read of the log for them: every event came with its notification.
    assert calls.of(a, "read") == 0
    assert (a._reader.reads, b._reader.reads) == reads
    assert b._reader.notices_delivered >= 3  # 20 alone, the group, the presence changes


async def test_a_follower_that_is_not_at_the_head_reads_and_misses_nothing(
    nodes: Callable[..., Any], follow: Callable[..., Any], raw: Redis, prefix: str
) -> None:
    a: RedisBroker = await nodes("node-a")
    b: RedisBroker = await nodes("node-b")
    on_b = await follow(b)
    log_key, channel = f"{prefix}:{{org-1:ws-1}}:log", f"{prefix}:{{org-1:ws-1}}:notify"
    sent = [await a.append(WS, "doc.updated", actor("svc"), {"n": 0})]
    await on_b.until(1)
    async with monitored(prefix) as calls:
        # A service's XADD with no notification: the next append's notice names it as the
        # entry before, which b never saw, so b reads both.
        await raw.xadd(log_key, {"type": "doc.updated", "actor": '{"type":"service","id":"billing"}',
                                 "data": '{"n":1}'})
        sent.append(await a.append(WS, "doc.updated", actor("svc"), {"n": 2}))
        await on_b.until(3)
        # Too large to carry (over 16 KiB): announced by id alone, read.
        sent.append(await a.append(WS, "doc.updated", actor("svc"), {"n": 3, "pad": "x" * 20_000}))
        await on_b.until(4)
        # What no append sent: junk, a notice that lies about the entries, one of another epoch.
        epoch = EventId.parse(sent[0].id).epoch
        last = EventId.parse(sent[-1].id).entry
        forged_fields = [b"type", b"doc.forged", b"actor", b'{"type":"service","id":"x"}',
                         b"data", b"{}", b"node", b"node-x"]
        for junk in (b"\x93\x01\x02\x03", b"\x94garbage", msgpack.packb(["x", "y", 1, []]),
                     msgpack.packb([epoch, str(last), 99, [[f"{last.ms}-0", forged_fields]]]),
                     msgpack.packb(["deadbeef", str(last), 99,
                                    [[f"{last.ms + 1}-0", forged_fields]]])):
            await raw.execute_command("SPUBLISH", channel, junk)
        sent.append(await a.append(WS, "doc.updated", actor("svc"), {"n": 4}))
        got = await on_b.until(5)
        await asyncio.sleep(0.2)  # (anything more that came would show below)
    assert [e.data["n"] for e in got] == [0, 1, 2, 3, 4]
    assert len(got) == 5 and not any(e.type == "doc.forged" for e in got)
    assert _ids(got[:1] + got[2:]) == _ids(sent)
    assert calls.of(b, "read") >= 2  # the unannounced entry and the large one were read
    assert await b.read_after(WS, EventId.parse(sent[0].id)) == got[1:]


async def test_concurrent_publishes_to_a_workspace_are_one_append(
    nodes: Callable[..., Any], follow: Callable[..., Any], prefix: str
) -> None:
    a: RedisBroker = await nodes("node-a")
    on_a = await follow(a)
    async with monitored(prefix) as calls:
        sent = await asyncio.gather(*(a.append(WS, "doc.updated", actor("svc"), {"n": n})
                                      for n in range(50)))
    assert calls.of(a, "append") == 1
    # Each caller got its own event, in the order they called, and the log says the same.
    assert [e.data["n"] for e in sent] == list(range(50))
    entries = [EventId.parse(e.id).entry for e in sent]
    assert entries == sorted(set(entries))
    assert await on_a.until(50) == sent
    # A batch holds at most 64: 100 at once are two appends.
    async with monitored(prefix) as calls:
        more = await asyncio.gather(*(a.append(WS, "doc.updated", actor("svc"), {"n": n})
                                      for n in range(100)))
    assert calls.of(a, "append") == 2
    assert (await on_a.until(150))[50:] == more


async def test_each_publish_of_a_batch_gets_its_own_idempotency_outcome(
    nodes: Callable[..., Any], follow: Callable[..., Any], raw: Redis, prefix: str
) -> None:
    a: RedisBroker = await nodes("node-a")
    on_a = await follow(a)
    first = await a.append(WS, "doc.created", actor("svc"), {"n": 0}, "k1")
    async with monitored(prefix) as calls:
        retry, new, again, plain, other = await asyncio.gather(
            a.append(WS, "doc.created", actor("svc"), {"n": 0}, "k1"),  # a retry of the first
            a.append(WS, "doc.created", actor("svc"), {"n": 1}, "k2"),
            a.append(WS, "doc.created", actor("svc"), {"n": 1}, "k2"),  # the same, in one batch
            a.append(WS, "doc.created", actor("svc"), {"n": 2}),
            a.append(WS, "doc.created", actor("bot"), {"n": 3}, "k2"),  # another publisher's k2
        )
    assert calls.of(a, "append") == 1
    assert retry == first
    assert again == new and new.data == {"n": 1}
    assert len({first.id, new.id, plain.id, other.id}) == 4
    assert other.actor == actor("bot")
    assert await on_a.until(4) == [first, new, plain, other]
    assert await raw.xlen(f"{prefix}:{{org-1:ws-1}}:log") == 4
    # Later retries, alone, get the same answers.
    assert await a.append(WS, "doc.created", actor("svc"), {"n": 9}, "k2") == new
    assert await a.append(WS, "doc.created", actor("bot"), {"n": 9}, "k2") == other


def test_only_a_well_formed_notice_is_taken() -> None:
    fields = [b"type", b"doc.updated", b"actor", b"{}", b"data", b"{}", b"node", b"n"]
    good = msgpack.packb(["e1", "5-0", 7, [["5-1", fields], ["6-0", fields]]])
    notice = Notice.parse(good)
    assert notice is not None
    assert (notice.epoch, notice.previous, notice.added, notice.last) == (
        "e1", EntryId(5, 0), 7, EntryId(6, 0))
    for bad in (None, b"", b"6-0", b"rotated", b"\x94", b"\x93\x01\x02\x03",
                msgpack.packb(["e1", "5-0", 7, []]),  # nothing appended
                msgpack.packb(["e1", "5-0", 7, [["5-0", fields]]]),  # not after previous
                msgpack.packb(["e1", "5-0", 7, [["6-0", fields], ["5-9", fields]]]),  # disorder
                msgpack.packb(["e1", "5-0", "7", [["6-0", fields]]]),
                msgpack.packb(["e1", "x", 7, [["6-0", fields]]]),
                msgpack.packb(["e1", "5-0", 7, [["6-0", {"type": 1}]]]),
                json.dumps(["e1", "5-0", 7, []]).encode()):
        assert Notice.parse(bad) is None, bad


async def test_a_socket_s_pipelined_publishes_are_group_committed_and_answered_in_order(
    nodes: Callable[..., Any], prefix: str, app_factory: Callable[..., Any],
    settings: Any, token: Callable[..., str]
) -> None:
    broker: RedisBroker = await nodes("node-a")
    client = await app_factory(settings, broker=broker)
    peer = await connect(client)
    assert (await peer.request("auth", token=token(sub="svc")))["op"] == "reply"
    assert (await peer.request("subscribe", **HERE))["op"] == "reply"
    assert (await peer.event())["type"] == "sync.snapshot"

    def publish(n: int) -> dict[str, Any]:
        return {"op": "publish", "ref": f"p{n}", **HERE, "type": "doc.updated", "data": {"n": n}}

    # Sent back to back, without waiting: 20 publishes, a join, 5 more publishes.
    frames = [publish(n) for n in range(20)] + [{"op": "join", "ref": "j", **HERE}]
    frames += [publish(n) for n in range(20, 25)]
    async with monitored(prefix) as calls:
        for frame in frames:
            await peer.send(frame)
        answers, events = [], []
        while len(answers) < len(frames) or len(events) < len(frames):
            message = await peer.receive()
            if message["op"] == "event":
                events.append(message["event"])
            else:
                answers.append(message)
    # One answer each, in the order sent; the log in that order too, the join included.
    assert [a["ref"] for a in answers] == [f["ref"] for f in frames]
    assert all(a["op"] == "reply" for a in answers), answers
    assert [e["data"].get("n", "joined") for e in events] == [*range(20), "joined", *range(20, 25)]
    assert [a["data"]["id"] for a in answers if a["ref"] != "j"] == [
        e["id"] for e in events if e["type"] == "doc.updated"]
    # Group-committed: not one append per publish (20 together, then 5 after the join).
    assert calls.of(broker, "append") <= 3
    await peer.close()


async def test_concurrent_rest_publishes_are_group_committed_too(
    nodes: Callable[..., Any], prefix: str, app_factory: Callable[..., Any],
    settings: Any, token: Callable[..., str]
) -> None:
    broker: RedisBroker = await nodes("node-a")
    client = await app_factory(settings, broker=broker)
    headers = auth(token(sub="svc"))

    async def publish(n: int) -> dict[str, Any]:
        response = await client.post(f"{BASE}/events", headers=headers,
                                     json={"type": "doc.updated", "data": {"n": n}})
        assert response.status == 200, await response.text()
        return dict(await response.json())

    await publish(-1)  # (the connections' and the script's first use)
    async with monitored(prefix) as calls:
        answers = await asyncio.gather(*(publish(n) for n in range(20)))
    assert len({a["id"] for a in answers}) == 20
    # Requests that arrive while an append is under way wait and go in the next one.
    assert calls.of(broker, "append") <= 5
