"""Liveness, readiness and metrics."""

from __future__ import annotations

from aiohttp import web

from gateway.broker import BackendUnavailable
from gateway.handlers.common import gateway_of, json_response
from protocol.errors import ApiError


async def healthz(request: web.Request) -> web.Response:
    """The process is alive and serving."""
    return json_response({"status": "ok", "node_id": gateway_of(request).node_id})


async def readyz(request: web.Request) -> web.Response:
    """Ready for new clients: the backend answers and the node is not draining."""
    gateway = gateway_of(request)
    if gateway.draining:
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
