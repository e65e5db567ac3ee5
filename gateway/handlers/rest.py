"""The presence calls, the presence snapshot, publishing, and the stream-ticket exchange."""

from __future__ import annotations

import json

from aiohttp import web

from gateway.auth import EVENTS_PUBLISH, PRESENCE_WRITE, SYNC_READ
from gateway.handlers.common import identify, json_response, parse, query_of
from gateway.handlers.params import PresenceQuery, PublishBody, PublishHeaders, ViewingQuery
from gateway.presence import Resource
from protocol.envelope import portability_problem
from protocol.errors import ApiError, ValidationFailed


async def join(request: web.Request) -> web.Response:
    gateway, workspace, identity = identify(request, PRESENCE_WRITE)
    return json_response(await gateway.rest_join(identity, workspace))


async def leave(request: web.Request) -> web.Response:
    gateway, workspace, identity = identify(request, PRESENCE_WRITE)
    return json_response(await gateway.rest_leave(identity, workspace))


async def viewing(request: web.Request) -> web.Response:
    gateway, workspace, identity = identify(request, PRESENCE_WRITE)
    query = parse(ViewingQuery, query_of(request), "query")
    resource = Resource(query.resource_type, query.resource_id)
    return json_response(await gateway.rest_viewing(identity, workspace, resource))


async def presence(request: web.Request) -> web.Response:
    """The workspace's members; with ``resource_type`` and ``resource_id``, who is viewing it."""
    gateway, workspace, _ = identify(request, SYNC_READ)
    query = parse(PresenceQuery, query_of(request), "query")
    given = {"resource_type": query.resource_type, "resource_id": query.resource_id}
    missing = [name for name, value in given.items() if value is None]
    if len(missing) == 1:  # a filter needs both halves
        raise ValidationFailed(({"loc": ["query", missing[0]], "msg": "Field required",
                                 "type": "missing", "input": None, "ctx": {}},))
    resource = None if missing else Resource(query.resource_type or "", query.resource_id or "")
    return json_response(await gateway.presence(workspace, resource))


async def publish(request: web.Request) -> web.Response:
    """Publish one event to the workspace; 413 past ``max_event_bytes`` of encoded data."""
    gateway, workspace, identity = identify(request, EVENTS_PUBLISH)
    # The limit is on the data as the gateway encodes it (compact UTF-8); a body may be
    # several times larger (\u escapes), up to the app's client_max_size (413 past it).
    if request.content_length is not None and request.content_length > request.app._client_max_size:
        raise ApiError("PAYLOAD_TOO_LARGE", {"max_bytes": gateway.settings.max_event_bytes})
    raw = await request.read()
    try:
        body = json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ValidationFailed(({"loc": ["body", 0], "msg": "JSON decode error",
                                 "type": "json_invalid", "input": {},
                                 "ctx": {"error": str(exc).split(":")[0][:200]}},)) from None
    if body is None:
        raise ValidationFailed(({"loc": ["body"], "msg": "Field required", "type": "missing",
                                 "input": None, "ctx": {}},))
    headers = parse(PublishHeaders, {"idempotency-key": request.headers.get("Idempotency-Key")}
                    if "Idempotency-Key" in request.headers else {}, "header")
    event = parse(PublishBody, body, "body")
    problem = portability_problem(event.data)
    if problem is not None:  # e.g. NaN or a 100-digit integer: msgpack clients could not get it
        path, why = problem
        raise ValidationFailed(({"loc": ["body", "data", *path], "msg": f"Value error, {why}",
                                 "type": "value_error", "input": None, "ctx": {"error": why}},))
    envelope = await gateway.publish(identity, workspace, event.type, event.data,
                                     idempotency_key=headers.idempotency_key)
    return json_response(envelope.to_dict())


async def ticket(request: web.Request) -> web.Response:
    """Exchange a bearer token for a short-lived, single-use ``?ticket=`` for ``EventSource``."""
    gateway, workspace, identity = identify(request, SYNC_READ)
    return json_response(await gateway.issue_ticket(identity, workspace))
