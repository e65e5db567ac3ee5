"""``create_app(settings)``: routes and lifecycles, nothing else."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator

from aiohttp import web

from gateway import openapi
from gateway.auth import TokenVerifier
from gateway.broker import Broker
from gateway.broker_memory import MemoryBroker
from gateway.clock import Clock, SystemClock
from gateway.config import Settings
from gateway.core import Gateway
from gateway.handlers import cors, health, pages, rest, sse, ws
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
        allow_eviction=settings.redis_allow_eviction,
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
    app[ws.CONNECTIONS] = ws.Connections(clock)
    app[sse.STREAMS] = sse.Streams(settings.keepalive)
    app[health.LEAVING] = asyncio.Event()
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
            web.get("/openapi.json", openapi.document),
            web.get("/v1/sync/ws", ws.socket),
            web.get(f"{WORKSPACE}/sync/ws", ws.socket),
        ]
    )
    app.add_routes(pages.routes(demo=settings.demo_enabled))
    cors.setup_cors(app)
    app.cleanup_ctx.extend([_backend, _sweeper, _feed_janitor, sse.keepalive])
    app.on_shutdown.append(_drain)
    app.on_response_prepare.append(_retire_connections_when_leaving)
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


def leave_on_sigterm(app: web.Application) -> None:
    """For ``serve``: SIGTERM makes the node leave in two steps, as load balancers need.

    1. For ``shutdown_delay`` seconds ``/readyz`` answers 503 while the node still serves
       everything, new streams and sockets included; responses close their keep-alive
       connections. Load balancers stop sending traffic (readiness probes fail, endpoint
       removals spread) before anything is refused.
    2. Then the graceful shutdown: the node stops listening and drains (``_drain``: every
       client handed back with a reconnect hint, presence kept for ``disconnect_grace``).

    A second SIGTERM changes nothing; SIGINT (aiohttp's own handler) skips the delay.
    (aiohttp alone would stop listening at once.)"""

    async def install(app: web.Application) -> None:
        loop = asyncio.get_running_loop()
        leaving = app[health.LEAVING]
        delay = app[GATEWAY].settings.shutdown_delay

        def on_sigterm() -> None:
            if leaving.is_set():
                return
            leaving.set()
            log.info("SIGTERM: not ready; serving until the shutdown delay ends, then draining",
                     extra={"shutdown_delay": delay})
            loop.call_later(delay, _graceful_exit)

        loop.add_signal_handler(signal.SIGTERM, on_sigterm)

    app.on_startup.append(install)


async def _retire_connections_when_leaving(request: web.Request, response: web.StreamResponse) -> None:
    """While leaving, every response closes its connection (``Connection: close``): a
    keep-alive connection a proxy holds would otherwise break when the node stops
    listening, failing a request that was already on its way. (Not a WebSocket upgrade: its
    connection is the socket, closed with 1012 by the drain.)"""
    if request.app[health.LEAVING].is_set() and response.status != 101:
        response.force_close()
        response.headers["Connection"] = "close"


def _graceful_exit() -> None:
    raise web.GracefulExit()  # what aiohttp's own signal handler raises


async def _drain(app: web.Application) -> None:
    """On shutdown: not ready any more; every stream is handed back with a reconnect hint."""
    gateway = app[GATEWAY]
    gateway.draining = True
    gateway.hub.close_all("drain")
    app[ws.CONNECTIONS].close_all("drain")  # sockets with no subscription too
