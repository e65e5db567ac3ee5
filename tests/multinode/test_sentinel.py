"""Two gateway nodes on a Sentinel-managed Redis (a primary, one replica, three sentinels):
the primary is SIGKILLed and the nodes must follow the failover by themselves.

What is checked, against the new primary itself (redis-cli): a client resuming with the last
id it held, on either node, gets every event it missed exactly once, or ``sync.reset`` — and
the reset only when that id can no longer be resumed from (it is not in the new primary's
stream, or the log's epoch changed because the nodes detected lost writes, docs/redis.md
"Ids, retention and epochs"). Presence converges to the users actually connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time

import aiohttp
import pytest

from tests.multinode.conftest import Spawner
from tests.multinode.harness import (
    BASE,
    ORG,
    WORKSPACE,
    Event,
    Node,
    Stream,
    auth,
    call,
    eventually,
    members,
    redis_cli,
    workspace_log_key,
)

pytestmark = pytest.mark.multinode

NODE_TIMEOUT = 3.0
SLACK = 1.5  # heartbeat phase + one sweep + delivery
RECOVERY = 15.0  # from the sentinels naming the new primary to nodes ready and publishing
LOG_KEY = workspace_log_key()  # gw:{org-1:ws-1}:log
EPOCH_KEY = "gw:{org-1:ws-1}:epoch"


def published(stream: Stream) -> list[str]:
    return [e.id or "" for e in stream.events if e.type and not e.type.startswith("sync.")]


def _entry(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq)


def held_id(stream: Stream) -> str:
    """What a browser would send as Last-Event-ID: the last ``id:`` it received."""
    return next(e.id for e in reversed(stream.events) if e.id)


async def publish(session: aiohttp.ClientSession, node: Node, n: int) -> tuple[int, dict]:
    return await call(session, "POST", f"{node.url}{BASE}/events", "svc",
                      json={"type": "doc.updated", "data": {"n": n}})


async def publish_ok(session: aiohttp.ClientSession, node: Node, n: int) -> str:
    status, body = await publish(session, node, n)
    assert status == 200, body
    return str(body["id"])


async def join_socket(session: aiohttp.ClientSession, node: Node, user: str) -> aiohttp.ClientWebSocketResponse:
    ws = await session.ws_connect(f"{node.url.replace('http', 'ws')}/v1/sync/ws", headers=auth(user))
    await ws.send_json({"op": "join", "org_id": ORG, "workspace_id": WORKSPACE, "ref": 1})
    reply = await ws.receive_json(timeout=5)
    assert reply["op"] == "reply", reply
    return ws


async def keep_publishing(session: aiohttp.ClientSession, nodes: tuple[Node, Node],
                          accepted: list[str], stop: asyncio.Event) -> None:
    """Publish all the time, alternating nodes, whatever the answers (503s while Redis fails
    over); the ids of accepted events in ``accepted``."""
    n = 1000
    while not stop.is_set():
        n += 1
        node = nodes[n % 2]
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            async with session.post(f"{node.url}{BASE}/events", headers=auth("svc"),
                                    json={"type": "doc.updated", "data": {"n": n}},
                                    timeout=aiohttp.ClientTimeout(total=3)) as response:
                if response.status == 200:
                    accepted.append((await response.json())["id"])
        await asyncio.sleep(0.02)


def primary_log(port: int) -> tuple[str | None, list[str]]:
    """(epoch, entry ids of the workspace log) as the new primary holds them."""
    epoch = redis_cli(port, "get", EPOCH_KEY) or None
    entries = json.loads(redis_cli(port, "xrange", LOG_KEY, "-", "+", json_output=True) or "[]")
    return epoch, [entry[0] for entry in entries]


SCENARIOS = ["replica-caught-up", "writes-racing-the-kill", "replica-behind"]


@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_nodes_follow_a_sentinel_failover_resume_exactly_once_or_reset_and_leave_no_ghosts(
    spawn: Spawner, session: aiohttp.ClientSession, scenario: str
) -> None:
    """``replica-caught-up``: nothing written is lost, so both readers resume exactly once.
    ``writes-racing-the-kill``: a publisher keeps writing through the kill; whatever was lost
    decides (checked on the new primary). ``replica-behind``: the replica stopped replicating
    before the last writes (a leave and the events the readers saw last): their ids are gone,
    so both readers must get a reset, and the lost leave must not leave a ghost."""
    servers = spawn.sentinel()
    a, b = await spawn.start(servers, "node-a", "node-b", node_timeout=NODE_TIMEOUT)
    readers = [await Stream(session, a, "reader-a").open(), await Stream(session, b, "reader-b").open()]
    for reader in readers:
        await reader.wait_for(lambda s: bool(s.of_type("sync.snapshot")), 5)

    # u1: REST presence kept alive by its stream on a. u2: a socket on b (stays). u3: a socket
    # on a, closed while Redis has no primary. u4: a socket on b, closed after the failover.
    # u5: a socket on a, closed before the kill (in replica-behind, a leave the failover loses).
    assert (await call(session, "POST", f"{a.url}{BASE}/presence/join", "u1"))[0] == 200
    u1_stream = await Stream(session, a, "u1").open()
    u2 = await join_socket(session, b, "u2")
    u3 = await join_socket(session, a, "u3")
    u4 = await join_socket(session, b, "u4")
    u5 = await join_socket(session, a, "u5")
    everyone = ["u1", "u2", "u3", "u4", "u5"]
    for node in (a, b):
        await eventually(functools.partial(_members_are, session, node, everyone), 3)

    sent = [await publish_ok(session, (a, b)[n % 2], n) for n in range(10)]
    for reader in readers:
        await reader.wait_for(lambda s: set(sent) <= set(published(s)), 5)
    await asyncio.to_thread(servers.wait_replica_synced)

    stop_publishing = asyncio.Event()
    accepted: list[str] = []
    publisher = None
    if scenario == "replica-behind":
        await asyncio.to_thread(servers.detach_replica)
    await u5.close()
    for reader in readers:
        await reader.wait_for(lambda s: ("presence.left", "u5") in s.presence(), 5)
    if scenario == "replica-behind":
        lost = [await publish_ok(session, (a, b)[n % 2], n) for n in range(10, 15)]
        for reader in readers:
            await reader.wait_for(lambda s: set(lost) <= set(published(s)), 5)
    if scenario == "writes-racing-the-kill":
        publisher = asyncio.create_task(keep_publishing(session, (a, b), accepted, stop_publishing))
        await readers[0].wait_for(lambda s: len(published(s)) >= len(sent) + 10, 5)
    # The readers drop off (each holding the last id it got), then the primary dies.
    held = [held_id(reader) for reader in readers]
    for reader in readers:
        await reader.close()
    if scenario == "replica-caught-up":
        await asyncio.to_thread(servers.wait_replica_synced)  # nothing written can be lost
    if scenario == "replica-behind":
        assert servers.detached_at is not None and time.monotonic() - servers.detached_at < 2.5, (
            "too slow: the sentinels may have re-attached the replica")
    killed = servers.kill_primary()
    killed_at = time.monotonic()
    await u3.close()
    new_primary = await asyncio.to_thread(servers.wait_failover, 20)
    failed_over = time.monotonic()
    print(f"sentinel failover in {failed_over - killed_at:.2f}s: {killed} -> {new_primary}")

    # The nodes follow by themselves: ready again, and publishing works on both.
    for node in (a, b):
        await node.wait_ready(max(0.1, failed_over + RECOVERY - time.monotonic()))

    async def publishes(node: Node) -> bool:
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            return (await publish(session, node, -1))[0] == 200
        return False

    for node in (a, b):
        await eventually(functools.partial(publishes, node),
                         max(0.1, failed_over + RECOVERY - time.monotonic()), interval=0.2)
    recovered = time.monotonic() - failed_over
    print(f"nodes ready and publishing {recovered:.2f}s after the failover")
    assert recovered <= RECOVERY
    if publisher is not None:
        stop_publishing.set()
        await asyncio.wait_for(publisher, 10)
    await u4.close()

    # No ghost: presence converges to who is actually connected, on both nodes, and stays so.
    assert not u1_stream.ended and not u2.closed  # connected clients stayed connected
    expected = ["u1", "u2"]
    for node in (a, b):
        await eventually(functools.partial(_members_are, session, node, expected), NODE_TIMEOUT + SLACK)
    await asyncio.sleep(1.0)
    for node in (a, b):
        assert sorted(await members(session, node)) == expected, node.name

    # Resume on the other node with the id each reader held.
    resumed = [await Stream(session, b, "reader-a", last_event_id=held[0]).open(),
               await Stream(session, a, "reader-b", last_event_id=held[1]).open()]
    status, marker = await publish(session, a, 9999)
    assert status == 200, marker
    for stream in resumed:
        await stream.wait_for(lambda s: marker["id"] in published(s) or bool(
            s.of_type("sync.reset") and s.of_type("sync.snapshot")), 10)
    epoch, entries = primary_log(new_primary)
    print(f"held {held}; new primary: epoch {epoch}, {len(entries)} entries; "
          f"{len(accepted)} accepted while racing")
    marker_epoch, _, marker_entry = marker["id"].partition(":")
    assert marker_epoch == epoch and marker_entry in entries

    for last, stream in zip(held, resumed, strict=True):
        last_epoch, _, last_entry = last.partition(":")
        resumable = last_epoch == epoch and last_entry in entries
        if scenario == "replica-caught-up":
            assert resumable, f"{last} lost although the replica had caught up"
        if scenario == "replica-behind":
            assert last_entry not in entries, f"{last} survived although the replica was detached"
        if resumable:
            # Every entry after the held id up to the marker, exactly once, in order; no reset.
            expected_ids = [f"{epoch}:{entry}" for entry in entries
                            if _entry(last_entry) < _entry(entry) <= _entry(marker_entry)]
            assert not stream.of_type("sync.reset", "sync.snapshot"), stream.summary()
            got = published(stream)
            assert got[:got.index(marker["id"]) + 1] == expected_ids
        else:
            # Never a silent gap: a reset first, then a fresh snapshot at the new position.
            assert stream.of_type("sync.reset"), f"{last} cannot be resumed but no reset: {stream.summary()}"
            assert [e.type for e in stream.events[:2]] == ["sync.reset", "sync.snapshot"]
            snapshot: Event = stream.events[1]
            assert snapshot.id is not None and snapshot.id.split(":", 1)[0] == epoch
            assert snapshot.data is not None
            assert sorted(m["user_id"] for m in snapshot.data["data"]["members"]) == expected

    for stream in [*resumed, u1_stream]:
        await stream.close()
    await u2.close()


async def _members_are(session: aiohttp.ClientSession, node: Node, expected: list[str]) -> bool:
    return sorted(await members(session, node)) == sorted(expected)
