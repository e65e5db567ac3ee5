"""Real RedisBrokers on the suite's redis-server, each test on a key prefix of its own.

A pytest plugin (``tests/conftest.py`` loads it): the fixtures ``prefix``, ``raw`` and
``nodes`` (which uses the requesting module's ``clock``)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from gateway.broker import tail
from gateway.broker_redis import RedisBroker
from gateway.clock import ManualClock
from protocol.envelope import Envelope, EventId, WorkspaceKey
from tests.conftest import redis_url

__all__ = ["WS", "actor", "collect", "nodes", "prefix", "raw", "real_time_clock", "started_nodes"]

WS = WorkspaceKey("org-1", "ws-1")


def actor(user: str) -> dict[str, Any]:
    return {"type": "user", "id": user}


def real_time_clock() -> ManualClock:
    """Starts at the real time: entries appended with a plain ``XADD *`` carry Redis's clock.
    (A module of Redis tests makes it its ``clock`` fixture.)"""
    return ManualClock(time.time())


@pytest.fixture
def prefix() -> str:
    return f"test-{secrets.token_hex(6)}"


@pytest.fixture
async def raw() -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url())
    yield client
    await client.aclose()


@contextlib.asynccontextmanager
async def started_nodes(url: str, **defaults: Any) -> AsyncIterator[Callable[..., Any]]:
    """``await make("a", **options)``: started RedisBrokers on ``url``, closed at the end."""
    started: list[RedisBroker] = []

    async def make(node_id: str, **kwargs: Any) -> RedisBroker:
        broker = RedisBroker(url, node_id=node_id, **{**defaults, **kwargs})
        await broker.start()
        started.append(broker)
        return broker

    try:
        yield make
    finally:
        for broker in started:
            await broker.close()


@pytest.fixture
async def nodes(prefix: str, clock: ManualClock) -> AsyncIterator[Callable[..., Any]]:
    """``await nodes("a", node_timeout=..)``: started RedisBrokers sharing one key prefix."""
    async with started_nodes(redis_url(), clock=clock, history_max_len=1000,
                             history_max_age=3600.0, node_timeout=15.0, key_prefix=prefix) as make:
        yield make


async def collect(broker: RedisBroker, after: EventId, count: int, timeout: float = 10) -> list[Envelope]:
    got: list[Envelope] = []

    async def run() -> None:
        async for batch in tail(broker, WS, after):
            got.extend(batch)
            if len(got) >= count:
                return

    await asyncio.wait_for(run(), timeout)
    return got
