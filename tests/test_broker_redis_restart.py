"""After Redis restarts, a node answers at once: dead pooled connections fail one request,
not one request each."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from gateway.broker import BackendUnavailable
from gateway.broker_redis import RedisBroker
from gateway.clock import ManualClock
from protocol.envelope import WorkspaceKey
from tests.multinode.harness import RedisServer

KEY = WorkspaceKey("org-1", "ws-1")
ACTOR = {"type": "service", "id": "t"}


@pytest.fixture
def redis_server(tmp_path: Path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path / "redis", persist=False)
    server.start()
    yield server
    server.stop()


async def test_after_a_restart_only_one_request_fails(redis_server: RedisServer) -> None:
    broker = RedisBroker(redis_server.url, node_id="n1", clock=ManualClock(), node_timeout=30.0)
    await broker.start()
    try:
        # Fill the pool with idle connections: 20 appends at once.
        await asyncio.gather(*(broker.append(KEY, "doc.updated", ACTOR, {"n": n})
                               for n in range(20)))
        redis_server.kill()
        redis_server.start()
        failures = 0
        for n in range(20):  # one after the other, as requests after a recovery
            try:
                await broker.append(KEY, "doc.updated", ACTOR, {"n": n})
            except BackendUnavailable:
                failures += 1
                await asyncio.sleep(0.05)  # the node drops its idle connections meanwhile
        assert failures <= 1
    finally:
        await broker.close()
