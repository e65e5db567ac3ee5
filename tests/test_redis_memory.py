"""Issue 20, item 6: Redis memory limits. A private redis-server with ``maxmemory`` (the
suite's shared one has none): under ``noeviction`` a full Redis refuses writes with a 503 in
the envelope, never a 500; streams, heartbeats and leaves go on; writes work again by
themselves once memory frees. A policy that may evict the gateway's keys is refused at
start-up (or, when allowed, logged as an error)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import OutOfMemoryError

from gateway.broker import BackendRefused, tail
from gateway.broker_redis import RedisBroker
from gateway.presence import session_join, session_leave
from protocol.envelope import Envelope
from tests.conftest import BASE, auth
from tests.multinode.harness import RedisServer
from tests.processes import run_cli
from tests.redis_nodes import WS, actor, real_time_clock, started_nodes

pytestmark = pytest.mark.redis

clock = pytest.fixture(real_time_clock)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[RedisServer, Redis]]:
    redis = RedisServer(tmp_path / "redis", persist=False)
    redis.start()
    client = Redis.from_url(redis.url)
    await client.config_set("maxmemory-policy", "noeviction")
    yield redis, client
    await client.aclose()
    redis.stop()


@pytest.fixture
async def brokers(server: tuple[RedisServer, Redis], clock: Any) -> AsyncIterator[Callable[..., Any]]:
    async with started_nodes(server[0].url, clock=clock, key_prefix="mem",
                             node_timeout=1.5) as make:
        yield make


async def fill(client: Redis) -> int:
    """Make Redis full: 4 MB of keys of nobody's, then ``maxmemory`` 1 MB below what it
    uses (a write that would grow it is refused, whatever its size); returns the keys."""
    for n in range(20):
        await client.set(f"junk:{n}", b"x" * 200_000)
    used = (await client.info("memory"))["used_memory"]
    await client.config_set("maxmemory", used - 1_000_000)
    with pytest.raises(OutOfMemoryError):
        await client.set("one-more", "x")
    return 20


async def test_a_full_redis_refuses_writes_with_503_and_recovers_by_itself(
    server: tuple[RedisServer, Redis], brokers: Callable[..., Any], app_factory: Callable[..., Any],
    settings: Any, token: Callable[..., str]
) -> None:
    _, raw = server
    a: RedisBroker = await brokers("node-a")
    b: RedisBroker = await brokers("node-b")
    client = await app_factory(settings, broker=a)
    start = (await b.presence_snapshot(WS)).position
    got: list[Envelope] = []

    async def follow() -> None:
        async for batch in tail(b, WS, start):
            got.extend(batch)

    follower = asyncio.create_task(follow())
    carol = (await a.change_presence(WS, "carol", session_join("carol", actor("carol"), "s1",
                                                                 "node-a"))).events
    dave = (await a.change_presence(WS, "dave", session_join("dave", actor("dave"), "s2",
                                                               "node-a"))).events
    headers = auth(token(sub="svc"))
    before = await client.post(f"{BASE}/events", headers=headers, json={"type": "doc.updated"})
    assert before.status == 200

    junk = await fill(raw)
    for _ in range(3):  # every write is refused the same way: a 503 in the envelope
        response = await client.post(f"{BASE}/events", headers=headers,
                                     json={"type": "doc.updated", "data": {"full": True}})
        assert response.status == 503, await response.text()
        body = await response.json()
        assert body["error"] == "SERVICE_UNAVAILABLE" and body["status_code"] == 503
        assert response.headers["Retry-After"] == "1"
    joined = await client.post(f"{BASE}/presence/join", headers=auth(token(sub="erin")))
    assert joined.status == 503 and (await joined.json())["error"] == "SERVICE_UNAVAILABLE"
    # A leave frees memory: it still goes through, and everyone hears of it.
    left = (await a.change_presence(WS, "dave", session_leave("s2"))).events
    assert [e.type for e in left] == ["presence.left"]
    # Longer than the node timeout: the heartbeats went on (allow-oom), so nobody reaps
    # node-a and carol, whose session is on it, stays.
    await asyncio.sleep(2 * 1.5)
    await b.sweep()
    assert set((await b.presence_snapshot(WS)).members) == {"carol"}

    await raw.delete(*(f"junk:{n}" for n in range(junk)))  # now 3 MB below the limit
    after = await client.post(f"{BASE}/events", headers=headers,
                              json={"type": "doc.updated", "data": {"freed": True}})
    assert after.status == 200, await after.text()
    async with asyncio.timeout(10):
        while len(got) < 5:  # noqa: ASYNC110 (filled by the follower)
            await asyncio.sleep(0.02)
    follower.cancel()
    with contextlib.suppress(BaseException):
        await follower
    # The follower missed nothing and got nothing twice: no reset, no refused write logged.
    assert [e.id for e in got] == [e.id for e in (*carol, *dave)] + [
        (await before.json())["id"], left[0].id, (await after.json())["id"]]


async def test_a_redis_that_may_evict_the_gateway_s_keys_is_refused_at_start(
    server: tuple[RedisServer, Redis], brokers: Callable[..., Any],
    caplog: pytest.LogCaptureFixture
) -> None:
    redis, raw = server
    for policy in ("allkeys-lru", "volatile-ttl"):
        await raw.config_set("maxmemory-policy", policy)
        with pytest.raises(BackendRefused, match=f"maxmemory-policy is {policy}"):
            await brokers("node-a")
    # Allowed by the operator: it starts, and says so as an error.
    with caplog.at_level(logging.ERROR):
        broker = await brokers("node-b", allow_eviction=True)
    assert broker.followed == 0
    assert any("may evict the gateway's keys" in r.getMessage() and r.levelno == logging.ERROR
               for r in caplog.records)
    # The CLI: a clear message and exit code 2, not a traceback.
    result = run_cli("serve", "--redis-url", redis.url, "--jwt-secret", "s" * 40,
                     "--port", "0")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "maxmemory-policy is volatile-ttl" in result.stderr
    assert "--redis-allow-eviction" in result.stderr and "Traceback" not in result.stderr
