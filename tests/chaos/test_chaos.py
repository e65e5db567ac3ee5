"""A short chaos run (``bench/chaos.py``, docs/chaos.md): three real nodes on one Redis with
AOF, SSE and WebSocket clients, idempotent publishers, and ~50 s of faults — node SIGKILL,
SIGSTOP, SIGTERM, Redis restarted with and without its data, a node restarted with its clock
off, clients that vanish mid-replay or stop reading (the first round has every kind once:
50 s holds it, with ~12 s of clock skew). Every promise the checker knows must hold; on failure the assertion shows
the first violation with its history (node logs stay in the test's tmp_path).

``CHAOS_SEED`` picks another fault schedule (default 11).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from bench.chaos import Options, run

pytestmark = pytest.mark.multinode

async def test_a_short_chaos_run_keeps_every_promise(tmp_path: Path) -> None:
    missing = [tool for tool in ("redis-server", "redis-cli") if shutil.which(tool) is None]
    if missing:
        if os.environ.get("GATEWAY_TEST_REQUIRE_REDIS"):
            pytest.fail(f"{' and '.join(missing)} not installed but the multi-node tests are required")
        pytest.skip(f"{' and '.join(missing)} not installed (scripts/test.sh installs it)")
    options = Options(duration=50, seed=int(os.environ.get("CHAOS_SEED", "11")))
    async with asyncio.timeout(240):  # 50 s of faults, then at most ~90 s of settling and checks
        report, text = await run(options, directory=tmp_path)
    print(text)
    assert report.ok, text
