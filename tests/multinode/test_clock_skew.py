"""Two real nodes on one Redis, one of them with its wall clock 30 s ahead of (or behind)
everyone's (libfaketime), as users see them: what one node writes as a deadline another
judges, so every such deadline must be on one clock (Redis's: docs/redis.md, "Clocks").

Node ``skewed`` runs under ``FAKETIME=±30s`` (its monotonic clock, and so its event loop's
timers, untouched), or starts on time and has its wall clock stepped 30 s ahead while it runs;
``true`` runs on the host's clock, as Redis does. The bounds say what the
product promises: a REST session lives ``--presence-ttl`` after its last call and a closed
stream's user ``--disconnect-grace``, seen from every node, give or take a sweep and the
delivery (``SLACK``).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import aiohttp
import pytest

from tests.multinode.conftest import Spawner
from tests.multinode.harness import (
    BASE,
    WORKSPACE,
    Node,
    Stream,
    base,
    call,
    eventually,
    faketime_library,
    members,
    redis_cli,
    skewed_clock,
    step_clock,
)

pytestmark = pytest.mark.multinode

SKEW = 30.0
TTL = 8.0  # --presence-ttl
GRACE = 4.0  # --disconnect-grace
MAX_AGE = 20.0  # --history-max-age: shorter than the skew, so judging it on two clocks shows
EARLY = 0.5  # a deadline may pass this much before its time (Redis's clock read once, a sweep)
SLACK = 4.0  # ... and be seen this much after it (a sweep, a loaded machine, the delivery)
RENEW_EVERY = 2.0
ID_DRIFT_MS = 3_000  # how far an entry id's time may be from Redis's clock
STEP_SEEN = 1.5  # libfaketime reads a changed offset within a second (FAKETIME_CACHE_DURATION)


@pytest.fixture(autouse=True)
def _libfaketime() -> None:
    if faketime_library() is None:
        if os.environ.get("GATEWAY_TEST_REQUIRE_FAKETIME"):  # (scripts/test.sh installs it)
            pytest.fail("libfaketime is not installed but the clock-skew tests are required")
        pytest.skip("libfaketime not installed (Debian faketime; scripts/test.sh installs it)")


def left_at(observer: Stream, user: str) -> float | None:
    """When (perf_counter) the observer was told ``user`` left, if it was."""
    for event, arrived in zip(observer.events, observer.arrived, strict=True):
        if event.type == "presence.left" and (event.data or {}).get("data", {}).get("user_id") == user:
            return arrived
    return None


def lifetime(observers: list[Stream], user: str, since: float) -> list[float | None]:
    """Seconds from ``since`` to each observer's ``presence.left`` of ``user``."""
    return [None if (at := left_at(o, user)) is None else round(at - since, 2) for o in observers]


async def publish(session: aiohttp.ClientSession, node: Node, n: int, key: str | None = None,
                  workspace: str = WORKSPACE) -> dict[str, object]:
    headers = {"Idempotency-Key": key} if key else {}
    status, body = await call(session, "POST", f"{node.url}{base(workspace)}/events", "svc",
                              json={"type": "doc.updated", "data": {"n": n}}, headers=headers)
    assert status == 200, body
    return dict(body)


async def renew(session: aiohttp.ClientSession, nodes: tuple[Node, Node], until: float) -> None:
    """A REST user renewing every ``RENEW_EVERY`` s, through each node in turn."""
    for n in range(int(60 / RENEW_EVERY)):  # bounded: ``until`` ends it far sooner
        if time.perf_counter() >= until:
            return
        status, body = await call(session, "POST", f"{nodes[n % 2].url}{BASE}/presence/join", "renewer")
        assert status == 200, body
        await asyncio.sleep(RENEW_EVERY)


async def ticket_status(session: aiohttp.ClientSession, issuer: Node, redeemer: Node) -> int:
    """The status of a stream opened on ``redeemer`` with a ticket issued by ``issuer``."""
    status, body = await call(session, "POST", f"{issuer.url}{BASE}/tickets", "browser")
    assert status == 200, body
    async with session.get(f"{redeemer.url}{BASE}/stream", params={"ticket": body["ticket"]},
                           timeout=aiohttp.ClientTimeout(total=10)) as response:
        return response.status


async def resumed(session: aiohttp.ClientSession, node: Node, workspace: str, after: str,
                  count: int) -> list[str]:
    """The published events' ids a resume from ``after`` on ``node`` is given (``count`` of
    them are awaited), and ``sync.reset`` where it is told history was lost."""
    stream = await Stream(session, node, "reader", last_event_id=after, workspace=workspace).open()

    def told(s: Stream) -> list[str]:
        return [e.type if e.type == "sync.reset" else e.id or ""
                for e in s.of_type("doc.updated", "sync.reset")]
    try:
        await stream.wait_for(lambda s: len(told(s)) >= count or "sync.reset" in told(s), 10)
        return told(stream)
    finally:
        await stream.close()


async def resumes_exact(session: aiohttp.ClientSession, writer: Node, readers: tuple[Node, Node]
                        ) -> dict[str, bool]:
    """Events published on ``writer`` alone (its workspace), resumed on each node from the
    first: exact (no reset) on both? The age judged is the writer's ids' on the reader's clock."""
    workspace = f"by-{writer.name}"
    ids = [str((await publish(session, writer, n, workspace=workspace))["id"]) for n in range(4)]
    return {f"{writer.name}->{reader.name}": await resumed(session, reader, workspace, ids[0], 3) == ids[1:]
            for reader in readers}


async def ids_and_keys(session: aiohttp.ClientSession, nodes: tuple[Node, Node], redis_port: int
                       ) -> dict[str, bool]:
    """Publishes through both nodes in turn: ids in order and on Redis's clock; a key retried
    on either node appends once."""
    sent = [await publish(session, nodes[n % 2], n) for n in range(6)]
    again = [await publish(session, node, 99, key="once") for node in (*nodes, *nodes)]
    ids = [str(body["id"]) for body in (*sent, again[0])]
    entry_ms = [int(i.rsplit(":", 1)[-1].split("-")[0]) for i in ids]
    redis_ms = int(redis_cli(redis_port, "TIME").split()[0]) * 1000
    return {"ids in order": entry_ms == sorted(entry_ms) and len(set(ids)) == len(ids),
            "ids on Redis's clock": all(abs(ms - redis_ms) < ID_DRIFT_MS for ms in entry_ms),
            "a key appends once": all(body == again[0] for body in again)}


def on_time(observers: list[Stream], user: str, since: float, lives: float) -> str:
    """``user``'s ``presence.left``, as each observer got it: on time, or when."""
    seen = [left_at(o, user) for o in observers]
    if all(at is not None and lives - EARLY <= at - since <= lives + SLACK for at in seen):
        return "on time"
    return f"after {[None if at is None else round(at - since, 2) for at in seen]} s"


@pytest.mark.parametrize(("skew", "stepped"), [(SKEW, False), (-SKEW, False), (SKEW, True)],
                         ids=["ahead", "behind", "stepped-ahead-while-running"])
async def test_a_node_whose_clock_is_off_keeps_every_deadline_seen_from_the_other(
    spawn: Spawner, session: aiohttp.ClientSession, tmp_path: Path, skew: float, stepped: bool
) -> None:
    redis = spawn.redis()
    # (JWT times stay each node's own, docs/redis.md "Clocks": the tests' tokens are fresh, with
    # an hour left, and no nbf, so a node 30 s either way accepts them.)
    options = {"extra": ("--presence-ttl", str(TTL), "--history-max-age", str(MAX_AGE)),
               "disconnect_grace": GRACE}
    true, = await spawn.start(redis, "true", **options)
    if stepped:  # started on time, then its wall clock is set 30 s ahead (NTP, a VM resumed)
        clock_file = tmp_path / "skewed-clock"
        skewed, = await spawn.start(redis, "skewed", env=skewed_clock(0, file=clock_file), **options)
        step_clock(clock_file, skew)
        await asyncio.sleep(STEP_SEEN)
    else:
        skewed, = await spawn.start(redis, "skewed", env=skewed_clock(skew), **options)
    nodes = (true, skewed)
    observers = [await Stream(session, node, "observer").open() for node in nodes]
    await asyncio.gather(*(o.wait_for(lambda s: bool(s.of_type("sync.snapshot")), 10) for o in observers))

    # Sessions made on each node; a renewing user; a user whose stream closes (grace).
    grace_stream = await Stream(session, true, "closer").open()
    joined: dict[str, float] = {}  # just before each call: its session's time is no earlier
    for user, node in (("rest-true", true), ("rest-skewed", skewed), ("closer", true)):
        joined[user] = time.perf_counter()
        assert (await call(session, "POST", f"{node.url}{BASE}/presence/join", user))[0] == 200
    renewing = asyncio.create_task(renew(session, nodes, time.perf_counter() + TTL + SLACK))
    closed = time.perf_counter()
    await grace_stream.close()

    # Meanwhile: tickets, ids, idempotency keys and resumes across the two clocks.
    seen: dict[str, object] = {
        "tickets": [await ticket_status(session, true, skewed), await ticket_status(session, skewed, true)],
        **await ids_and_keys(session, nodes, redis.port),
        **await resumes_exact(session, true, nodes),
        **await resumes_exact(session, skewed, nodes),
    }

    async def all_left() -> bool:
        return all(left_at(o, u) is not None for o in observers
                   for u in ("rest-true", "rest-skewed", "closer"))
    await eventually(all_left, TTL + SLACK + 2, what="the expiring users left")
    await renewing
    seen |= {
        "rest-true left": on_time(observers, "rest-true", joined["rest-true"], TTL),
        "rest-skewed left": on_time(observers, "rest-skewed", joined["rest-skewed"], TTL),
        "closer left": on_time(observers, "closer", closed, GRACE),
        "left events": [sorted(u for kind, u in o.presence() if kind == "presence.left") for o in observers],
        "renewer present": ["renewer" in await members(session, node) for node in nodes],
        "clock warned": ["clock is off Redis's" in node.log_path.read_text() for node in nodes],
    }
    assert seen == {
        "tickets": [200, 200],
        "ids in order": True, "ids on Redis's clock": True, "a key appends once": True,
        "true->true": True, "true->skewed": True, "skewed->true": True, "skewed->skewed": True,
        "rest-true left": "on time", "rest-skewed left": "on time", "closer left": "on time",
        "left events": [["closer", "rest-skewed", "rest-true"]] * 2,  # once each, never the renewer
        "renewer present": [True, True],
        # The operator is told which node's clock is off (when it starts so).
        "clock warned": [False, not stepped],
    }
    for observer in observers:
        await observer.close()
