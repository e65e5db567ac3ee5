"""Every error leaves as the reference's envelope; no traceback ever reaches a client."""

from __future__ import annotations

import logging

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


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        response = json_response(exc.body(), status=exc.status)
        if exc.status == 401:
            response.headers["WWW-Authenticate"] = _challenge(exc.hint)
        elif exc.status == 426:
            response.headers["Upgrade"] = "websocket"
        return response
    except ValidationFailed as exc:
        return json_response(exc.body(), status=exc.status)
    except BackendUnavailable as exc:
        cause = exc.__cause__ or exc
        log.warning("backend unavailable: answered 503",
                    extra={"path": request.path, "cause": f"{type(cause).__name__}: {cause}"[:300]})
        error = ApiError("SERVICE_UNAVAILABLE")
        response = json_response(error.body(), status=error.status)
        response.headers["Retry-After"] = "1"
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        mapped = _from_http(request, exc)
        if mapped is None:
            raise
        response = json_response(mapped.body(), status=mapped.status)
        if exc.status == 405 and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        log.exception("unhandled error", extra={"method": request.method, "path": request.path})
        error = ApiError("INTERNAL_SERVER_ERROR")
        return json_response(error.body(), status=error.status)
