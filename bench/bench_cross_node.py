"""Cross-node latency: a private redis-server and two gateway nodes on loopback.

* delivery: ``POST .../events`` on node A, until an SSE client of node B has the event
  (the time is taken just before the request is sent and when the client parsed it);
* presence convergence: ``POST .../presence/join`` (then ``leave``) on node A, until node
  B has applied it to its replica (its SSE client receives the ``presence.*`` event,
  which B sends only after applying it; a ``GET .../presence`` on B is checked too).

Run: ``.venv/bin/python bench/bench_cross_node.py [--events 1000] [--users 200]``.
Prints numbers and exits; starts and stops only its own processes.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.multinode.harness import (
    BASE,
    Node,
    RedisServer,
    Stream,
    auth,
    members,
)


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    ms = [value * 1000 for value in ordered]

    def at(q: float) -> float:
        return ms[min(len(ms) - 1, round(q * (len(ms) - 1)))]

    return (f"n={len(ms)}  p50={at(0.50):.2f} ms  p90={at(0.90):.2f} ms  "
            f"p99={at(0.99):.2f} ms  max={ms[-1]:.2f} ms  mean={statistics.fmean(ms):.2f} ms")


async def delivery(session: aiohttp.ClientSession, a: Node, b: Node, count: int,
                   warmup: int) -> list[float]:
    stream = await Stream(session, b, "bench-reader").open()
    await stream.wait_for(lambda s: bool(s.events), 5)
    sent_at: dict[str, float] = {}
    for n in range(warmup + count):
        started = time.perf_counter()
        async with session.post(f"{a.url}{BASE}/events", headers=auth("bench-svc"),
                                json={"type": "bench.ping", "data": {"n": n}}) as response:
            body = await response.json()
            assert response.status == 200, body
        if n >= warmup:
            sent_at[body["id"]] = started
        await asyncio.sleep(0.002)  # ~ a few hundred events/s, not a flood
    await stream.wait_for(lambda s: all(i in {e.id for e in s.events} for i in sent_at), 30)
    latencies = [arrived - sent_at[event.id]
                 for event, arrived in zip(stream.events, stream.arrived, strict=True)
                 if event.id in sent_at]
    await stream.close()
    return latencies


async def convergence(session: aiohttp.ClientSession, a: Node, b: Node,
                      users: int) -> tuple[list[float], list[float], float]:
    stream = await Stream(session, b, "bench-watcher").open()
    await stream.wait_for(lambda s: bool(s.events), 5)
    joins: list[float] = []
    leaves: list[float] = []
    for n in range(users):
        user = f"bench-user-{n}"
        for path, kind, into in (("join", "presence.joined", joins),
                                 ("leave", "presence.left", leaves)):
            before = len(stream.events)
            started = time.perf_counter()
            async with session.post(f"{a.url}{BASE}/presence/{path}", headers=auth(user)) as r:
                assert r.status == 200, await r.text()

            def seen(s: Stream, kind: str = kind, user: str = user, before: int = before) -> bool:
                return any(e.type == kind and (e.data or {}).get("data", {}).get("user_id") == user
                           for e in s.events[before:])

            await stream.wait_for(seen, 5)
            index = next(i for i in range(before, len(stream.events))
                         if stream.events[i].type == kind)
            into.append(stream.arrived[index] - started)
    # Read-side check: a GET on B right after a join on A.
    started = time.perf_counter()
    async with session.post(f"{a.url}{BASE}/presence/join", headers=auth("bench-final")) as r:
        assert r.status == 200
    for _ in range(5_000):  # polls an HTTP endpoint on purpose: this is what a reader sees
        if "bench-final" in await members(session, b):
            break
        await asyncio.sleep(0.001)
    get_visible = time.perf_counter() - started
    await stream.close()
    return joins, leaves, get_visible


async def main(events: int, users: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        redis = RedisServer(directory / "redis", persist=False)
        redis.start()
        nodes = [Node(name, redis.url, directory, extra=("--log-level", "WARNING"))
                 for name in ("bench-a", "bench-b")]
        try:
            for node in nodes:
                node.start()
            await asyncio.gather(*(node.wait_ready() for node in nodes))
            a, b = nodes
            async with aiohttp.ClientSession() as session:
                latencies = await delivery(session, a, b, events, warmup=50)
                joins, leaves, get_visible = await convergence(session, a, b, users)
            print("cross-node delivery (POST /events on A -> SSE client of B):")
            print("  " + percentiles(latencies))
            print("presence convergence (POST /presence/join on A -> applied on B):")
            print("  joined: " + percentiles(joins))
            print("  left:   " + percentiles(leaves))
            print(f"  GET /presence on B shows a join made on A after {get_visible * 1000:.2f} ms")
        finally:
            for node in nodes:
                node.stop()
            redis.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--users", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(main(args.events, args.users))
