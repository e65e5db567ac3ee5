"""The harness's Redis Cluster and Sentinel deployments on their own (redis-cli and redis-py
only, no gateway): what the topology tests build on works, and stops without leftovers."""

from __future__ import annotations

import os
import time

import pytest
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel

from tests.multinode.conftest import Spawner
from tests.multinode.harness import (
    THREE_SHARDS,
    key_slot,
    redis_cli,
    workspace_log_key,
    workspaces_on_every_shard,
)

pytestmark = pytest.mark.multinode


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers signal 0; Popen.wait() reaped ours, so this means alive.
    return False


async def test_cluster_serves_every_slot_and_workspaces_spread_over_every_shard(spawn: Spawner) -> None:
    cluster = spawn.redis_cluster()
    print(f"cluster started in {cluster.started_in:.2f}s")
    for port in cluster.ports:
        info = redis_cli(port, "cluster", "info")
        assert "cluster_state:ok" in info and "cluster_slots_assigned:16384" in info, info
    assert cluster.shards() == list(THREE_SHARDS)
    assert cluster.url == "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in cluster.ports)

    # Our CRC16 and hash-tag rule agree with Redis's.
    for key in ("gw:{org-1:ws-1}:log", "plain-key", "a{}b", "x{y}z{w}", "{node:node-a}:alive", "é{ü}"):
        assert key_slot(key) == int(redis_cli(cluster.ports[0], "cluster", "keyslot", key)), key

    workspaces = workspaces_on_every_shard()
    assert workspaces == cluster.workspaces_on_every_shard() and len(workspaces) == 3
    owners = [cluster.slot_owner_port(workspace_log_key(ws)) for ws in workspaces]
    assert owners == cluster.ports  # one workspace on each primary, in order
    # Every key of a workspace is in the same slot as its log.
    for ws in workspaces:
        assert key_slot(f"gw:{{org-1:{ws}}}:presence") == key_slot(workspace_log_key(ws))
    two_each = workspaces_on_every_shard(n_per_shard=2)
    assert sorted(cluster.slot_owner_port(workspace_log_key(ws)) for ws in two_each) == sorted(
        cluster.ports * 2)

    client = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", cluster.ports[0])],
                          decode_responses=True)
    try:
        for ws, owner in zip(workspaces, owners, strict=True):
            key = workspace_log_key(ws)
            entry = str(await client.xadd(key, {"type": "doc.updated"}))
            await client.set(f"gw:{{org-1:{ws}}}:epoch", "e1")
            assert await client.get(f"gw:{{org-1:{ws}}}:epoch") == "e1"
            # It really lives on the primary that owns the slot.
            assert entry in redis_cli(owner, "xrange", key, "-", "+")
            assert redis_cli(owner, "get", f"gw:{{org-1:{ws}}}:epoch") == "e1"
    finally:
        await client.aclose()

    pids = [proc.pid for proc in cluster.procs.values()]
    cluster.stop()
    assert all(_gone(pid) for pid in pids)


async def test_sentinel_failover_promotes_the_replica(spawn: Spawner) -> None:
    servers = spawn.sentinel()
    print(f"sentinel setup started in {servers.started_in:.2f}s")
    primary, replica = servers.data_ports
    assert servers.primary_port() == primary
    assert servers.role(primary) == "master" and servers.role(replica) == "slave"
    assert servers.url == ("redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in servers.sentinel_ports)
                           + "/mymaster/0")

    sentinel = Sentinel([("127.0.0.1", port) for port in servers.sentinel_ports],
                        socket_timeout=1.0, decode_responses=True)
    client = sentinel.master_for("mymaster", socket_timeout=1.0, decode_responses=True)
    try:
        await client.set("before", "1")
        servers.wait_replica_synced()
        assert redis_cli(replica, "get", "before") == "1"

        killed_at = time.monotonic()
        assert servers.kill_primary() == primary
        assert servers.wait_failover(20) == replica
        took = time.monotonic() - killed_at
        print(f"failover took {took:.2f}s")
        assert servers.primary_port() == replica
        assert servers.role(replica) == "master"
        # What had replicated survived; redis-py's sentinel client follows to the new primary.
        deadline = time.monotonic() + 10
        while True:
            try:
                await client.set("after", "2")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await client.connection_pool.disconnect()
        assert await client.get("before") == "1"
        assert redis_cli(replica, "get", "after") == "2"
    finally:
        await client.aclose()
        for connection in sentinel.sentinels:
            await connection.aclose()

    pids = [proc.pid for proc in servers.procs.values()]
    servers.stop()
    assert all(_gone(pid) for pid in pids)
