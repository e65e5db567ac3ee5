"""CORS for browser pages on another origin (``--allowed-origins``), REST and SSE alike.

Tokens travel in ``Authorization`` headers, never cookies, so no credentials mode is
needed: an allowed origin gets ``Access-Control-Allow-Origin`` set to itself (with
``Vary: Origin``); any other origin gets no CORS headers, so its page cannot read the
answer. Preflights (``OPTIONS`` with ``Access-Control-Request-Method``) of an allowed
origin are answered 204; of any other origin 403 in the error envelope.
"""

from __future__ import annotations

from collections.abc import Awaitable

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.handlers.common import GATEWAY
from gateway.origins import origin_allowed
from protocol.errors import ApiError

ALLOW_METHODS = "GET, POST"
ALLOW_HEADERS = "Authorization, Content-Type, Last-Event-ID"
EXPOSE_HEADERS = "WWW-Authenticate, Retry-After, X-Gateway-Node"
PREFLIGHT_MAX_AGE = "600"


def _allowed_origin(request: web.Request) -> str | None:
    """The request's ``Origin`` if it is on the allow-list, else None."""
    origins = request.headers.getall("Origin", [])
    if origins and origin_allowed(origins, request.app[GATEWAY].settings.allowed_origins):
        return origins[0]
    return None


@web.middleware
def preflight_middleware(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
    """Answer CORS preflights of known routes before routing refuses ``OPTIONS`` (405). (Not a
    coroutine: any other request goes straight on, with no frame of this middleware kept for
    as long as its handler runs — a WebSocket's, a stream's whole life.)"""
    if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
        return handler(request)
    if request.match_info.http_exception is not None and request.match_info.http_exception.status == 404:
        return handler(request)  # unknown route: the usual 404
    return _preflight(request)


async def _preflight(request: web.Request) -> web.Response:
    origin = _allowed_origin(request)
    if origin is None:
        raise ApiError("FORBIDDEN", {"reason": "origin_not_allowed"})
    return web.Response(status=204, headers={
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Methods": ALLOW_METHODS,
        "Access-Control-Allow-Headers": ALLOW_HEADERS,
        "Access-Control-Max-Age": PREFLIGHT_MAX_AGE,
        "Vary": "Origin",
    })


async def add_cors_headers(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """``on_response_prepare``: runs before the headers leave, streams included."""
    if not isinstance(request, web.Request):
        return
    origin = _allowed_origin(request)
    if origin is not None and response.status != 101:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
        response.headers.add("Vary", "Origin")


def setup_cors(app: web.Application) -> None:
    """Add CORS headers to every allowed-origin response (the middleware answers preflights)."""
    app.on_response_prepare.append(add_cors_headers)
