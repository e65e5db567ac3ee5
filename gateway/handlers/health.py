"""Liveness, readiness and metrics."""

from __future__ import annotations

import asyncio

from aiohttp import web

from gateway.broker import BackendUnavailable
from gateway.handlers.common import gateway_of, json_response
from protocol.errors import ApiError

# Set when the node is leaving (SIGTERM): not ready for new clients, while it still serves
# everything until it drains.
LEAVING = web.AppKey("leaving", asyncio.Event)


async def healthz(request: web.Request) -> web.Response:
    """The process is alive and serving."""
    return json_response({"status": "ok", "node_id": gateway_of(request).node_id})


async def readyz(request: web.Request) -> web.Response:
    """Ready for new clients: the backend answers and the node is neither leaving nor draining."""
    gateway = gateway_of(request)
    if gateway.draining or request.app[LEAVING].is_set():
        raise ApiError("SERVICE_UNAVAILABLE", {"reason": "draining"})
    try:
        await gateway.broker.ping()
    except BackendUnavailable:
        raise ApiError("SERVICE_UNAVAILABLE", {"reason": "backend_unavailable"}) from None
    return json_response({"status": "ready", "node_id": gateway.node_id})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=gateway_of(request).metrics.render(),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )
