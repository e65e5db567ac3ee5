"""Fixtures that start real processes: private Redis deployments (one redis-server, a
three-primary Redis Cluster, or a Sentinel-managed primary with a replica) and gateway nodes,
all on loopback.

Only processes started here are stopped here, by PID. Every Redis is our own (free ports, a
temporary directory): the tests kill and restart it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import pytest

from tests.multinode.harness import (
    WORKSPACE,
    Node,
    RedisClusterServers,
    RedisServer,
    SentinelServers,
)

pytestmark = pytest.mark.multinode


class Deployment(Protocol):
    """What gateway nodes are started on: a Redis URL, and a way to stop it."""

    @property
    def url(self) -> str: ...

    def stop(self) -> None: ...


class Spawner:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.servers: list[Deployment] = []
        self.nodes: list[Node] = []

    def redis(self, *, persist: bool = False, fsync: str = "always") -> RedisServer:
        server = RedisServer(self.directory / f"redis-{len(self.servers)}", persist=persist,
                             fsync=fsync)
        self.servers.append(server)
        server.start()
        return server

    def redis_cluster(self, *, replicas: int = 0) -> RedisClusterServers:
        """Three primaries (with ``replicas`` replicas each), slots split as ``redis-cli
        --cluster create`` does; ready (ok, replicas caught up)."""
        cluster = RedisClusterServers(self.directory / f"redis-{len(self.servers)}", replicas=replicas)
        self.servers.append(cluster)
        cluster.start()
        return cluster

    def sentinel(self, **options: Any) -> SentinelServers:
        """A primary, a replica and three sentinels that all know each other; ready
        (``options``: ``SentinelServers``'s)."""
        servers = SentinelServers(self.directory / f"redis-{len(self.servers)}", **options)
        self.servers.append(servers)
        servers.start()
        return servers

    async def start(self, server: Deployment, *names: str, **options: Any) -> list[Node]:
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
    missing = [tool for tool in ("redis-server", "redis-cli") if shutil.which(tool) is None]
    if missing:
        if os.environ.get("GATEWAY_TEST_REQUIRE_REDIS"):
            pytest.fail(f"{' and '.join(missing)} not installed but the multi-node tests are required")
        pytest.skip(f"{' and '.join(missing)} not installed (scripts/test.sh installs it)")
    spawner = Spawner(tmp_path)
    try:
        yield spawner
    finally:
        spawner.stop_all()
        print(spawner.logs())  # shown by pytest when the test failed


@dataclass
class Topology:
    """One Redis deployment the same scenario runs on, and the workspaces it uses there:
    ``single`` — one redis-server, the one workspace ``ws-1``; ``cluster`` — three primaries,
    one workspace whose keys live on each (so every shard serves part of the scenario)."""

    name: str
    server: RedisServer | RedisClusterServers
    workspaces: list[str]


@pytest.fixture(params=["single", "cluster"])
def topology(request: pytest.FixtureRequest, spawn: Spawner) -> Topology:
    if request.param == "single":
        return Topology("single", spawn.redis(), [WORKSPACE])
    cluster = spawn.redis_cluster()
    return Topology("cluster", cluster, cluster.workspaces_on_every_shard())


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client
