"""Two gateway nodes on a Redis Cluster of three primaries with a replica each, under load,
while the cluster changes under them as it does in production (issue 20 item 5):

* ``kill`` — the primary that holds node-a's heartbeat and index keys (and one followed
  workspace) is SIGKILLed; its replica takes over after ``cluster-node-timeout`` (1 s);
  the old primary is restarted and rejoins as a replica;
* ``failover`` — ``CLUSTER FAILOVER`` on that primary's replica (graceful: nothing lost);
* ``reshard`` — ``redis-cli --cluster reshard`` moves a followed workspace's slot, keys
  included, to another primary while it is being published to;
* ``migrate`` — the same by hand, stopped for ``HALFWAY`` with half of the workspace's keys
  moved: its scripts are answered ``TRYAGAIN`` meanwhile, which must be a 503 (and redis-py's
  retries of it, "TTL exhausted"), never a 500.

Publishers are idempotent (one ``Idempotency-Key`` per event) and retry on 503 and
timeouts only, as a client following the API reference does: any other refusal is a
failure. What is checked, against the cluster itself (redis-cli on the slot's primary):

* never a 500; refusals are 503 and stop within ``REFUSALS_END`` of the cluster settling
  (every node ``cluster_state:ok`` and agreeing on the slot map);
* both nodes are ready and publishing again by themselves within ``RECOVERY`` of that;
* every client stream open through the fault gets every entry of its workspace's log
  after its snapshot exactly once, in order — or ``sync.reset`` then a fresh snapshot, and
  only when an acknowledged event is really missing from the primary's stream;
* presence converges to who is connected (no ghost), on both nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import time
import uuid
from dataclasses import dataclass, field

import aiohttp
import pytest

from tests.multinode.conftest import Spawner
from tests.multinode.harness import (
    ORG,
    Node,
    RedisClusterServers,
    Stream,
    auth,
    base,
    eventually,
    key_slot,
    members,
    redis_cli,
    workspace_log_key,
)

pytestmark = pytest.mark.multinode

NODE_TIMEOUT = 3.0
SLACK = 1.5  # heartbeat phase + one sweep + delivery
SETTLE = 20.0  # the cluster's own failover / migration, measured from the fault
RECOVERY = 10.0  # from the cluster settling to both nodes ready and publishing
REFUSALS_END = 5.0  # 503s stop this long after the cluster settled (the slot map refreshed)
CATCH_UP = 15.0  # every stream has its log's last entry
PUBLISH_TIMEOUT = 3.0  # a publish not answered in this long is retried (same key)
RETRY_FOR = 30.0  # a publisher gives up on one event after this long
RESHARD_SPAN = 8  # the reshard moves a workspace whose slot is among its shard's first slots


@dataclass
class Publisher:
    """Publishes events to one workspace through both nodes in turn, each with its own
    idempotency key, retrying (same key, other node) on 503, connection errors and timeouts
    only; records every answer."""

    session: aiohttp.ClientSession
    nodes: tuple[Node, Node]
    workspace: str
    accepted: list[str] = field(default_factory=list)  # event ids, in acknowledgement order
    refused: list[float] = field(default_factory=list)  # time.monotonic() of each 503
    failures: list[tuple[int, str]] = field(default_factory=list)  # any other status
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        turn = itertools.count()
        for n in itertools.count():
            if self.stop.is_set():
                return
            key = f"{self.workspace}-{n}-{uuid.uuid4().hex[:8]}"
            deadline = time.monotonic() + RETRY_FOR
            while time.monotonic() < deadline:
                node = self.nodes[next(turn) % 2]
                status, body = await self._post(node, key, n)
                if status == 200:
                    self.accepted.append(str(json.loads(body)["id"]))
                    break
                if status == 503:
                    self.refused.append(time.monotonic())
                elif status != 0:
                    self.failures.append((status, body[:300]))
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.03)

    async def _post(self, node: Node, key: str, n: int) -> tuple[int, str]:
        """(status, body); status 0 for a connection error or a timeout."""
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            async with self.session.post(
                f"{node.url}{base(self.workspace)}/events",
                headers={**auth("svc"), "Idempotency-Key": key},
                json={"type": "doc.updated", "data": {"n": n, "key": key}},
                timeout=aiohttp.ClientTimeout(total=PUBLISH_TIMEOUT),
            ) as response:
                return response.status, await response.text()
        return 0, ""


def published(stream: Stream) -> list[str]:
    return [e.id or "" for e in stream.events if e.type and not e.type.startswith("sync.")]


def _entry(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq)


def primary_log(cluster: RedisClusterServers, workspace: str) -> tuple[str, list[str]]:
    """(epoch, event ids of the workspace's log) as the primary now serving its slot holds them."""
    log_key = workspace_log_key(workspace)
    port = cluster.slot_owner_port(log_key)
    epoch = redis_cli(port, "get", log_key.removesuffix(":log") + ":epoch")
    entries = json.loads(redis_cli(port, "xrange", log_key, "-", "+", json_output=True) or "[]")
    return epoch, [f"{epoch}:{entry[0]}" for entry in entries]


def check_stream(stream: Stream, epoch: str, log: list[str], accepted: list[str]) -> None:
    """Exactly the log after the stream's (last) snapshot, in order; a reset only where an
    acknowledged event is missing from the log."""
    lost = sorted(set(accepted) - set(log))
    resets = stream.of_type("sync.reset")
    assert not resets or lost, f"reset although nothing acknowledged was lost: {stream.summary()}"
    snapshots = [index for index, event in enumerate(stream.events) if event.type == "sync.snapshot"]
    assert snapshots, stream.summary()
    start = stream.events[snapshots[-1]].id or ""
    start_epoch, _, start_entry = start.partition(":")
    assert start_epoch == epoch, f"stream stands in epoch {start_epoch}, the log in {epoch}"
    expected = [event_id for event_id in log
                if _entry(event_id.partition(":")[2]) > _entry(start_entry)]
    after = [e.id or "" for e in stream.events[snapshots[-1] + 1:]
             if e.type and not e.type.startswith("sync.")]
    assert after == expected, (f"{stream.node.name}/{stream.workspace}: "
                               f"missing {sorted(set(expected) - set(after))[:5]}, "
                               f"unexpected {sorted(set(after) - set(expected))[:5]}")
    before = published(stream)[:len(published(stream)) - len(after)]
    assert len(set(before)) == len(before), f"a duplicate before the reset: {stream.summary()}"


def _has_event(event_id: str, stream: Stream) -> bool:
    return event_id in published(stream)


async def _members_are(session: aiohttp.ClientSession, node: Node, expected: list[str],
                       workspace: str) -> bool:
    return sorted(await members(session, node, workspace=workspace)) == expected


async def _publishes(session: aiohttp.ClientSession, node: Node, workspace: str) -> bool:
    with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
        async with session.post(f"{node.url}{base(workspace)}/events", headers=auth("svc"),
                                json={"type": "probe", "data": {}},
                                timeout=aiohttp.ClientTimeout(total=PUBLISH_TIMEOUT)) as response:
            return response.status == 200
    return False


async def join_socket(session: aiohttp.ClientSession, node: Node, user: str,
                      workspaces: list[str]) -> aiohttp.ClientWebSocketResponse:
    ws = await session.ws_connect(f"{node.url.replace('http', 'ws')}/v1/sync/ws", headers=auth(user))
    for ref, workspace in enumerate(workspaces, 1):
        await ws.send_json({"op": "join", "org_id": ORG, "workspace_id": workspace, "ref": ref})
        reply = await ws.receive_json(timeout=5)
        assert reply["op"] == "reply", reply
    return ws


def workspace_at_shard_start(low: int) -> str:
    """A workspace whose slot is among the first ``RESHARD_SPAN`` of the shard starting at
    ``low`` (``redis-cli --cluster reshard`` moves a shard's lowest slots)."""
    for n in range(1, 200_000):
        workspace = f"ws-{n}"
        if low <= key_slot(workspace_log_key(workspace)) < low + RESHARD_SPAN:
            return workspace
    raise AssertionError(f"no workspace near slot {low}")


async def kill_and_rejoin(cluster: RedisClusterServers, primary: int) -> float:
    """SIGKILL ``primary``; once its replica serves its slots, restart it (a replica now).
    When the slot map settled (time.monotonic())."""
    cluster.kill(primary)
    await asyncio.to_thread(cluster.wait_replaced, primary, SETTLE)
    settled = time.monotonic()
    await asyncio.to_thread(cluster.restart, primary)
    return settled


async def graceful_failover(cluster: RedisClusterServers, primary: int) -> float:
    """``CLUSTER FAILOVER`` on ``primary``'s replica; when the slot map settled (monotonic)."""
    await asyncio.to_thread(cluster.failover, cluster.replica_of(primary))
    await asyncio.to_thread(cluster.wait_replaced, primary, SETTLE)
    return time.monotonic()


FAULTS = ["kill", "failover", "reshard", "migrate"]
HALFWAY = 1.5  # "migrate": the workspace's keys are split between two primaries this long


async def apply(fault: str, cluster: RedisClusterServers, primary: int, workspace: str) -> float:
    """Make ``fault`` happen: to the primary on ``primary`` (kill, failover) or to the slot
    of ``workspace`` (reshard, migrate: to another primary). When the cluster settled
    (monotonic)."""
    if fault == "kill":
        return await kill_and_rejoin(cluster, primary)
    if fault == "failover":
        return await graceful_failover(cluster, primary)
    log_key = workspace_log_key(workspace)
    source = cluster.slot_owner_port(log_key)
    target = next(port for port in cluster.ports if port != source)
    if fault == "migrate":
        moved = await asyncio.to_thread(functools.partial(
            cluster.migrate_slot, key_slot(log_key), target, halfway=HALFWAY))
        print(f"migrate: {moved} keys moved, half of them {HALFWAY}s before the others")
        await asyncio.to_thread(cluster.wait_settled, SETTLE)
        assert cluster.slot_owner_port(log_key) == target
        return time.monotonic()
    low = next(low for low, high in cluster.slot_map() if low <= key_slot(log_key) <= high)
    # One key per MIGRATE: the workspace's keys (its log, epoch, presence records and one
    # idempotency key per publish) move one by one while it is published to.
    keys = redis_cli(source, "cluster", "countkeysinslot", str(key_slot(log_key)))
    print(f"reshard: moving {key_slot(log_key) - low + 1} slots, {keys} keys in the workspace's")
    await asyncio.to_thread(functools.partial(cluster.reshard, source, target,
                                              key_slot(log_key) - low + 1, pipeline=1))
    await asyncio.to_thread(cluster.wait_settled, SETTLE)
    assert cluster.slot_owner_port(log_key) == target
    redirects = [line for port in (source, target) for line in redis_cli(port, "info", "errorstats").splitlines()
                 if line.startswith(("errorstat_ASK", "errorstat_TRYAGAIN", "errorstat_MOVED"))]
    print(f"reshard: redirections answered {redirects}")
    return time.monotonic()


async def recovered(session: aiohttp.ClientSession, nodes: tuple[Node, Node],
                    workspaces: list[str], settled: float) -> None:
    """Both nodes ready and publishing to every workspace within ``RECOVERY`` of ``settled``."""
    for node in nodes:
        await node.wait_ready(max(0.1, settled + RECOVERY - time.monotonic()))
        for ws in workspaces:
            await eventually(functools.partial(_publishes, session, node, ws),
                             max(0.1, settled + RECOVERY - time.monotonic()), interval=0.1,
                             what=f"{node.name} publishing to {ws}")
    print(f"nodes ready and publishing {time.monotonic() - settled:.2f}s after the cluster settled")


def check_answers(publishers: list[Publisher], began: float, settled: float) -> None:
    """Never anything but 200 or 503; no 503 later than ``REFUSALS_END`` after ``settled``."""
    for publisher in publishers:
        assert not publisher.failures, f"{publisher.workspace}: answered {publisher.failures[:3]}"
        late = [t - settled for t in publisher.refused if t > settled + REFUSALS_END]
        assert not late, f"{publisher.workspace}: 503 {late[:3]}s after the cluster settled"
        refusals = [round(t - began, 2) for t in publisher.refused]
        last = f"{max(publisher.refused) - settled:+.2f}s" if publisher.refused else "-"
        print(f"{publisher.workspace}: {len(publisher.accepted)} accepted, 503 at {refusals[:12]} "
              f"(last {last} from the cluster settling)")


async def check_delivery(cluster: RedisClusterServers, streams: list[Stream],
                         publishers: list[Publisher]) -> None:
    """Every stream caught up with its log on the slot's primary, exactly (``check_stream``);
    and no stream saw a connected user leave (no node was reaped by mistake)."""
    for stream in streams:
        assert not stream.ended, f"{stream.node.name}/{stream.workspace} stream ended"
    for workspace in sorted({publisher.workspace for publisher in publishers}):
        epoch, log = primary_log(cluster, workspace)
        accepted = [event_id for p in publishers if p.workspace == workspace for event_id in p.accepted]
        for stream in (s for s in streams if s.workspace == workspace):
            await stream.wait_for(functools.partial(_has_event, log[-1]), CATCH_UP)
            check_stream(stream, epoch, log, accepted)
            flicker = [user for kind, user in stream.presence() if kind == "presence.left" and user != "u-gone"]
            assert not flicker, f"{stream.node.name}/{stream.workspace}: {flicker} left"


@pytest.mark.parametrize("fault", FAULTS)
async def test_cluster_failover_and_resharding_under_load_lose_nothing_and_never_answer_500(
    spawn: Spawner, session: aiohttp.ClientSession, fault: str
) -> None:
    """``kill`` and ``failover`` hit the primary of node-a's liveness keys, which also serves
    the first workspace; ``reshard`` moves the second workspace's slot (one of the first of
    its shard, so only a few slots move)."""
    cluster = spawn.redis_cluster(replicas=1)
    a, b = await spawn.start(cluster, "node-a", "node-b", node_timeout=NODE_TIMEOUT)
    workspaces = cluster.workspaces_on_every_shard()
    workspaces[1] = workspace_at_shard_start(cluster.shards()[1][0])
    primary = cluster.slot_owner_port("gw:{node:node-a}:alive")
    streams = [await Stream(session, node, f"reader-{node.name}", workspace=ws).open()
               for ws in workspaces for node in (a, b)]
    for stream in streams:
        await stream.wait_for(lambda s: bool(s.of_type("sync.snapshot")), 5)
    stays = [await join_socket(session, a, "u-a", workspaces), await join_socket(session, b, "u-b", workspaces)]
    leaves = await join_socket(session, a, "u-gone", workspaces)
    for node in (a, b):
        for ws in workspaces:
            await eventually(functools.partial(_members_are, session, node, ["u-a", "u-b", "u-gone"], ws), 5)

    # The second workspace (resharded) gets three publishers: more writes racing the migration.
    publishers = [Publisher(session, (a, b), ws) for ws in [*workspaces, workspaces[1], workspaces[1]]]
    tasks = [asyncio.create_task(publisher.run()) for publisher in publishers]
    try:
        await eventually(lambda: _all_accepted(publishers, 5), 10, what="publishing before the fault")
        await asyncio.to_thread(cluster.wait_replicas_synced, 10)
        began = time.monotonic()
        faulting = asyncio.create_task(apply(fault, cluster, primary, workspaces[1]))
        await asyncio.sleep(0.2)
        await leaves.close()  # a user leaves while the cluster changes
        settled = await faulting
        print(f"{fault}: cluster settled {settled - began:.2f}s after the fault")
        await recovered(session, (a, b), workspaces, settled)
        target = max(len(publisher.accepted) for publisher in publishers) + 10
        await eventually(lambda: _all_accepted(publishers, target), 10, what="publishing after the fault")
        for publisher in publishers:
            publisher.stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), RETRY_FOR + 10)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    check_answers(publishers, began, settled)
    await check_delivery(cluster, streams, publishers)

    for node in (a, b):
        for ws in workspaces:
            await eventually(functools.partial(_members_are, session, node, ["u-a", "u-b"], ws),
                             NODE_TIMEOUT + SLACK)
    assert not any(socket.closed for socket in stays)
    for stream in streams:
        await stream.close()
    for socket in stays:
        await socket.close()


async def _all_accepted(publishers: list[Publisher], at_least: int) -> bool:
    return all(len(publisher.accepted) >= at_least for publisher in publishers)
