"""Fixtures that start real processes: a private redis-server and gateway nodes on loopback.

Only processes started here are stopped here, by PID. The redis-server is always our own
(a free port, a temporary directory): the tests kill and restart it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.multinode.harness import Node, RedisServer

pytestmark = pytest.mark.multinode


class Spawner:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.servers: list[RedisServer] = []
        self.nodes: list[Node] = []

    def redis(self, *, persist: bool = False) -> RedisServer:
        server = RedisServer(self.directory / f"redis-{len(self.servers)}", persist=persist)
        self.servers.append(server)
        server.start()
        return server

    async def start(self, server: RedisServer, *names: str, **options: Any) -> list[Node]:
        """Start nodes in parallel and return once every one answers /readyz."""
        started = [Node(name, server.url, self.directory, **options) for name in names]
        self.nodes.extend(started)
        for node in started:
            node.start()
        await asyncio.gather(*(node.wait_ready() for node in started))
        return started

    async def restart(self, node: Node) -> None:
        node.stop()
        node.start()
        await node.wait_ready()

    def stop_all(self) -> None:
        for node in self.nodes:
            node.stop()
        for server in self.servers:
            server.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {node.name} ---\n{node.logs()}" for node in self.nodes)


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Spawner]:
    if shutil.which("redis-server") is None:
        if os.environ.get("GATEWAY_TEST_REQUIRE_REDIS"):
            pytest.fail("redis-server is not installed but the multi-node tests are required")
        pytest.skip("redis-server is not installed (scripts/test.sh installs it)")
    spawner = Spawner(tmp_path)
    try:
        yield spawner
    finally:
        spawner.stop_all()
        print(spawner.logs())  # shown by pytest when the test failed


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client
