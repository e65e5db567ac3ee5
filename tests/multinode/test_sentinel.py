"""Two gateway nodes on a Sentinel-managed Redis (a primary, one replica, three sentinels):
the primary is SIGKILLed and the nodes must follow the failover by themselves; or it is
demoted while it stays up (below, with the same scenario on a plain ``redis://`` address
that follows the primary).

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
import math
import time

import aiohttp
import pytest

from tests.multinode.conftest import Deployment, Spawner
from tests.multinode.harness import (
    BASE,
    ORG,
    WORKSPACE,
    Endpoint,
    Event,
    Node,
    SentinelServers,
    Stream,
    auth,
    call,
    eventually,
    members,
    redis_cli,
    replica_synced,
    wait_until,
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


async def open_readers(session: aiohttp.ClientSession, a: Node, b: Node) -> list[Stream]:
    """A reader's stream on each node (``reader-a``, ``reader-b``), each past its snapshot."""
    readers = [await Stream(session, a, "reader-a").open(), await Stream(session, b, "reader-b").open()]
    for reader in readers:
        await reader.wait_for(lambda s: bool(s.of_type("sync.snapshot")), 5)
    return readers


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
    readers = await open_readers(session, a, b)

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


# --- A primary demoted while it stays up ----------------------------------------------------------
#
# No kill: the old primary stays up and is turned into a replica, so nothing closes the nodes'
# pooled connections to it. Two ways it happens:
#
# * ``sentinel-failover``: ``SENTINEL FAILOVER``. The sentinels promote the replica and name it
#   at once, but turn the old primary into a replica only when they next look at it (their
#   INFO period, 10 s), and only then close its client connections. Meanwhile it still takes
#   writes, which its resync with the new primary then throws away.
# * ``address-moves``: a plain ``redis://`` URL whose address follows the primary (a DNS name or
#   a virtual IP, as managed Redis services give): Redis's own coordinated ``FAILOVER`` (writes
#   paused until the replica caught up, then the roles swap: nothing is lost), the address
#   still leading to the demoted server for ``DEMOTED_FOR`` (a DNS TTL), then moving. The
#   demoted server's ``READONLY`` answers are the only sign; without an address that moves
#   (the URL names the demoted server itself) writes cannot recover at all.

# Beats every 2 s. A Sentinel failover loses the beats written between the promotion and the
# switch (~1 s: they reach the old primary), and the next one comes up to a period after the
# switch: ~3 s without a beat reaching the new primary, which a 3 s timeout could not survive.
SWITCH_NODE_TIMEOUT = 6.0
# The nodes learn of the switch at once (the sentinels' +switch-master; the demoted server's
# first READONLY) and need one reconnect: 2 s is the pool wait (the longest a command waits
# for a connection before its 503), and under the 4 s a heartbeat key outlives a missed beat.
RECOVERY = 2.0
GRACE = 0.5  # sentinel-failover: a publish begun this soon after the switch may still reach the old primary
MAX_503 = 3  # publishes refused after the switch: the first command on a connection left behind drops the rest
DEMOTED_FOR = 0.5  # address-moves: the address still leads to the demoted server this long
MARKERS = 6


class Demotion:
    """Where the nodes connect, and how their primary is demoted while it stays up."""

    deployment: Deployment
    grace: float  # publishes begun after switch + grace must be on the new primary

    async def demote(self) -> tuple[int, float]:
        """Demote the primary; (the new primary's port, time.monotonic() when every way to
        reach "the primary" leads to it)."""
        raise NotImplementedError


class SentinelFailover(Demotion):
    def __init__(self, servers: SentinelServers) -> None:
        self.servers = self.deployment = servers
        self.grace = GRACE

    async def demote(self) -> tuple[int, float]:
        await asyncio.to_thread(self.servers.wait_replica_synced)
        old = await asyncio.to_thread(self.servers.failover)
        new = await asyncio.to_thread(self.servers.wait_failover, 20)
        switched = time.monotonic()  # every sentinel names the new primary
        print(f"sentinel failover {old} -> {new}; the old primary is now {self.servers.role(old)}")
        return new, switched


class AddressMoves(Demotion):
    def __init__(self, primary: int, replica: int, endpoint: Endpoint) -> None:
        self.primary, self.replica = primary, replica
        self.endpoint = self.deployment = endpoint
        self.grace = -math.inf  # a coordinated failover loses nothing

    async def demote(self) -> tuple[int, float]:
        await asyncio.to_thread(wait_until, functools.partial(replica_synced, self.primary), 10,
                                "replica caught up")
        redis_cli(self.primary, "failover", "to", "127.0.0.1", str(self.replica))

        def swapped() -> bool:
            return (redis_cli(self.replica, "role").splitlines()[0] == "master"
                    and redis_cli(self.primary, "role").splitlines()[0] == "slave")

        await asyncio.to_thread(wait_until, swapped, 10, "FAILOVER done")
        await asyncio.sleep(DEMOTED_FOR)
        self.endpoint.target = self.replica
        return self.replica, time.monotonic()


async def publish_all_the_time(session: aiohttp.ClientSession, node: Node,
                               answers: list[tuple[float, int, str]], stop: asyncio.Event) -> None:
    """Publish on ``node`` every 50 ms: (when the request was sent, status, event id or "")."""
    n = 0
    while not stop.is_set():
        n += 1
        sent = time.monotonic()
        try:
            status, body = await publish(session, node, n)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            status, body = 0, {"error": repr(exc)}
        answers.append((sent, status, str(body.get("id", "")) if status == 200 else ""))
        await asyncio.sleep(0.05)


def markers(stream: Stream) -> list[str]:
    """Ids of the marker events ``stream`` received, in order."""
    return [e.id or "" for e in stream.of_type("doc.updated")
            if "marker" in ((e.data or {}).get("data") or {})]


def types_since(stream: Stream, event_id: str) -> list[str | None]:
    """The types of the events ``stream`` received from ``event_id`` on."""
    first = next(i for i, e in enumerate(stream.events) if e.id == event_id)
    return [e.type for e in stream.events[first:]]


def after_last_reset(stream: Stream) -> list[Event]:
    resets = [i for i, e in enumerate(stream.events) if e.type == "sync.reset"]
    return stream.events[resets[-1] + 1:] if resets else stream.events


@pytest.mark.parametrize("how", ["sentinel-failover", "address-moves"])
async def test_a_primary_demoted_while_up_is_left_at_once_no_accepted_publish_is_lost_no_node_is_reaped(
    spawn: Spawner, session: aiohttp.ClientSession, how: str
) -> None:
    """What users see when the primary is demoted but stays up: publishing recovers within
    ``RECOVERY`` with at most ``MAX_503`` 503s, every publish accepted once the switch is
    done is on the new primary (so resuming from it works), presence writes succeed, no node
    is reaped (its heartbeats never lapsed) — also node-b, whose clients write nothing after
    the switch until that is checked — and events published afterwards reach the streams
    opened before, in order."""
    async with contextlib.AsyncExitStack() as stack:
        demotion: Demotion
        if how == "sentinel-failover":
            demotion = SentinelFailover(spawn.sentinel())
        else:
            primary, replica = spawn.redis(), spawn.redis()
            redis_cli(primary.port, "config", "set", "repl-diskless-sync-delay", "0")  # sync at once
            redis_cli(replica.port, "replicaof", "127.0.0.1", str(primary.port))
            endpoint = await stack.enter_async_context(Endpoint(primary.port))
            stack.callback(spawn.stop_all)  # the nodes go before the address they use
            demotion = AddressMoves(primary.port, replica.port, endpoint)
        a, b = await spawn.start(demotion.deployment, "node-a", "node-b", node_timeout=SWITCH_NODE_TIMEOUT)
        # alice on a, bob on b: each joined (REST) and holding a stream, which binds the
        # session to its node, so a node reaped would end its user's presence.
        streams: dict[str, Stream] = {}
        for user, node in (("alice", a), ("bob", b)):
            assert (await call(session, "POST", f"{node.url}{BASE}/presence/join", user))[0] == 200
            streams[user] = await Stream(session, node, user).open()
        for node in (a, b):
            await eventually(functools.partial(_members_are, session, node, ["alice", "bob"]), 5)

        answers: list[tuple[float, int, str]] = []
        stop = asyncio.Event()
        publisher = asyncio.create_task(publish_all_the_time(session, a, answers, stop))
        for stream in streams.values():
            await stream.wait_for(lambda s: len(published(s)) >= 5, 5)
        began = time.monotonic()
        new_primary, switched = await demotion.demote()
        print(f"{how}: switched {switched - began:.2f}s after the demotion began")

        # Publishing recovers at once, with few 503s; accepted publishes are on the new primary.
        await asyncio.sleep(RECOVERY + 1.0)
        assert {status for _, status, _ in answers} <= {200, 503}, answers
        after = [(sent - switched, status) for sent, status, _ in answers if sent >= switched]
        refused = [round(t, 2) for t, status in after if status == 503]
        print(f"{how}: 503 before the switch: "
              f"{sum(1 for sent, status, _ in answers if sent < switched and status == 503)}, "
              f"after it at {refused}")
        assert len(refused) <= MAX_503, refused
        assert all(status == 200 for t, status in after if t > RECOVERY), after
        epoch, entries = primary_log(new_primary)
        accepted = [(sent - switched, event_id) for sent, status, event_id in answers
                    if status == 200 and sent >= switched + demotion.grace]
        lost = [(round(t, 2), event_id) for t, event_id in accepted
                if event_id.partition(":")[2] not in entries]
        assert not lost, (f"{len(lost)} of {len(accepted)} publishes accepted after the switch "
                          f"are not on the new primary: {lost[:3]}...{lost[-3:]}")

        # A stream that got events the new primary lacks gets a reset (never a silent gap);
        # the others get none.
        for user, stream in streams.items():
            gone = [i for i in published(stream) if i.partition(":")[2] not in entries]
            if gone:
                await stream.wait_for(lambda s: bool(s.of_type("sync.reset")), 5)
                assert [e.type for e in after_last_reset(stream)[:1]] == ["sync.snapshot"]
            else:
                assert not stream.of_type("sync.reset"), (user, stream.summary())

        # No node is reaped: node_timeout after the switch, alice and bob are still members on
        # both nodes, and nobody was told they left.
        await asyncio.sleep(max(0.0, switched + SWITCH_NODE_TIMEOUT + SLACK - time.monotonic()))
        for node in (a, b):
            assert sorted(await members(session, node)) == ["alice", "bob"], node.name
        for user, stream in streams.items():
            assert not stream.ended, user
            assert not [p for p in stream.presence() if p[0] == "presence.left"], (user, stream.summary())
        stop.set()
        await asyncio.wait_for(publisher, 10)

        # Presence writes and publishes succeed on both nodes; the streams opened before the
        # demotion get the events in order, and they are on the new primary.
        for user, node in (("alice", a), ("bob", b)):
            status, body = await call(session, "POST", f"{node.url}{BASE}/presence/viewing", user,
                                      params={"resource_type": "document", "resource_id": f"doc-{user}"})
            assert status == 200, body
        sent_markers = []
        for n in range(MARKERS):
            status, body = await call(session, "POST", f"{(a, b)[n % 2].url}{BASE}/events", "svc",
                                      json={"type": "doc.updated", "data": {"marker": n}})
            assert status == 200, body
            sent_markers.append(str(body["id"]))
        for user, stream in streams.items():
            await stream.wait_for(lambda s: len(markers(s)) >= MARKERS and len(
                s.of_type("presence.viewing")) >= 2, 5)
            assert markers(stream) == sent_markers, (user, stream.summary())
            assert "sync.reset" not in types_since(stream, sent_markers[0]), (user, stream.summary())
        epoch, entries = primary_log(new_primary)
        assert all(m.partition(":")[0] == epoch and m.partition(":")[2] in entries for m in sent_markers)
        for user in ("alice", "bob"):
            record = json.loads(redis_cli(new_primary, "hget", "gw:{org-1:ws-1}:presence", user))
            assert f"doc-{user}" in json.dumps(record), record

        # Resuming from the first marker, on the other node: the rest, no reset.
        resumed = await Stream(session, b, "carol", last_event_id=sent_markers[0]).open()
        await resumed.wait_for(lambda s: len(markers(s)) >= MARKERS - 1, 5)
        assert markers(resumed) == sent_markers[1:] and not resumed.of_type("sync.reset")
        for stream in [*streams.values(), resumed]:
            await stream.close()
