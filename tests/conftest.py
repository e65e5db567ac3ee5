"""Shared fixtures: a manual clock, token minting, apps on a real socket, and backends.

Backends: ``memory`` always; ``redis`` against the private redis-server that
``scripts/test.sh`` starts (``TEST_REDIS_URL``). Without it the redis cases skip,
unless ``GATEWAY_TEST_REQUIRE_REDIS`` is set (as the test command does), where
they fail: CI never passes by silently skipping the real backend.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import backend_for, create_app
from gateway.auth import ALL_PERMISSIONS, mint_token
from gateway.broker import Broker
from gateway.clock import ManualClock
from gateway.config import Settings

SECRET = "test-secret-" + "x" * 32
ORG = "org-1"
WORKSPACE = "ws-1"
BASE = f"/v1/orgs/{ORG}/workspaces/{WORKSPACE}/sync"

pytest_plugins = ["tests.redis_nodes"]

BACKENDS = ["memory", "redis"]


def redis_url() -> str:
    url = os.environ.get("TEST_REDIS_URL")
    if not url:
        if os.environ.get("GATEWAY_TEST_REQUIRE_REDIS"):
            pytest.fail("TEST_REDIS_URL is not set but a real Redis is required")
        pytest.skip("no TEST_REDIS_URL: run scripts/test.sh for the redis cases")
    return url


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def settings() -> Settings:
    return Settings(
        jwt_secret=SECRET,
        node_id="node-test",
        presence_ttl=30.0,
        disconnect_grace=5.0,
        keepalive=15.0,
        sweep_interval=1.0,
    )


@pytest.fixture
def token(clock: ManualClock) -> Callable[..., str]:
    """``token(sub="u1", workspaces=[WORKSPACE], permissions=ALL, ttl=3600, **claims)``."""

    def make(
        sub: str = "user-1",
        *,
        org_id: str = ORG,
        workspaces: list[str] | str | None = None,
        permissions: tuple[str, ...] | list[str] = ALL_PERMISSIONS,
        ttl: float = 3600,
        secret: str = SECRET,
        **extra: Any,
    ) -> str:
        return mint_token(
            secret, sub=sub, org_id=org_id,
            workspaces=[WORKSPACE] if workspaces is None else workspaces,
            permissions=permissions, ttl=ttl, now=clock.now(), extra=extra,
        )

    return make


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def make_broker(name: str, settings: Settings, clock: ManualClock) -> Broker:
    url = None if name == "memory" else redis_url()
    isolated = replace(settings, redis_url=url, redis_key_prefix=f"test-{secrets.token_hex(6)}")
    return backend_for(isolated, clock)


@pytest.fixture(params=BACKENDS)
def backend_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def broker(
    backend_name: str, settings: Settings, clock: ManualClock
) -> AsyncIterator[Broker]:
    """A started backend of each kind, with its own key space."""
    instance = make_broker(backend_name, settings, clock)
    await instance.start()
    yield instance
    await instance.close()


class ProductionServer(TestServer):
    """The test server as ``serve`` runs it: aiohttp's test server cancels a handler whose
    client disconnects; ``web.run_app`` (production) does not, so neither may the tests."""

    async def _make_runner(self, handler_cancellation: bool = False,
                           **kwargs: Any) -> web.BaseRunner:
        return await super()._make_runner(handler_cancellation=False, **kwargs)


@pytest.fixture
def app_factory(
    aiohttp_client: Any, clock: ManualClock
) -> Callable[..., Any]:
    """``await app_factory(settings, broker=None)`` -> an aiohttp ``TestClient`` on a real socket."""

    async def make(settings: Settings, broker: Broker | None = None) -> TestClient:
        return await aiohttp_client(ProductionServer(create_app(settings, clock=clock, broker=broker)))

    return make


@pytest.fixture
async def client(app_factory: Callable[..., Any], settings: Settings) -> TestClient:
    """The gateway on the memory backend."""
    return await app_factory(settings)


def with_settings(settings: Settings, **changes: Any) -> Settings:
    return replace(settings, **changes)
