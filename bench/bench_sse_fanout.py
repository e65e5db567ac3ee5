"""SSE fan-out on one node: publish-to-receive latency and delivered events per second.

Starts one gateway process (embedded backend) on a free loopback port, opens
``--clients`` SSE streams, publishes ``--events`` events over HTTP at
``--rate`` per second, and prints latency percentiles (publish call start to
the event's arrival at each client) and throughput. Bounded by count and by
``--deadline`` seconds; stops the gateway it started.

    .venv/bin/python bench/bench_sse_fanout.py --clients 200 --events 500 --rate 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.auth import mint_token

SECRET = "bench-secret-" + "b" * 32


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


async def wait_ready(session: aiohttp.ClientSession, url: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            async with session.get(f"{url}/readyz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise SystemExit("gateway did not become ready")


async def reader(session: aiohttp.ClientSession, url: str, token: str, expected: int,
                 latencies: list[float], ready: asyncio.Event, counter: list[int]) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    async with session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=None)) as resp:
        got = 0
        async for line in resp.content:
            if line.startswith(b"event: sync.snapshot"):
                counter[0] += 1
                if counter[0] == counter[1]:
                    ready.set()
            if line.startswith(b"data: ") and b'"bench.tick"' in line:
                sent = json.loads(line[6:])["data"]["t"]
                latencies.append(time.time() - sent)
                got += 1
                if got == expected:
                    return


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--events", type=int, default=500)
    parser.add_argument("--rate", type=float, default=200.0, help="events published per second")
    parser.add_argument("--deadline", type=float, default=120.0, help="give up after this many seconds")
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--port", str(port), "--jwt-secret", SECRET,
         "--log-level", "WARNING", "--send-buffer", "100000"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + args.deadline
    try:
        token = mint_token(SECRET, sub="bench", org_id="o", workspaces=["w"], ttl=3600)
        stream = f"{url}/v1/orgs/o/workspaces/w/sync/stream"
        latencies: list[float] = []
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            await wait_ready(session, url, deadline)
            ready, counter = asyncio.Event(), [0, args.clients]
            readers = [asyncio.create_task(reader(session, stream, token, args.events, latencies,
                                                  ready, counter)) for _ in range(args.clients)]
            await asyncio.wait_for(ready.wait(), deadline - time.monotonic())
            started = time.monotonic()
            publish = f"{url}/v1/orgs/o/workspaces/w/sync/events"
            headers = {"Authorization": f"Bearer {token}"}
            for i in range(args.events):
                body = {"type": "bench.tick", "data": {"i": i, "t": time.time()}}
                async with session.post(publish, json=body, headers=headers) as response:
                    assert response.status == 200, await response.text()
                next_at = started + (i + 1) / args.rate
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            _, pending = await asyncio.wait(readers, timeout=max(1.0, deadline - time.monotonic()))
            elapsed = time.monotonic() - started
            for task in pending:
                task.cancel()
        delivered = len(latencies)
        expected = args.clients * args.events
        print(f"clients={args.clients} events={args.events} rate={args.rate:g}/s "
              f"delivered={delivered}/{expected} in {elapsed:.2f}s "
              f"({delivered / elapsed:,.0f} deliveries/s)")
        if latencies:
            print(f"latency ms: p50={percentile(latencies, 0.50) * 1000:.2f} "
                  f"p90={percentile(latencies, 0.90) * 1000:.2f} "
                  f"p99={percentile(latencies, 0.99) * 1000:.2f} "
                  f"max={max(latencies) * 1000:.2f}")
        stat = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
        print(f"gateway CPU: {cpu:.2f}s ({delivered / cpu:,.0f} deliveries per gateway CPU-second)")
        rss = Path(f"/proc/{process.pid}/status").read_text() if os.path.exists(
            f"/proc/{process.pid}/status") else ""
        for line in rss.splitlines():
            if line.startswith("VmHWM"):
                print(f"gateway peak RSS: {line.split(':')[1].strip()}")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


if __name__ == "__main__":
    asyncio.run(main())
