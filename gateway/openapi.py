"""``GET /openapi.json``: the gateway's HTTP surface as an OpenAPI 3.1 document.

The four operations of the published reference — the stream and the three presence
calls — are described as the reference describes them: the same paths, parameter
names and titles, summaries, and a response for 200 and for each of 401, 403, 404,
422 and 500 with the reference's example bodies. One deliberate difference: the
reference lists the stream's 200 as ``application/json`` with no schema (what FastAPI
says of any streaming response); the stream is ``text/event-stream``, described here
event by event. Everything else is what the gateway adds (snapshot, publishing,
tickets, health, metrics, the WebSocket URLs, this document), with the statuses it
really answers.

Request schemas come from the pydantic models the handlers validate with
(``gateway.handlers.params``), so the document accepts what the handlers accept.
Response bodies are documentation models of the dicts the gateway sends; the
tests check a live node's answers against them (``tests/test_openapi.py``).
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Final, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema, models_json_schema

from gateway import __version__
from gateway.auth import ALL_PERMISSIONS, EVENTS_PUBLISH, PRESENCE_WRITE, SYNC_READ
from gateway.handlers.params import (
    PresenceQuery,
    PublishBody,
    PublishHeaders,
    StreamQuery,
    ViewingQuery,
)
from protocol.codecs import JSON
from protocol.envelope import MAX_DEPTH, RESERVED_PREFIXES
from protocol.errors import ApiError

WORKSPACE: Final = "/v1/orgs/{org_id}/workspaces/{workspace_id}/sync"
TIMESTAMP_PATTERN: Final = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}$"
REFERENCE_TIMESTAMP: Final = "2025-01-01T00:00:00.000000"
TAG: Final = "Workspace Sync"
_REF: Final = "#/components/schemas/{model}"


def _absent_when_unset(schema: dict[str, Any]) -> None:
    """A field the gateway leaves out rather than sending ``null``."""
    schema.pop("default", None)


# -- documentation models of what the gateway sends --------------------------------------


class ErrorResponse(BaseModel):
    """The reference's error envelope: every error but 422, on every transport."""

    model_config = ConfigDict(extra="forbid", title="ErrorResponse")

    error: str = Field(description="The error code, e.g. AUTHENTICATION_FAILED")
    message: str
    details: dict[str, Any]
    timestamp: str = Field(pattern=TIMESTAMP_PATTERN, description="UTC, 2025-01-01T00:00:00.000000")
    status_code: int


class ValidationError(BaseModel):
    """One invalid field, as FastAPI/pydantic v2 report it (``ctx`` is ``{}`` when none)."""

    model_config = ConfigDict(extra="forbid", title="ValidationError")

    loc: list[str | int] = Field(title="Location")
    msg: str = Field(title="Message")
    type: str = Field(title="Error Type")
    input: Any = Field(title="Input")
    ctx: dict[str, Any] = Field(title="Context")


class HTTPValidationError(BaseModel):
    model_config = ConfigDict(extra="forbid", title="HTTPValidationError")

    detail: list[ValidationError] = Field(title="Detail")


class Actor(BaseModel):
    """Who caused an event or holds a presence: a user, a service, or the gateway."""

    model_config = ConfigDict(extra="forbid", title="Actor")

    type: Literal["user", "service", "system"]
    id: str
    name: str | SkipJsonSchema[None] = Field(None, json_schema_extra=_absent_when_unset)
    email: str | SkipJsonSchema[None] = Field(None, json_schema_extra=_absent_when_unset)
    avatar_url: str | SkipJsonSchema[None] = Field(None, json_schema_extra=_absent_when_unset)


class Resource(BaseModel):
    model_config = ConfigDict(extra="forbid", title="Resource")

    resource_type: str
    resource_id: str


class Member(BaseModel):
    """A present user; what ``presence.joined`` and ``presence.viewing`` carry."""

    model_config = ConfigDict(extra="forbid", title="Member")

    user_id: str
    actor: Actor
    viewing: list[Resource] = Field(description="Most recent first")
    joined_at: str = Field(pattern=TIMESTAMP_PATTERN)


class PresenceView(BaseModel):
    """The caller's presence after a presence call (``actor`` and ``joined_at`` only while
    present; ``present: false`` and ``sessions: 0`` once no session is left)."""

    model_config = ConfigDict(extra="forbid", title="PresenceView")

    user_id: str
    present: bool
    viewing: list[Resource]
    sessions: int = Field(ge=0)
    actor: Actor | SkipJsonSchema[None] = Field(None, json_schema_extra=_absent_when_unset)
    # (the pattern on the str alone: pydantic 2.1 refuses a pattern on the union)
    joined_at: Annotated[str, Field(pattern=TIMESTAMP_PATTERN)] | SkipJsonSchema[None] = Field(
        None, json_schema_extra=_absent_when_unset)


class PresenceSnapshot(BaseModel):
    """The workspace's members (or those viewing one resource), valid at ``last_event_id``."""

    model_config = ConfigDict(extra="forbid", title="PresenceSnapshot")

    members: list[Member]
    last_event_id: str


class Event(BaseModel):
    """The event envelope, identical on SSE (``data:``) and the WebSocket."""

    model_config = ConfigDict(extra="forbid", title="Event")

    id: str = Field(description="Opaque cursor <epoch>:<ms>-<seq>, ordered within a workspace")
    type: str
    org_id: str
    workspace_id: str
    actor: Actor
    data: dict[str, Any]
    timestamp: str = Field(pattern=TIMESTAMP_PATTERN)


class StreamTicket(BaseModel):
    model_config = ConfigDict(extra="forbid", title="StreamTicket")

    ticket: str = Field(description="Single use, for ?ticket= on this workspace's stream")
    expires_in: int = Field(description="Seconds")


class Health(BaseModel):
    model_config = ConfigDict(extra="forbid", title="Health")

    status: Literal["ok"]
    node_id: str


class Ready(BaseModel):
    model_config = ConfigDict(extra="forbid", title="Ready")

    status: Literal["ready"]
    node_id: str


_MODELS: Final[tuple[type[BaseModel], ...]] = (
    ErrorResponse, HTTPValidationError, ValidationError, Actor, Resource, Member, PresenceView,
    PresenceSnapshot, Event, StreamTicket, Health, Ready,
)


def _ref(target: type[BaseModel] | str) -> dict[str, str]:
    """A reference to a component schema: a model's, or one by name."""
    name = target if isinstance(target, str) else target.__name__
    return {"$ref": _REF.format(model=name)}


# What published data may hold: what JSON and msgpack clients can both receive
# (protocol.envelope.portability_problem; anything else is a 422).
INTEGER_RANGE: Final = (-(2**63), 2**64 - 1)  # msgpack's int64 and uint64
_JSON_VALUE: Final = {
    "title": "JsonValue",
    "description": (f"Any JSON value both wire formats carry: integers in "
                    f"[{INTEGER_RANGE[0]}, {INTEGER_RANGE[1]}], finite numbers, strings without lone "
                    f"surrogates; nested at most {MAX_DEPTH} levels deep. (A number written with "
                    f"a fraction or an exponent is a float, of any finite size.)"),
    "anyOf": [
        {"type": "object", "additionalProperties": _ref("JsonValue")},
        {"type": "array", "items": _ref("JsonValue")},
        {"type": "string"},
        {"type": "boolean"},
        {"type": "null"},
        {"type": "integer", "minimum": INTEGER_RANGE[0], "maximum": INTEGER_RANGE[1]},
        {"type": "number", "not": {"type": "integer"}},
    ],
}


def _components() -> dict[str, Any]:
    _, top = models_json_schema([(model, "serialization") for model in _MODELS],
                                ref_template=_REF)
    schemas: dict[str, Any] = top["$defs"]
    publish = PublishBody.model_json_schema(ref_template=_REF)
    # The handler also refuses the reserved families (an after-validator pydantic cannot show).
    reserved = "|".join(prefix.rstrip(".") for prefix in RESERVED_PREFIXES)
    publish["properties"]["type"]["not"] = {"pattern": rf"^({reserved})\."}
    publish["properties"]["type"]["description"] = (
        "The event type; the presence. and sync. families are reserved")
    publish["properties"]["data"] = {
        "type": "object", "title": "Data", "additionalProperties": _ref("JsonValue"),
        "description": "At most max_event_bytes (64 KiB) of compact JSON (413 past it)"}
    schemas["JsonValue"] = _JSON_VALUE
    schemas["PublishRequest"] = {**publish, "title": "PublishRequest"}
    return schemas


# -- parameters -------------------------------------------------------------------------


def _field(model: type[BaseModel], name: str, **extra: Any) -> dict[str, Any]:
    """The JSON schema a handler's model validates ``name`` with; a query or header value is
    never null, so an optional field's null branch is left out."""
    schema = dict(model.model_json_schema()["properties"][name])
    branches = schema.pop("anyOf", None)
    if branches is not None:
        (value,) = [branch for branch in branches if branch != {"type": "null"}]
        schema.update(value)
    if schema.get("default", ...) is None:
        del schema["default"]
    return {**schema, **extra}


def _path(name: str, title: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True,
            "schema": {"type": "string", "title": title}}


PATH_PARAMETERS: Final = (_path("org_id", "Org Id"), _path("workspace_id", "Workspace Id"))

AUTHORIZATION: Final = {
    "name": "authorization", "in": "header", "required": False,
    "schema": {"anyOf": [{"type": "string"}, {"type": "null"}], "title": "Authorization"},
    "description": "Bearer <JWT>",
}


def _query(model: type[BaseModel], name: str, *, required: bool,
           description: str | None = None) -> dict[str, Any]:
    schema = _field(model, name, **({"description": description} if description else {}))
    parameter: dict[str, Any] = {"name": name, "in": "query", "required": required,
                                 "schema": schema}
    if "description" in schema:
        parameter["description"] = schema["description"]
    return parameter


# -- responses ----------------------------------------------------------------------------


def _error_example(code: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return ApiError(code, details or {}).body() | {"timestamp": REFERENCE_TIMESTAMP}


def _json(schema: dict[str, Any], example: Any = None) -> dict[str, Any]:
    media: dict[str, Any] = {"schema": schema}
    if example is not None:
        media["example"] = example
    return {"application/json": media}


def _header(description: str, *, required: bool) -> dict[str, Any]:
    return {"description": description, "required": required, "schema": {"type": "string"}}


def _error(code: str, description: str, example_details: dict[str, Any] | None = None,
           details_schema: dict[str, Any] | None = None,
           headers: dict[str, Any] | None = None) -> dict[str, Any]:
    """A response in the error envelope whose ``error`` and ``status_code`` are ``code``'s."""
    error = ApiError(code)
    narrowed: dict[str, Any] = {"error": {"const": code}, "status_code": {"const": error.status}}
    if details_schema is not None:
        narrowed["details"] = details_schema
    response: dict[str, Any] = {
        "description": description,
        "content": _json({"allOf": [_ref(ErrorResponse), {"properties": narrowed}]},
                         _error_example(code, example_details)),
    }
    if headers:
        response["headers"] = headers
    return response


def _unauthorized() -> dict[str, Any]:
    return _error("AUTHENTICATION_FAILED",
                  "No, malformed, expired, not-yet-valid or badly signed token (or ticket)",
                  headers={"WWW-Authenticate": _header(
                      "Bearer challenge; error_description says why a token was refused",
                      required=True)})


def _forbidden() -> dict[str, Any]:
    return _error("FORBIDDEN", "The token lacks the permission named in details",
                  {"required_permission": "resource:action"},
                  {"type": "object", "properties": {"required_permission": {
                      "type": "string", "pattern": "^[a-z_]+:[a-z_]+$",
                      "description": "resource:action, e.g. " + ", ".join(ALL_PERMISSIONS)}}})


def _not_found() -> dict[str, Any]:
    return _error("RESOURCE_NOT_FOUND",
                  "Organization of another token, or workspace not granted (existence is not "
                  "leaked)", {"resource_type": "example", "resource_id": "xxx"},
                  {"type": "object", "required": ["resource_type", "resource_id"],
                   "properties": {"resource_type": {"type": "string"},
                                  "resource_id": {"type": "string"}}})


def _unprocessable() -> dict[str, Any]:
    item: dict[str, Any] = {"loc": ["string"], "msg": "string", "type": "string", "input": None, "ctx": {}}
    example: dict[str, Any] = {"detail": [item]}
    return {"description": "Validation Error", "content": _json(_ref(HTTPValidationError), example)}


def _internal() -> dict[str, Any]:
    return _error("INTERNAL_SERVER_ERROR", "Unexpected failure (never a traceback)")


def _unavailable(why: str) -> dict[str, Any]:
    return _error("SERVICE_UNAVAILABLE", why, {"reason": "draining"},
                  headers={"Retry-After": _header("Seconds, when the backend is unreachable",
                                                  required=False)})


def _too_large() -> dict[str, Any]:
    return _error("PAYLOAD_TOO_LARGE", "The event's data is over the size limit",
                  {"max_bytes": 65536},
                  {"type": "object", "required": ["max_bytes"],
                   "properties": {"max_bytes": {"type": "integer"}}})


def _upgrade_required() -> dict[str, Any]:
    return _error("UPGRADE_REQUIRED", "A request without a WebSocket upgrade",
                  {"upgrade": "websocket"},
                  headers={"Upgrade": _header("websocket", required=True)})


def _method_not_allowed() -> dict[str, Any]:
    return _error("METHOD_NOT_ALLOWED", "Any method a path does not list",
                  {"method": "DELETE", "allowed_methods": ["POST"]},
                  {"type": "object", "required": ["method", "allowed_methods"],
                   "properties": {"method": {"type": "string"},
                                  "allowed_methods": {"type": "array",
                                                      "items": {"type": "string"}}}},
                  headers={"Allow": _header("The path's methods", required=True)})


def _rate_limited() -> dict[str, Any]:
    return _error("RATE_LIMITED", "WebSocket only: an error message's body when a socket floods",
                  {"limit_per_second": 50})


def _reference_errors() -> dict[str, Any]:
    """401, 403, 404, 422 and 500 as the reference gives them."""
    return {"401": _unauthorized(), "403": _forbidden(), "404": _not_found(),
            "422": _unprocessable(), "500": _internal()}


def _ok(description: str, schema: dict[str, Any], example: Any = None) -> dict[str, Any]:
    return {"description": description, "content": _json(schema, example)}


# -- operations ---------------------------------------------------------------------------

_ALICE: Final = {"type": "user", "id": "alice", "name": "Alice"}
_VIEWING: Final = [{"resource_type": "document", "resource_id": "doc-1"}]
_PRESENT: Final = {"user_id": "alice", "actor": _ALICE, "viewing": _VIEWING,
                   "joined_at": REFERENCE_TIMESTAMP, "present": True, "sessions": 1}
_STREAM_EXAMPLE: Final = (
    "retry: 3000\n\n"
    "id: 3fa2c1d0:1735689600000-0\nevent: sync.snapshot\n"
    'data: {"id":"3fa2c1d0:1735689600000-0","type":"sync.snapshot","org_id":"acme",'
    '"workspace_id":"design","actor":{"type":"system","id":"gateway"},'
    '"data":{"members":[],"last_event_id":"3fa2c1d0:1735689600000-0"},'
    '"timestamp":"2025-01-01T00:00:00.000000"}\n\n'
    ": ping\n\n"
)


# One server-sent event as EventSource parses it (comments and `retry:` are not events).
_SSE_EVENT: Final = {
    "type": "object", "title": "ServerSentEvent", "required": ["event", "data"],
    "properties": {
        "id": {"type": "string", "description": "The envelope's id (Last-Event-ID)"},
        "event": {"type": "string", "description": "The envelope's type"},
        "data": {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": _ref(Event)},
        "retry": {"type": "integer", "description": "Reconnection delay, milliseconds"},
    },
}


def _operation(operation_id: str, summary: str, description: str,
               parameters: list[dict[str, Any]], responses: dict[str, Any], *,
               permission: str | None = None, tag: str = TAG,
               security: list[dict[str, list[str]]] | None = None,
               body: dict[str, Any] | None = None) -> dict[str, Any]:
    if permission is not None:
        description += f"\n\nPermission: `{permission}`."
    operation: dict[str, Any] = {"tags": [tag], "summary": summary, "description": description,
                                 "operationId": operation_id, "parameters": parameters}
    if body is not None:
        operation["requestBody"] = body
    operation["responses"] = responses
    if security is not None:
        operation["security"] = security
    return operation


def _stream() -> dict[str, Any]:
    last_event_id = _field(StreamQuery, "last_event_id")
    return _operation(
        "stream_workspace_events", "Stream Workspace Events",
        "Server-sent events: `retry:`, then `sync.snapshot` (or, with `Last-Event-ID`, every "
        "missed event in order, or `sync.reset` and a fresh snapshot), then live events and "
        "`: ping` comments. Ends cleanly after `timeout` seconds; with `sync.token_expired` "
        "when the token expires. Browsers authenticate with `?ticket=` (POST .../sync/tickets).",
        [*PATH_PARAMETERS,
         _query(StreamQuery, "timeout", required=False),
         {"name": "last_event_id", "in": "query", "required": False, "schema": last_event_id,
          "description": "Resume after this event id (as the Last-Event-ID header)"},
         {"name": "ticket", "in": "query", "required": False, "schema": _field(StreamQuery, "ticket"),
          "description": "A stream ticket, instead of the authorization header (single use)"},
         AUTHORIZATION,
         {"name": "Last-Event-ID", "in": "header", "required": False,
          "schema": {"type": "string"},
          "description": "Resume after this event id (EventSource sends it on reconnect)"}],
        {"200": {"description": "The event stream: `schema` describes each event (OpenAPI "
                                "3.1 has no itemSchema); `data` is the event's envelope",
                 "content": {"text/event-stream": {"schema": _SSE_EVENT,
                                                   "example": _STREAM_EXAMPLE}}},
         **_reference_errors(),
         "503": _unavailable("The node is draining, or the backend is unreachable")},
        permission=SYNC_READ,
        security=[{"bearerAuth": []}, {"streamTicket": []}],
    )


def _presence_call(name: str, summary: str, description: str,
                   extra: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
    return _operation(
        f"announce_presence_{name}", summary, description,
        [*PATH_PARAMETERS, *extra, AUTHORIZATION],
        {"200": _ok("The caller's presence after the call", _ref(PresenceView),
                    _PRESENT if name != "leave" else
                    {"user_id": "alice", "present": False, "viewing": [], "sessions": 0}),
         **_reference_errors(),
         "503": _unavailable("The backend is unreachable (Retry-After: 1)")},
        permission=PRESENCE_WRITE,
    )


def _presence_snapshot() -> dict[str, Any]:
    # Both halves of the filter or neither (one alone is a 422): one optional parameter
    # whose two properties are the query's resource_type and resource_id (form, exploded).
    resource = {"type": "object", "title": "Resource",
                "properties": {name: _field(PresenceQuery, name)
                               for name in ("resource_type", "resource_id")},
                "required": ["resource_type", "resource_id"], "additionalProperties": False}
    return _operation(
        "get_presence_snapshot", "Get Presence Snapshot",
        "The workspace's members and the event id the snapshot is valid at; with "
        "`?resource_type=...&resource_id=...`, only the members viewing that resource (one "
        "without the other: 422).",
        [*PATH_PARAMETERS,
         {"name": "resource", "in": "query", "required": False, "style": "form",
          "explode": True, "schema": resource,
          "description": "Filter: the query parameters resource_type and resource_id, together"},
         AUTHORIZATION],
        {"200": _ok("The members", _ref(PresenceSnapshot),
                    {"members": [{k: v for k, v in _PRESENT.items()
                                  if k not in ("present", "sessions")}],
                     "last_event_id": "3fa2c1d0:1735689600000-0"}),
         **_reference_errors(),
         "503": _unavailable("The backend is unreachable (Retry-After: 1)")},
        permission=SYNC_READ,
    )


def _publish() -> dict[str, Any]:
    key = _field(PublishHeaders, "idempotency-key")
    return _operation(
        "publish_event", "Publish Event",
        "Append an event to the workspace's log; every follower receives it. With "
        "`Idempotency-Key`, a retry within the idempotency TTL answers the first publish's "
        "envelope and appends nothing (scoped to the workspace and the token's subject).",
        [*PATH_PARAMETERS, AUTHORIZATION,
         {"name": "Idempotency-Key", "in": "header", "required": False, "schema": key,
          "description": "1-128 printable ASCII characters naming this publish"}],
        {"200": _ok("The event as appended (or as first appended, for a retried key)",
                    _ref(Event),
                    {"id": "3fa2c1d0:1735689600000-0", "type": "doc.updated", "org_id": "acme",
                     "workspace_id": "design", "actor": _ALICE, "data": {"id": "doc-1"},
                     "timestamp": REFERENCE_TIMESTAMP}),
         **_reference_errors(),
         "413": _too_large(),
         "503": _unavailable("The backend is unreachable (Retry-After: 1)")},
        permission=EVENTS_PUBLISH,
        body={"required": True, "content": _json(
            _ref("PublishRequest"),
            {"type": "doc.updated", "data": {"id": "doc-1"}})},
    )


def _tickets() -> dict[str, Any]:
    errors = _reference_errors()
    del errors["422"]  # nothing to validate
    return _operation(
        "issue_stream_ticket", "Issue Stream Ticket",
        "Exchange the bearer token for a short-lived, single-use ticket bound to the caller "
        "and this workspace, for `EventSource` (which cannot send headers): "
        "`.../sync/stream?ticket=...`.",
        [*PATH_PARAMETERS, AUTHORIZATION],
        {"200": _ok("A ticket", _ref(StreamTicket),
                    {"ticket": "RvM3mBakOk6WIw2XatcGPwZ6iCCrAxkOKY_hLoG-FvQ", "expires_in": 30}),
         **errors,
         "503": _unavailable("The backend is unreachable (Retry-After: 1)")},
        permission=SYNC_READ,
    )


def _websocket(workspace: bool) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = []
    description = ("The WebSocket channel (subprotocols `mm-sync.v1.json`, "
                   "`mm-sync.v1.msgpack`): authenticate with the Authorization header on the "
                   "upgrade or an `auth` message first; then subscribe, join, leave, viewing, "
                   "publish, ping. Messages, close codes and resume rules: docs/websocket.md in "
                   "the gateway's repository. "
                   "Browsers' upgrades are checked against --allowed-origins.")
    if workspace:
        parameters = [*PATH_PARAMETERS,
                      {"name": "since", "in": "query", "required": False,
                       "schema": {"type": "string"},
                       "description": "Resume the path's workspace after this event id"}]
        description += " This URL also subscribes to its workspace once authenticated."
    return _operation(
        "open_workspace_websocket" if workspace else "open_websocket",
        "Open Workspace WebSocket" if workspace else "Open WebSocket",
        description, parameters,
        {"101": {"description": "Switching Protocols: the socket is open"},
         "401": _unauthorized(),
         "403": _error("FORBIDDEN", "A browser's Origin is not allowed",
                       {"reason": "origin_not_allowed"}),
         "426": _upgrade_required(),
         "500": _internal(),
         "503": _unavailable("The node is draining")},
        tag="WebSocket",
        security=[{"bearerAuth": []}, {}],
    )


def _operations_endpoint(operation_id: str, summary: str, description: str,
                         ok: dict[str, Any], **others: dict[str, Any]) -> dict[str, Any]:
    return _operation(operation_id, summary, description, [],
                      {"200": ok, **others, "500": _internal()}, tag="Operations", security=[])


def _paths() -> dict[str, Any]:
    viewing = tuple(_query(ViewingQuery, name, required=True, description=text)
                    for name, text in (("resource_type", "Type of resource being viewed"),
                                       ("resource_id", "ID of resource being viewed")))
    return {
        f"{WORKSPACE}/stream": {"get": _stream()},
        f"{WORKSPACE}/presence/join": {"post": _presence_call(
            "join", "Announce Presence Join",
            "Create or refresh the caller's REST session in the workspace.")},
        f"{WORKSPACE}/presence/leave": {"post": _presence_call(
            "leave", "Announce Presence Leave", "End the caller's REST session.")},
        f"{WORKSPACE}/presence/viewing": {"post": _presence_call(
            "viewing", "Announce Presence Viewing",
            "Say what the caller views (creates the REST session if needed).", viewing)},
        f"{WORKSPACE}/presence": {"get": _presence_snapshot()},
        f"{WORKSPACE}/events": {"post": _publish()},
        f"{WORKSPACE}/tickets": {"post": _tickets()},
        "/v1/sync/ws": {"get": _websocket(workspace=False)},
        f"{WORKSPACE}/ws": {"get": _websocket(workspace=True)},
        "/healthz": {"get": _operations_endpoint(
            "healthz", "Liveness", "The process is alive and serving.",
            _ok("Alive", _ref(Health), {"status": "ok", "node_id": "gw-1"}))},
        "/readyz": {"get": _operations_endpoint(
            "readyz", "Readiness",
            "Ready for new clients: the backend answers and the node is not leaving.",
            _ok("Ready", _ref(Ready), {"status": "ready", "node_id": "gw-1"}),
            **{"503": _unavailable("Draining or leaving (SIGTERM), or the backend is "
                                   "unreachable")})},
        "/metrics": {"get": _operations_endpoint(
            "metrics", "Metrics", "Prometheus text exposition.",
            {"description": "Metrics", "content": {"text/plain": {"schema": {"type": "string"}}}})},
        "/openapi.json": {"get": _operations_endpoint(
            "openapi", "OpenAPI Document", "This document.",
            _ok("OpenAPI 3.1", {"type": "object"}))},
    }


@functools.cache
def build() -> dict[str, Any]:
    """The document (built once; callers must not mutate it)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "MechaMental Workspace Sync Gateway",
            "version": __version__,
            "description": (
                "The published Workspace Sync API (the stream and the three presence calls) "
                "plus the gateway's presence snapshot, publishing, stream tickets, WebSocket "
                "channel, health and metrics. Every error is the reference's envelope "
                "(`application/json`), 422 the FastAPI/pydantic shape. Any method a path does "
                "not list answers 405 METHOD_NOT_ALLOWED with an `Allow` header; an unknown "
                "path 404 RESOURCE_NOT_FOUND. Checks run in this order: token (401), "
                "organization/workspace (404), permission (403), parameters (422)."),
        },
        "tags": [{"name": TAG}, {"name": "WebSocket"}, {"name": "Operations"}],
        "paths": _paths(),
        "components": {
            "schemas": _components(),
            "responses": {"MethodNotAllowed": _method_not_allowed(),
                          "RateLimited": _rate_limited(),
                          "PayloadTooLarge": _too_large(),
                          "UpgradeRequired": _upgrade_required()},
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                               "description": "Claims: sub, org_id, workspaces, permissions "
                                              "(sync:read, presence:write, events:publish)"},
                "streamTicket": {"type": "apiKey", "in": "query", "name": "ticket",
                                 "description": "A single-use ticket from POST .../sync/tickets "
                                                "(the stream only)"},
            },
        },
        "security": [{"bearerAuth": []}],
    }


@functools.cache
def _encoded() -> bytes:
    return JSON.encode(build())


async def document(request: web.Request) -> web.Response:
    """``GET /openapi.json``: encoded once, however often it is asked for."""
    return web.Response(body=_encoded(), content_type="application/json")
