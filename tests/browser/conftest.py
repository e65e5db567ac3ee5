"""Real Chromium (Debian's ``chromium``; scripts/test.sh installs it) driven by Playwright,
against real gateway processes on a real redis-server behind the shipped nginx config.

Playwright never downloads a browser here: it launches ``/usr/bin/chromium`` (or
``GATEWAY_TEST_CHROMIUM``). A screenshot of every test's pages is kept in
``artifacts/browser/`` (the newest ``KEEP_SCREENSHOTS``).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.multinode.harness import Node, RedisServer
from tests.nginx import Nginx
from tests.processes import ROOT, free_port

ARTIFACTS = ROOT / "artifacts" / "browser"
KEEP_SCREENSHOTS = 40
# As Debian's chromium runs headless as root on a machine with no outside network: no
# sandbox (root), and none of the background requests that would only be refused.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium() -> str:
    path = os.environ.get("GATEWAY_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        if os.environ.get("GATEWAY_TEST_REQUIRE_BROWSER"):
            pytest.fail(f"{path} is missing but the browser tests are required")
        pytest.skip("chromium is not installed (scripts/test.sh installs it)")
    return path


@pytest.fixture
async def browser() -> AsyncIterator[object]:
    playwright_api = pytest.importorskip("playwright.async_api")
    async with playwright_api.async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
def screenshots(request: pytest.FixtureRequest) -> object:
    """``await screenshots(page, "name")``: keep a full-page screenshot of this run."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")

    async def take(page: object, name: str) -> Path:
        path = ARTIFACTS / f"{stamp}-{request.node.name}-{name}.png"
        await page.screenshot(path=str(path), full_page=True)  # type: ignore[attr-defined]
        return path

    yield take
    kept = sorted(ARTIFACTS.glob("*.png"), key=lambda item: item.stat().st_mtime)
    for old in kept[:-KEEP_SCREENSHOTS]:
        old.unlink(missing_ok=True)


@dataclass
class Deployment:
    """Two gateway nodes on one redis-server, behind nginx at ``url``; the page origin
    ``url`` is the only allowed one."""

    url: str
    nodes: list[Node]
    redis: RedisServer
    nginx: Nginx

    def node(self, name: str) -> Node:
        return next(node for node in self.nodes if node.name == name)


@pytest.fixture
async def deployment(tmp_path: Path) -> AsyncIterator[Deployment]:
    if shutil.which("redis-server") is None:
        if os.environ.get("GATEWAY_TEST_REQUIRE_REDIS"):
            pytest.fail("redis-server is missing but the multi-node tests are required")
        pytest.skip("redis-server is not installed (scripts/test.sh installs it)")
    _chromium()  # skip before starting anything
    redis = RedisServer(tmp_path / "redis", persist=False)
    nginx = Nginx(tmp_path)
    nodes: list[Node] = []
    try:
        redis.start()
        entry = free_port()
        url = f"http://127.0.0.1:{entry}"
        # No leeway on token expiry: a test's short-lived token expires when it says.
        nodes = [Node(name, redis.url, tmp_path,
                      extra=("--demo", "--allowed-origins", url, "--jwt-leeway", "0"))
                 for name in ("node-a", "node-b")]
        for node in nodes:
            node.start()
        for node in nodes:
            await node.wait_ready()
        nginx.start([node.port for node in nodes], port=entry)
        yield Deployment(url, nodes, redis, nginx)
    finally:
        nginx.stop_all()
        for node in nodes:
            node.stop()
        redis.stop()
        for node in nodes:
            print(f"--- {node.name} ---\n{node.logs()}")  # shown when the test failed
