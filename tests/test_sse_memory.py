"""A client resuming far back and then not reading cannot make the node hold its replay:
a real gateway process, ~60 MB of retained history, resuming clients that read nothing,
and the process's RSS read from /proc.

Run alone to see the numbers: ``.venv/bin/python -m pytest tests/test_sse_memory.py -q -s``.
"""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import aiohttp
import pytest

from gateway.auth import mint_token
from tests.conftest import BACKENDS, ORG, SECRET, WORKSPACE, redis_url
from tests.processes import serve
from tests.test_ws_memory import rss_mb, small_receive_buffer

EVENT_BYTES = 60_000
EVENTS = 1_000  # ~60 MB retained: what each resuming client asks to be sent
RESUMERS = 3
GROWTH_LIMIT_MB = 30  # a whole replay held per client would be 3 x 60 MB

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")


@pytest.mark.parametrize("backend", BACKENDS)
async def test_resuming_clients_that_do_not_read_do_not_grow_the_node(backend: str) -> None:
    token = mint_token(SECRET, sub="load", org_id=ORG, workspaces=[WORKSPACE], ttl=3600)
    headers = {"Authorization": f"Bearer {token}"}
    # On Redis a resume is read from Redis a page at a time (it once came in one reply).
    redis = ["--redis-url", redis_url(), "--redis-key-prefix", f"test-{secrets.token_hex(6)}",
             "--node-id", f"memtest-{secrets.token_hex(3)}"] if backend == "redis" else []
    with serve("--jwt-secret", SECRET, "--history-max-len", str(EVENTS), *redis,
               "--max-event-bytes", str(EVENT_BYTES + 100), "--log-level", "WARNING") as (process, port):
        base = f"http://127.0.0.1:{port}/v1/orgs/{ORG}/workspaces/{WORKSPACE}/sync"
        async with aiohttp.ClientSession() as session, aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(socket_factory=small_receive_buffer)
        ) as slow:
            # Where the resumers start: the position before any of the history.
            async with session.get(f"{base}/stream", headers=headers) as first:
                await first.content.readline()  # retry:
                await first.content.readline()
                start = (await first.content.readline()).decode().split(": ", 1)[1].strip()
            pad = "x" * EVENT_BYTES
            for i in range(EVENTS):
                async with session.post(f"{base}/events", headers=headers,
                                        json={"type": "load.blob", "data": {"i": i, "pad": pad}}) as r:
                    assert r.status == 200
            await asyncio.sleep(0.5)
            before = rss_mb(process.pid)
            resumers = [await slow.get(f"{base}/stream", headers={**headers, "Last-Event-ID": start},
                                       timeout=aiohttp.ClientTimeout(total=None))
                        for _ in range(RESUMERS)]
            for response in resumers:
                assert response.status == 200
            peak = before
            for _ in range(20):  # 2 s: the node does all it will do for them by then
                await asyncio.sleep(0.1)
                peak = max(peak, rss_mb(process.pid))
            print(f"\nhistory {EVENTS} x {EVENT_BYTES} B; RSS before resumers {before:.1f} MB, "
                  f"peak with {RESUMERS} non-reading resumers {peak:.1f} MB (+{peak - before:.1f} MB)")
            assert peak - before < GROWTH_LIMIT_MB
            # They are served, only at their own pace: one reads a little and gets the replay.
            chunk = await asyncio.wait_for(resumers[0].content.read(4096), 5)
            assert b"event: load.blob" in chunk or b"retry:" in chunk
            for response in resumers:
                response.close()


