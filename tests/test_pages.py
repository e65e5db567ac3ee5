"""What a page loads from the gateway: the client module always, the demo page only when asked
for (or in dev mode), only the files named, with headers that keep the page to itself."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from gateway.config import Settings
from gateway.handlers.pages import CLIENT_MODULE
from tests.conftest import with_settings

PAGE = "https://app.example.com"


async def test_the_client_module_is_served_and_an_allowed_origin_may_import_it(
        app_factory: Callable[..., Any], settings: Settings) -> None:
    client = await app_factory(with_settings(settings, allowed_origins=(PAGE,)))
    response = await client.get("/client/mm-sync.js", headers={"Origin": PAGE})
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Cache-Control"] == "no-cache"  # revalidated: upgrades reach pages
    assert response.headers["Access-Control-Allow-Origin"] == PAGE  # a cross-origin module import
    assert await response.read() == CLIENT_MODULE.read_bytes()
    again = await client.get("/client/mm-sync.js", headers={"If-None-Match": response.headers["ETag"]})
    assert again.status == 304
    other = await client.get("/client/mm-sync.js", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers


@pytest.mark.parametrize("path", ["/demo", "/demo/", "/demo/demo.js"])
async def test_no_demo_page_unless_asked_for(app_factory: Callable[..., Any], settings: Settings,
                                             path: str) -> None:
    client = await app_factory(settings)
    response = await client.get(path, allow_redirects=False)
    assert response.status == 404
    assert (await response.json())["error"] == "RESOURCE_NOT_FOUND"


async def test_the_demo_page_when_asked_for(app_factory: Callable[..., Any], settings: Settings) -> None:
    client = await app_factory(with_settings(settings, demo=True))
    moved = await client.get("/demo", allow_redirects=False)
    assert moved.status == 308 and moved.headers["Location"] == "/demo/"
    page = await client.get("/demo/")
    assert page.status == 200 and page.headers["Content-Type"] == "text/html; charset=utf-8"
    policy = page.headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "script-src" not in policy and "unsafe-inline" not in policy  # its own files only
    html = await page.text()
    assert '<script type="module" src="demo.js">' in html
    script = await client.get("/demo/demo.js")
    assert script.status == 200 and "from '../client/mm-sync.js'" in await script.text()
    assert (await client.get("/demo/demo.css")).headers["Content-Type"] == "text/css; charset=utf-8"


@pytest.mark.parametrize("path", ["/demo/../handlers/pages.py", "/demo/%2e%2e%2fconfig.py",
                                  "/demo/index.html.bak", "/demo/..%2F..%2Fsetup.cfg", "/client/"])
async def test_only_the_files_named_are_served(app_factory: Callable[..., Any], settings: Settings,
                                               path: str) -> None:
    client = await app_factory(with_settings(settings, demo=True))
    response = await client.get(path, allow_redirects=False)
    assert response.status == 404, path
    assert (await response.json())["error"] == "RESOURCE_NOT_FOUND"
