"""Every error leaves as the reference's envelope; no traceback ever reaches a client."""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import TypeVar

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.broker import BackendUnavailable
from gateway.handlers.common import gateway_of, json_response
from protocol.errors import ApiError, ValidationFailed, not_found

log = logging.getLogger(__name__)


def _from_http(request: web.Request, exc: web.HTTPException) -> ApiError | None:
    if exc.status == 404:
        return not_found("route", request.path)
    if exc.status == 405:
        allowed = sorted(getattr(exc, "allowed_methods", ()) or ())
        return ApiError("METHOD_NOT_ALLOWED", {"method": request.method, "allowed_methods": allowed})
    if exc.status == 413:
        return ApiError("PAYLOAD_TOO_LARGE", {"max_bytes": gateway_of(request).settings.max_event_bytes})
    if exc.status >= 500:
        return ApiError("INTERNAL_SERVER_ERROR")
    return None


def _challenge(hint: str) -> str:
    """RFC 6750: say why a presented token was refused, without changing the body."""
    if not hint:
        return 'Bearer realm="mechamental-sync"'
    return f'Bearer realm="mechamental-sync", error="invalid_token", error_description="{hint}"'


# Handlers that answer their own errors (``error_response``): the middleware adds no frame to
# them. A WebSocket handler's frames live as long as its socket, an idle one's too.
_ANSWER_OWN_ERRORS: set[Handler] = set()

HandlerT = TypeVar("HandlerT", bound=Handler)


def answers_own_errors(handler: HandlerT) -> HandlerT:
    """Mark a route handler that turns every exception it raises into ``error_response``'s
    answer itself, so ``error_middleware`` passes its request straight through."""
    _ANSWER_OWN_ERRORS.add(handler)
    return handler


@web.middleware
def error_middleware(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
    """Every exception a handler raises becomes ``error_response``'s answer."""
    if request.match_info.handler in _ANSWER_OWN_ERRORS:
        return handler(request)
    return _answering(request, handler)


async def _answering(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Exception as exc:
        return error_response(request, exc)


def error_response(request: web.Request, exc: Exception) -> web.StreamResponse:
    """The answer to ``exc``, raised by the handler of ``request``: the error envelope (500
    for anything unexpected, logged); re-raises what aiohttp answers itself (an HTTP
    exception below 400, or one with no envelope)."""
    if isinstance(exc, ApiError):
        response = json_response(exc.body(), status=exc.status)
        if exc.status == 401:
            response.headers["WWW-Authenticate"] = _challenge(exc.hint)
        elif exc.status == 426:
            response.headers["Upgrade"] = "websocket"
        return response
    if isinstance(exc, ValidationFailed):
        return json_response(exc.body(), status=exc.status)
    if isinstance(exc, BackendUnavailable):
        cause = exc.__cause__ or exc
        log.warning("backend unavailable: answered 503",
                    extra={"path": request.path, "cause": f"{type(cause).__name__}: {cause}"[:300]})
        error = ApiError("SERVICE_UNAVAILABLE")
        response = json_response(error.body(), status=error.status)
        response.headers["Retry-After"] = "1"
        return response
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        mapped = _from_http(request, exc)
        if mapped is None:
            raise exc
        response = json_response(mapped.body(), status=mapped.status)
        if exc.status == 405 and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    log.exception("unhandled error", extra={"method": request.method, "path": request.path},
                  exc_info=exc)
    error = ApiError("INTERNAL_SERVER_ERROR")
    return json_response(error.body(), status=error.status)
