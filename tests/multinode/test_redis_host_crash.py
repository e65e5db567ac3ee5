"""Redis with ``appendonly yes`` and ``appendfsync everysec`` (the deploy kit's setting) dies
with its host: the AOF keeps only what the OS had flushed, so the last second's acknowledged
writes are gone while the log's epoch key (written long before) survives.

What users must see, on two real nodes (SIGKILL, then the AOF cut back to its size at the
"last fsync", as a power loss leaves it): every open stream that had been given a lost event
gets ``sync.reset`` and a snapshot — never a silent gap, although the new ids after the
restart are numerically larger than the lost ones — and a client resuming with the id of a
lost event is reset too. A SIGKILL alone (the process dies, the host does not: the kernel
still has every byte Redis wrote before answering) loses nothing and resets nobody
(``test_cluster.test_redis_killed_and_restarted``).
"""

from __future__ import annotations

import json

import aiohttp
import pytest

from tests.multinode.conftest import Spawner
from tests.multinode.harness import BASE, Stream, call, redis_cli, workspace_log_key

pytestmark = pytest.mark.multinode

NODE_TIMEOUT = 3.0
LOG_KEY = workspace_log_key()


def published(stream: Stream) -> list[str]:
    return [e.id or "" for e in stream.events if e.type and not e.type.startswith("sync.")]


async def publish(session: aiohttp.ClientSession, url: str, n: int) -> str:
    status, body = await call(session, "POST", f"{url}{BASE}/events", "svc",
                              json={"type": "doc.updated", "data": {"n": n}})
    assert status == 200, body
    return str(body["id"])


async def test_a_host_crash_that_loses_acknowledged_events_resets_who_saw_them_never_a_gap(
    spawn: Spawner, session: aiohttp.ClientSession
) -> None:
    redis = spawn.redis(persist=True, fsync="everysec")
    a, b = await spawn.start(redis, "node-a", "node-b", node_timeout=NODE_TIMEOUT)
    watchers = [await Stream(session, node, f"watch-{node.name}").open() for node in (a, b)]
    kept = [await publish(session, (a, b)[n % 2].url, n) for n in range(10)]
    for watcher in watchers:
        await watcher.wait_for(lambda s: kept[-1] in published(s), 5)
    synced = redis.aof_tail()  # the last fsync: everything up to here survives the crash
    lost = [await publish(session, (a, b)[n % 2].url, n) for n in range(10, 20)]
    for watcher in watchers:
        await watcher.wait_for(lambda s: lost[-1] in published(s), 5)

    assert redis.crash_host(synced) > 0
    redis.start()
    # The fault is real: the restored log ends at the last kept event, the epoch survived.
    held = json.loads(redis_cli(redis.port, "xrange", LOG_KEY, "-", "+", json_output=True) or "[]")
    held_ids = {entry[0] for entry in held}
    assert {event.split(":")[1] for event in kept} <= held_ids
    assert not {event.split(":")[1] for event in lost} & held_ids
    for node in (a, b):
        await node.wait_ready(15)

    # Both nodes had read the lost events: each notices once Redis is back, with nothing
    # published meanwhile, and resets its stream (never reading on past the loss).
    for watcher in watchers:
        await watcher.wait_for(lambda s: len(s.of_type("sync.snapshot")) == 2, 15)
    after = await publish(session, b.url, 99)
    for watcher in watchers:
        await watcher.wait_for(lambda s: after in published(s), 5)
        types = [event.type for event in watcher.events]
        assert types[21:] == ["sync.reset", "sync.snapshot", "doc.updated"], types
        assert published(watcher) == [*kept, *lost, after]  # each once, in order
        # The loss gave the log a new epoch: the snapshot and what follows are in it.
        assert watcher.events[22].id.split(":")[0] == after.split(":")[0] != lost[-1].split(":")[0]

    for held_id in (lost[-1], lost[0]):  # resuming from an event that no longer exists
        resumed = await Stream(session, a, "late", last_event_id=held_id).open()
        await resumed.wait_for(lambda s: bool(s.of_type("sync.snapshot")), 5)
        assert [event.type for event in resumed.events[:2]] == ["sync.reset", "sync.snapshot"]
        assert resumed.events[1].id == after  # a snapshot of the log as it is now
        await resumed.close()
    for watcher in watchers:
        await watcher.close()
