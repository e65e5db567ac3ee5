"""The operator's Sentinel probe of issue 20, repeated: a primary, a replica and ONE sentinel
(``down-after-milliseconds 1000``, ``failover-timeout 5000``), two gateway nodes, the primary
SIGKILLed with a caught-up replica, ``ROUNDS`` times, failing back and forth between the two
data servers (the killed one comes back, empty, as a replica of the new primary). Odd rounds
kill it while idle, even ones while publishers write through both nodes.

Each round, what users see is checked against the new primary itself (redis-cli):

* writes are refused for at most ``REFUSED_FOR`` seconds after the sentinel promotes the
  replica, on both nodes, and both nodes are ready again by then;
* no ``sync.reset`` on the streams opened before the first kill unless an acknowledged entry
  is really missing on the new primary (on loopback with a caught-up replica, none is: the
  epoch is unchanged and every entry the stream held before the kill is still there);
* every acknowledged event that the new primary holds reaches both open streams, once, in
  the order of the log;
* presence: the users connected are the members on both nodes, nobody else (no ghost of a
  socket that closed while Redis had no primary).

The issue's own failures came from the probe's start-up, when no replica could take over:
the second test starts the sentinel before the replica's first sync and checks that a node
says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from dataclasses import dataclass, field

import aiohttp
import pytest

from gateway.redis_topology import REPLICA_CHECK
from tests.multinode.conftest import Spawner
from tests.multinode.harness import (
    BASE,
    Event,
    Node,
    SentinelServers,
    Stream,
    auth,
    call,
    eventually,
    members,
)
from tests.multinode.test_sentinel import _members_are, join_socket, open_readers, primary_log

pytestmark = pytest.mark.multinode

ROUNDS = 5
# From the sentinel naming the new primary to every publish answered 200 on both nodes: the
# nodes hear +switch-master (or find the new primary at their next connection) at once, and
# one reconnect follows. 5 s leaves room for a loaded 2-core machine.
REFUSED_FOR = 5.0
SETTLED = 1.0  # publishing counts as recovered once every publish for this long was a 200
# A failover takes ~2 s (down-after 1 s, then the promotion), during which no heartbeat
# lands: a timeout of 6 s keeps the nodes from reaping each other, so that presence shows
# only what users did.
NODE_TIMEOUT = 6.0
SLACK = 1.5  # heartbeat phase + one sweep + delivery
STAYING = ["alice", "bob"]
NO_REPLICA = "the sentinels know no replica in sync with the primary"  # the nodes' warning...
REPLICA_AGAIN = "the sentinels know a replica in sync with the primary again"  # ...and its end


@dataclass
class Answer:
    sent: float  # time.monotonic()
    node: str
    status: int
    event_id: str = ""


@dataclass
class Publishers:
    """Publish on both nodes all the time, whatever the answers; every answer recorded."""

    session: aiohttp.ClientSession
    nodes: tuple[Node, Node]
    answers: list[Answer] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self._stop.clear()
        self._tasks = [asyncio.create_task(self._publish(node)) for node in self.nodes]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), 10)

    async def _publish(self, node: Node) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            sent = time.monotonic()
            answer = Answer(sent, node.name, 0)
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with self.session.post(
                    f"{node.url}{BASE}/events", headers=auth("svc"),
                    json={"type": "doc.updated", "data": {"n": n, "node": node.name}},
                    timeout=aiohttp.ClientTimeout(total=REFUSED_FOR),
                ) as response:
                    answer.status = response.status
                    if response.status == 200:
                        answer.event_id = str((await response.json())["id"])
            self.answers.append(answer)
            await asyncio.sleep(0.05)

    def settled_since(self, node: str, since: float) -> float | None:
        """When ``node``'s publishes began being accepted for good (every one sent from then
        on, for at least ``SETTLED``, was a 200); None if not yet."""
        mine = [a for a in self.answers if a.node == node and a.sent >= since]
        refused = [a.sent for a in mine if a.status != 200]
        good_from = max(refused, default=since)
        accepted = [a.sent for a in mine if a.status == 200 and a.sent > good_from]
        if accepted and accepted[-1] - accepted[0] >= SETTLED:
            return accepted[0]
        return None

    def accepted(self) -> list[str]:
        return [a.event_id for a in self.answers if a.status == 200]


def _entry(event_id: str) -> str:
    """The stream entry id of an event id (``<epoch>:<ms>-<seq>``)."""
    return event_id.partition(":")[2]


def docs(stream: Stream) -> list[str]:
    """The ids of the published events ``stream`` received, in order."""
    return [event.id or "" for event in stream.of_type("doc.updated")]


async def _read_all(ws: aiohttp.ClientWebSocketResponse) -> None:
    """Read a socket until it closes (aiohttp answers pings only while reading)."""
    while not ws.closed:
        message = await ws.receive()
        if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
            return


async def wait_recovered(publishers: Publishers, nodes: tuple[Node, Node], promoted: float) -> dict[str, float]:
    """Seconds from the promotion until each node's publishes were accepted for good (waits
    ``REFUSED_FOR`` and a little more at most), measured once every publish has its answer
    (the publishers are stopped)."""
    async def settled() -> bool:
        return all(publishers.settled_since(node.name, promoted) is not None for node in nodes)

    await eventually(settled, REFUSED_FOR + SETTLED + 2, interval=0.1, what="publishing recovered")
    await publishers.stop()
    since = {node.name: publishers.settled_since(node.name, promoted) for node in nodes}
    return {name: round(at - promoted, 2) for name, at in since.items() if at is not None}


def resets(stream: Stream, since: int) -> list[Event]:
    """The ``sync.reset`` events ``stream`` received from its event number ``since`` on."""
    return [event for event in stream.events[since:] if event.type == "sync.reset"]


def _caught_up(stream: Stream, *, wanted: set[str], since: int) -> bool:
    return wanted <= set(docs(stream)) or _reset_since(stream, since=since)


def _reset_since(stream: Stream, *, since: int) -> bool:
    return bool(resets(stream, since))


async def check_streams(readers: list[Stream], since: list[int], accepted: list[str], held: set[str],
                        lost: set[str], same_epoch: bool) -> None:
    """Every acknowledged event the new primary holds (``held``: its entry ids) reached
    every reader once, in log order, with no reset since its event number ``since``, unless
    entries were ``lost``: then a reader that had one gets a reset."""
    expected = sorted((event_id for event_id in accepted if _entry(event_id) in held),
                      key=lambda event_id: tuple(map(int, _entry(event_id).split("-"))))
    wanted = set(expected)
    for reader, start in zip(readers, since, strict=True):
        await reader.wait_for(functools.partial(_caught_up, wanted=wanted, since=start), 5)
        if lost:  # (only under load: writes racing the kill) a reader that saw them resets
            if lost & set(map(_entry, docs(reader))):
                await reader.wait_for(functools.partial(_reset_since, since=start), 5)
            continue
        assert same_epoch, "a new epoch although nothing was lost"
        assert not resets(reader, start), (reader.node.name, reader.summary())
        got = [event_id for event_id in docs(reader) if event_id in wanted]
        assert got == expected, (reader.node.name, reader.summary())
        assert len(set(docs(reader))) == len(docs(reader)), (reader.node.name, "an event twice")


async def check_members(session: aiohttp.ClientSession, nodes: tuple[Node, Node]) -> None:
    """Presence converges to the users still connected, on both nodes (no ghost)."""
    for node in nodes:
        with contextlib.suppress(AssertionError):
            await eventually(functools.partial(_members_are, session, node, STAYING), NODE_TIMEOUT + SLACK)
        assert sorted(await members(session, node)) == STAYING, node.name


async def _replica_said(node: Node) -> bool:
    """``node`` warned that no replica could take over, and its last word is that one can."""
    lines = [line for line in node.log_path.read_text().splitlines() if NO_REPLICA in line or REPLICA_AGAIN in line]
    return any(NO_REPLICA in line for line in lines) and REPLICA_AGAIN in lines[-1]


async def test_repeated_sentinel_failovers_with_one_sentinel_are_fast_and_exact(
    spawn: Spawner, session: aiohttp.ClientSession
) -> None:
    servers: SentinelServers = spawn.sentinel(sentinels=1, down_after=1000, failover_timeout=5000)
    a, b = await spawn.start(servers, "node-a", "node-b", node_timeout=NODE_TIMEOUT)
    readers = await open_readers(session, a, b)
    # alice: REST presence kept alive by her stream on a; bob: a socket on b. Both stay.
    assert (await call(session, "POST", f"{a.url}{BASE}/presence/join", "alice"))[0] == 200
    alice = await Stream(session, a, "alice").open()
    bob = await join_socket(session, b, "bob")
    bob_reads = asyncio.create_task(_read_all(bob))  # answers the server's pings: bob stays
    publishers = Publishers(session, (a, b))
    primary = servers.primary_port()
    epoch, _ = primary_log(primary)

    async def flowing() -> bool:
        return len(publishers.accepted()) >= 20

    for round_ in range(1, ROUNDS + 1):
        loaded = round_ % 2 == 0
        # A guest joins (a socket, on b and a in turn) and closes it right after the kill, while
        # Redis has no primary, so his leave fails then: he must not stay a member (a ghost).
        guest = await join_socket(session, (a, b)[round_ % 2], f"guest-{round_}")
        for node in (a, b):
            await eventually(functools.partial(_members_are, session, node, [*STAYING, f"guest-{round_}"]),
                             5, what=f"round {round_}: guest joined on {node.name}")
        if loaded:
            publishers.start()
            await eventually(flowing, 5, what="publishing")
        else:
            await asyncio.to_thread(servers.wait_replica_synced)
        _, before = primary_log(primary)
        since = [len(reader.events) for reader in readers]
        killed = servers.kill_primary()
        killed_at = time.monotonic()
        close_guest = asyncio.create_task(guest.close())
        primary = await asyncio.to_thread(servers.wait_failover, 20)
        promoted = time.monotonic()
        await close_guest
        if not loaded:
            publishers.start()

        # Writes are accepted again on both nodes within REFUSED_FOR of the promotion.
        recovered = await wait_recovered(publishers, (a, b), promoted)
        print(f"round {round_} ({'loaded' if loaded else 'idle'}): promoted {promoted - killed_at:.2f}s "
              f"after the kill of {killed}; writes accepted again after {recovered} s")
        assert all(delay <= REFUSED_FOR for delay in recovered.values()), (round_, recovered)
        assert {answer.status for answer in publishers.answers} <= {0, 200, 503}, "never a 500"
        for node in (a, b):
            await node.wait_ready(max(0.1, promoted + REFUSED_FOR - time.monotonic()))

        # Against the new primary: what was written is still there, in the same epoch.
        new_epoch, entries = primary_log(primary)
        held = set(entries)
        lost = {entry for entry in [*before, *map(_entry, publishers.accepted())] if entry not in held}
        print(f"round {round_}: epoch {new_epoch}, {len(entries)} entries, lost {sorted(lost)[:5]}")
        assert loaded or not lost, f"round {round_}: the caught-up replica lost {lost}"
        await check_streams(readers, since, publishers.accepted(), held, lost, new_epoch == epoch)
        epoch = new_epoch
        publishers.answers.clear()

        await check_members(session, (a, b))
        assert not alice.ended and not bob.closed
        await asyncio.to_thread(servers.restart_as_replica, killed)

    for stream in [*readers, alice]:
        await stream.close()
    await bob.close()
    await asyncio.wait_for(bob_reads, 5)
    # Between a kill and the restart no replica could take over, and the nodes said so; once
    # the last one restarted was in sync, they said that too.
    for node in (a, b):
        await eventually(functools.partial(_replica_said, node), REPLICA_CHECK + 3,
                         what=f"{node.name} saw the replica in sync again")


async def test_a_node_warns_while_the_sentinels_know_no_replica_that_could_take_over(
    spawn: Spawner
) -> None:
    """The operator's probe of issue 20, as it was run: everything started at once. Redis
    7.0 starts a new replica's first sync 5 s after it connects, and a sentinel learns of a
    replica (and of its sync) from INFO every 10 s; killed in those first seconds, the
    primary has no successor (writes answered 503 for 45 s: the sentinel aborted
    ``-failover-abort-no-good-slave`` every 2 x failover-timeout), or an empty one is promoted
    (every stream resets, the log is lost). Nothing in the gateway could make that exact, but
    a node says so at once instead of staying silent until the primary dies."""
    servers = spawn.sentinel(sentinels=1, down_after=1000, failover_timeout=5000, initial_sync_delay=5)
    (node,) = await spawn.start(servers, "node-a")

    async def warned() -> bool:
        return NO_REPLICA in node.log_path.read_text()

    await eventually(warned, 5, what="the node's warning")
