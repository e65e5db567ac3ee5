"""A node cut off from Redis, or on a slow link to it (issue 20, items 1 and 2): real nodes on
a real redis-server, node A reaching it through the tests' own TCP proxy (``Endpoint``),
which blackholes the link like a cut cable (nothing closed or reset) or delays it.

Bounds asserted (docs/redis.md, "Partitions and slow links"), with node_timeout 3 s:
the cut-off node answers presence reads and ``/readyz`` 503 within node_timeout, writes 503
within socket timeout + pool wait (7 s), every request in bounded time; peers remove its
users within node_timeout + sweep; after healing, one ``presence.joined`` per user it
reaped and every event published meanwhile reaches the node's clients once, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable

import aiohttp
import pytest

from tests.multinode.conftest import Spawner
from tests.multinode.harness import BASE, Endpoint, Node, Stream, call, eventually, members

pytestmark = pytest.mark.multinode

NODE_TIMEOUT = 3.0
SLACK = 2.0  # a heartbeat period, one sweep and delivery, on a loaded 2-core machine
WRITE_BOUND = 5.0 + 2.0 + SLACK  # socket timeout + pool wait: a write never hangs longer


@contextlib.asynccontextmanager
async def linked(spawn: Spawner) -> AsyncIterator[tuple[Endpoint, Node, Node]]:
    """Node A through a proxy of its own to the Redis that node B reaches directly."""
    redis = spawn.redis()
    async with Endpoint(redis.port) as link:
        (a,) = await spawn.start(link, "node-a", node_timeout=NODE_TIMEOUT)
        (b,) = await spawn.start(redis, "node-b", node_timeout=NODE_TIMEOUT)
        try:
            yield link, a, b
        finally:
            for node in (a, b):  # before the proxy closes under them
                node.stop()


def published(stream: Stream) -> list[str]:
    return [event.id or "" for event in stream.events if event.type == "doc.updated"]


async def status_of(session: aiohttp.ClientSession, method: str, url: str, **kwargs: object) -> tuple[int, float]:
    """A request's status and how long it took to be answered (the harness's 10 s timeout
    fails the test on a hang)."""
    began = time.monotonic()
    status, _ = await call(session, method, url, "observer", **kwargs)
    return status, time.monotonic() - began


async def test_a_node_cut_off_from_redis_says_so_and_catches_up_once_healed(
    spawn: Spawner, session: aiohttp.ClientSession
) -> None:
    async with linked(spawn) as (link, a, b):
        on_a = await Stream(session, a, "alice").open()
        on_b = await Stream(session, b, "bob").open()
        watch = await Stream(session, b, "watcher").open()
        for node, user in ((a, "alice"), (b, "bob"), (b, "watcher")):
            await _join(session, node, user)
        await eventually(lambda: _lists(session, a, {"alice", "bob", "watcher"}), 5, what="all joined")
        await watch.wait_for(lambda s: _of(s, "alice") == ["presence.joined"], 5)

        told = len(on_a.events)
        link.blackhole()
        cut = time.monotonic()

        async def since_cut(check: Awaitable[object]) -> float:
            await check
            return time.monotonic() - cut

        # Its presence replica is no longer vouched for: 503, not the stale members. Its
        # peer removes its users within node_timeout (+ a sweep and delivery).
        presence_503, ready_503, reaped, (status, took) = await asyncio.gather(
            since_cut(eventually(lambda: _answers(session, f"{a.url}{BASE}/presence", 503),
                                 NODE_TIMEOUT + SLACK, what="presence 503 on the cut-off node")),
            since_cut(eventually(lambda: _answers(session, f"{a.url}/readyz", 503),
                                 NODE_TIMEOUT + SLACK, what="readyz 503 on the cut-off node")),
            since_cut(watch.wait_for(lambda s: "presence.left" in _of(s, "alice"), NODE_TIMEOUT + SLACK)),
            status_of(session, "POST", f"{a.url}{BASE}/events",
                      json={"type": "doc.updated", "data": {"on": "a"}}),
        )
        print(f"after the cut: presence 503 in {presence_503:.1f} s, readyz 503 in {ready_503:.1f} s, "
              f"reaped in {reaped:.1f} s, a publish answered {status} in {took:.1f} s")
        assert status == 503 and took < WRITE_BOUND, (status, took)
        assert _of(watch, "alice") == ["presence.joined", "presence.left"]
        assert "alice" not in await members(session, b)
        sent = []
        for n in range(5):
            status, body = await call(session, "POST", f"{b.url}{BASE}/events", "svc",
                                      json={"type": "doc.updated", "data": {"n": n}})
            assert status == 200, body
            sent.append(str(body["id"]))
        assert on_a.events[told:] == [], "the cut-off node told its client something"

        link.heal()
        await on_a.wait_for(lambda s: set(sent) <= set(published(s)) or bool(s.of_type("sync.reset")),
                            10)
        if not on_a.of_type("sync.reset"):
            got = published(on_a)
            assert got == sorted(set(got), key=got.index) and [i for i in got if i in sent] == sent
        await eventually(lambda: _answers(session, f"{a.url}/readyz", 200), 10, what="ready again")
        await watch.wait_for(lambda s: len(_of(s, "alice")) >= 3, 10)
        await eventually(lambda: _lists(session, a, {"alice", "bob", "watcher"}), 5, what="presence on A")
        await asyncio.sleep(2 * NODE_TIMEOUT)  # no flicker storm afterwards
        assert _of(watch, "alice") == ["presence.joined", "presence.left", "presence.joined"], (
            watch.presence())
        assert await _lists(session, b, {"alice", "bob", "watcher"})
        for stream in (on_a, on_b, watch):
            assert not stream.ended
            await stream.close()


async def test_a_slow_link_reaps_nobody_and_loses_no_event(
    spawn: Spawner, session: aiohttp.ClientSession
) -> None:
    """D4: 200-500 ms each way between A and Redis for 20 s while four publishers on A
    keep its command connections busy. Before the heartbeat had connections of its own it
    waited behind them and B reaped A (its users left, then joined again)."""
    async with linked(spawn) as (link, a, b):
        on_a = await Stream(session, a, "alice").open()
        watch = await Stream(session, b, "watcher").open()
        await _join(session, a, "alice")
        await _join(session, b, "watcher")
        await eventually(lambda: _lists(session, b, {"alice", "watcher"}), 5, what="all joined")

        link.slow(0.2, 0.5)
        acknowledged: list[str] = []
        answers: list[tuple[int, float]] = []
        stop_at = time.monotonic() + 20.0

        async def publisher(name: str) -> None:
            n = 0
            while time.monotonic() < stop_at:
                began = time.monotonic()
                status, body = await call(session, "POST", f"{a.url}{BASE}/events", name,
                                          json={"type": "doc.updated", "data": {"n": n}})
                answers.append((status, time.monotonic() - began))
                if status == 200:
                    acknowledged.append(str(body["id"]))
                n += 1

        async def reader() -> int:
            served = 0
            while time.monotonic() < stop_at:
                status, _ = await status_of(session, "GET", f"{a.url}{BASE}/presence")
                assert status == 200, "a slow link is not a partition: presence stays readable"
                served += 1
                await asyncio.sleep(1.0)
            return served

        reading = asyncio.create_task(reader())
        await asyncio.gather(*(publisher(f"svc-{i}") for i in range(4)))
        served = await reading
        link.heal()
        assert served >= 5
        failed = [answer for answer in answers if answer[0] != 200]
        # Each publish is one round trip of at most 1 s: the pool of six never runs dry.
        assert not failed, failed
        assert len(acknowledged) >= 20 and max(took for _, took in answers) < WRITE_BOUND
        for stream in (on_a, watch):
            await stream.wait_for(lambda s: set(acknowledged) <= set(published(s)), 10)
            got = published(stream)
            assert len(got) == len(set(got)), "an event was delivered twice"
            assert sorted(got, key=_order) == got, "events out of order"
        assert ("presence.left", "alice") not in watch.presence(), watch.presence()
        assert not watch.of_type("sync.reset") and not on_a.of_type("sync.reset")
        for stream in (on_a, watch):
            await stream.close()


def _of(stream: Stream, user: str) -> list[str]:
    """The presence events about ``user`` a stream got."""
    return [kind for kind, who in stream.presence() if who == user]


def _order(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition(":")[2].partition("-")
    return int(ms), int(seq)


async def _join(session: aiohttp.ClientSession, node: Node, user: str) -> None:
    """A REST join, kept alive by the user's open stream on the same node."""
    status, body = await call(session, "POST", f"{node.url}{BASE}/presence/join", user)
    assert status == 200, body


async def _lists(session: aiohttp.ClientSession, node: Node, users: set[str]) -> bool:
    return users <= set(await members(session, node))


async def _answers(session: aiohttp.ClientSession, url: str, status: int) -> bool:
    return (await status_of(session, "GET", url))[0] == status
