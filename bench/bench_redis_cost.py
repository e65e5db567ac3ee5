"""What the gateway costs one Redis: server CPU per operation and memory per retained event.

A private redis-server on a free loopback port and one RedisBroker in this process (no
HTTP): it follows W workspaces, appends E events of ~200 B spread over them, makes P
presence changes, then reads Redis's own counters (``INFO commandstats``: calls and CPU
µs per call, per command) and ``MEMORY USAGE`` of a full log. Bounded; prints a table.

    .venv/bin/python bench/bench_redis_cost.py [--workspaces 1000] [--events 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from redis.asyncio import Redis

from gateway.broker import tail
from gateway.broker_redis import RedisBroker
from gateway.presence import session_join, session_leave
from protocol.envelope import Envelope, EventId, WorkspaceKey


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_ready(port: int) -> None:
    for _ in range(100):
        with contextlib.suppress(OSError):
            client = Redis(port=port)
            if await client.ping():
                await client.aclose()
                return
        await asyncio.sleep(0.05)
    raise RuntimeError("redis-server did not start")


async def commandstats(raw: Redis) -> dict[str, tuple[int, float]]:
    stats = await raw.info("commandstats")
    return {name.removeprefix("cmdstat_"): (int(v["calls"]), float(v["usec"]))
            for name, v in stats.items()}


def delta(after: dict[str, tuple[int, float]], before: dict[str, tuple[int, float]]) -> dict[str, tuple[int, float]]:
    out = {}
    for name, (calls, usec) in after.items():
        calls0, usec0 = before.get(name, (0, 0.0))
        if calls > calls0:
            out[name] = (calls - calls0, usec - usec0)
    return out


# Commands the gateway only runs inside its scripts: their time is part of evalsha's.
IN_SCRIPTS = {"xadd", "xrange", "xinfo|stream", "xtrim", "spublish", "persist", "set", "hset", "hdel",
              "zadd", "zrem", "sadd", "srem", "hgetall", "exists"}


def report(title: str, stats: dict[str, tuple[int, float]], per: int, unit: str) -> None:
    """Redis CPU per unit: evalsha (with the commands its scripts run) plus the commands
    sent on their own (a command also run in scripts is counted as in scripts: a slight
    undercount)."""
    total = sum(usec for name, (_, usec) in stats.items() if name not in IN_SCRIPTS)
    print(f"\n{title}: Redis CPU about {total / per:.1f} µs per {unit}")
    for name, (calls, usec) in sorted(stats.items(), key=lambda item: -item[1][1])[:8]:
        print(f"  {name:<14} {calls / per:7.2f} calls/{unit}  {usec / per:8.1f} µs/{unit}")


async def main(args: argparse.Namespace) -> None:
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", directory],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            await wait_ready(port)
            await measure(port, args)
        finally:
            server.terminate()
            server.wait(10)


async def measure(port: int, args: argparse.Namespace) -> None:
    raw = Redis(port=port)
    broker = RedisBroker(f"redis://127.0.0.1:{port}/0", node_id="cost", history_max_len=10_000)
    await broker.start()
    workspaces = [WorkspaceKey("org", f"w{n}") for n in range(args.workspaces)]
    received = 0
    done = asyncio.Event()

    async def follow(workspace: WorkspaceKey, after: EventId) -> None:
        nonlocal received
        async for batch in tail(broker, workspace, after):
            received += len(batch)
            if received >= args.events:
                done.set()

    starts = [(await broker.presence_snapshot(ws)).position for ws in workspaces]
    readers = [asyncio.create_task(follow(ws, start)) for ws, start in zip(workspaces, starts, strict=True)]
    await asyncio.sleep(1.0)

    before = await commandstats(raw)
    await asyncio.sleep(5.0)
    idle = delta(await commandstats(raw), before)
    print(f"idle, {args.workspaces} followed workspaces, 5 s: "
          f"{sum(c for c, _ in idle.values())} commands ({', '.join(sorted(idle))})")

    data = {"id": "doc-1", "title": "x" * 150}
    before = await commandstats(raw)
    started = time.perf_counter()
    sem = asyncio.Semaphore(64)

    async def append(n: int) -> Envelope:
        async with sem:
            return await broker.append(workspaces[n % len(workspaces)], "doc.updated",
                                       {"type": "service", "id": "bench"}, {**data, "n": n})

    await asyncio.gather(*(append(n) for n in range(args.events)))
    await asyncio.wait_for(done.wait(), 60)
    elapsed = time.perf_counter() - started
    report(f"publish + delivery to one following node ({args.events} events, {elapsed:.1f} s)",
           delta(await commandstats(raw), before), args.events, "event")

    before = await commandstats(raw)
    changes = 0
    for n in range(args.presence):
        ws = workspaces[n % len(workspaces)]
        await broker.change_presence(ws, f"u{n}", session_join(f"u{n}", {"type": "user", "id": f"u{n}"},
                                                               "s1", "cost"))
        await broker.change_presence(ws, f"u{n}", session_leave("s1"))
        changes += 2
    await asyncio.sleep(0.5)
    report("presence change (join or leave) + delivery", delta(await commandstats(raw), before),
           changes, "change")

    full = WorkspaceKey("org", "full")
    for chunk in range(0, 10_000, 500):
        await asyncio.gather(*(broker.append(full, "doc.updated", {"type": "service", "id": "bench"},
                                             {**data, "n": n}) for n in range(chunk, chunk + 500)))
    usage: Any = await raw.memory_usage(broker.keys.log(full), samples=0)
    print(f"\nmemory: a log of 10,000 events of ~200 B data: {usage / 1e6:.1f} MB "
          f"({usage / 10_000:.0f} B per event)")
    for reader in readers:
        reader.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    await broker.close()
    await raw.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspaces", type=int, default=1000)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--presence", type=int, default=1000)
    asyncio.run(asyncio.wait_for(main(parser.parse_args()), 300))
