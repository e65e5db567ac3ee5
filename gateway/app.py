"""``create_app(settings)``: routes and lifecycles, nothing else."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator

from aiohttp import web

from gateway.auth import TokenVerifier
from gateway.broker import Broker
from gateway.broker_memory import MemoryBroker
from gateway.clock import Clock, SystemClock
from gateway.config import Settings
from gateway.core import Gateway
from gateway.handlers import cors, health, rest, sse, ws
from gateway.handlers.common import GATEWAY
from gateway.handlers.errors import error_middleware
from gateway.hub import Hub
from gateway.metrics import Metrics
from gateway.tasks import raise_if_cancelled, stop

log = logging.getLogger(__name__)

WORKSPACE = "/v1/orgs/{org_id}/workspaces/{workspace_id}"


def backend_for(settings: Settings, clock: Clock) -> Broker:
    """The backend ``settings.redis_url`` names (its scheme picks the Redis topology:
    ``gateway.redis_topology``); the embedded one when unset or ``memory://``."""
    url = settings.redis_url
    if url is None or url.startswith("memory://"):
        return MemoryBroker(node_id=settings.node_id, clock=clock,
                            history_max_len=settings.history_max_len,
                            history_max_age=settings.history_max_age,
                            idempotency_ttl=settings.idempotency_ttl)
    from gateway.broker_redis import RedisBroker  # imports redis-py only when used

    return RedisBroker(
        url, node_id=settings.node_id, clock=clock,
        history_max_len=settings.history_max_len, history_max_age=settings.history_max_age,
        node_timeout=settings.node_timeout, key_prefix=settings.redis_key_prefix,
        max_connections=settings.redis_max_connections, idempotency_ttl=settings.idempotency_ttl,
    )


def create_app(
    settings: Settings, *, clock: Clock | None = None, broker: Broker | None = None
) -> web.Application:
    """The gateway as an aiohttp application. ``clock`` and ``broker`` are for tests."""
    clock = clock or SystemClock()
    broker = broker or backend_for(settings, clock)
    # A body may spell the data with \u escapes (6 bytes a character): room for that, no more.
    app = web.Application(
        middlewares=[error_middleware, cors.preflight_middleware],
        client_max_size=settings.max_event_bytes * 6 + 4096,
    )
    app[GATEWAY] = Gateway(
        settings=settings,
        clock=clock,
        broker=broker,
        hub=Hub(broker),
        verifier=TokenVerifier(settings, clock.now),
        metrics=Metrics(),
    )
    app[ws.CONNECTIONS] = ws.Connections()
    app.add_routes(
        [
            web.get(f"{WORKSPACE}/sync/stream", sse.stream, allow_head=False),
            web.post(f"{WORKSPACE}/sync/presence/join", rest.join),
            web.post(f"{WORKSPACE}/sync/presence/leave", rest.leave),
            web.post(f"{WORKSPACE}/sync/presence/viewing", rest.viewing),
            web.get(f"{WORKSPACE}/sync/presence", rest.presence),
            web.post(f"{WORKSPACE}/sync/events", rest.publish),
            web.post(f"{WORKSPACE}/sync/tickets", rest.ticket),
            web.get("/healthz", health.healthz),
            web.get("/readyz", health.readyz),
            web.get("/metrics", health.metrics),
            web.get("/v1/sync/ws", ws.socket),
            web.get(f"{WORKSPACE}/sync/ws", ws.workspace_socket),
        ]
    )
    cors.setup_cors(app)
    app.cleanup_ctx.extend([_backend, _sweeper, _feed_janitor])
    app.on_shutdown.append(_drain)
    return app


async def _backend(app: web.Application) -> AsyncIterator[None]:
    """The backend, and re-assertion of what this node holds whenever the backend may have
    lost it (heartbeat lapse, outage, data loss)."""
    gateway = app[GATEWAY]
    gateway.broker.on_reassert(gateway.reassert)
    await gateway.broker.start()
    yield
    await gateway.hub.close()
    await gateway.close()
    await gateway.broker.close()


async def _sweeper(app: web.Application) -> AsyncIterator[None]:
    """Expire REST sessions whose time is up (on the gateway's clock)."""
    gateway = app[GATEWAY]

    async def loop() -> None:
        failing = False
        while True:
            raise_if_cancelled()  # a stop the last sweep's Redis calls absorbed
            await gateway.clock.sleep_until(gateway.clock.now() + gateway.settings.sweep_interval)
            try:
                await gateway.broker.sweep()
                if failing:
                    log.info("presence sweep recovered")
                failing = False
            except Exception:
                if not failing:
                    log.exception("presence sweep failed; will retry")
                failing = True

    task = asyncio.create_task(loop(), name="presence sweeper")
    yield
    await stop(task)


async def _feed_janitor(app: web.Application) -> AsyncIterator[None]:
    """Stop following workspaces nobody on this node has followed for a while."""
    hub = app[GATEWAY].hub

    async def loop() -> None:
        while True:
            await asyncio.sleep(10)
            await hub.reap_idle()

    task = asyncio.create_task(loop(), name="feed janitor")
    yield
    await stop(task)


DRAIN_NOT_READY_SECONDS = 1.0


def drain_on_sigterm(app: web.Application) -> None:
    """For ``serve``: SIGTERM drains first (``/readyz`` answers 503, every client is handed
    back with a reconnect hint, presence kept for ``disconnect_grace``), and the graceful
    shutdown follows ``DRAIN_NOT_READY_SECONDS`` later, so load balancers see the node go
    unready while it still answers. (aiohttp alone would stop listening first.)"""

    async def install(app: web.Application) -> None:
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()

        def on_sigterm() -> None:
            if app[GATEWAY].draining:
                return
            log.info("SIGTERM: draining, then shutting down")
            task = asyncio.create_task(_drain(app))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            loop.call_later(DRAIN_NOT_READY_SECONDS, _graceful_exit)

        loop.add_signal_handler(signal.SIGTERM, on_sigterm)

    app.on_startup.append(install)


def _graceful_exit() -> None:
    raise web.GracefulExit()  # what aiohttp's own signal handler raises


async def _drain(app: web.Application) -> None:
    """On shutdown: not ready any more; every stream is handed back with a reconnect hint."""
    gateway = app[GATEWAY]
    gateway.draining = True
    gateway.hub.close_all("drain")
    app[ws.CONNECTIONS].close_all("drain")  # sockets with no subscription too
