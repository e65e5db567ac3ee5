"""``GET /openapi.json``: the reference's four operations exactly, and a document the server
keeps — checked against real answers here, and by schemathesis against a live node."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic import ValidationError

from gateway.auth import ALL_PERMISSIONS, mint_token
from gateway.handlers.params import PublishHeaders
from gateway.openapi import INTEGER_RANGE, build
from protocol.envelope import portability_problem
from protocol.errors import ValidationFailed
from tests.conftest import BASE, ORG, SECRET, auth
from tests.processes import ROOT, serve

STREAM = "/v1/orgs/{org_id}/workspaces/{workspace_id}/sync/stream"
JOIN = "/v1/orgs/{org_id}/workspaces/{workspace_id}/sync/presence/join"
LEAVE = "/v1/orgs/{org_id}/workspaces/{workspace_id}/sync/presence/leave"
VIEWING = "/v1/orgs/{org_id}/workspaces/{workspace_id}/sync/presence/viewing"
SNAPSHOT = "/v1/orgs/{org_id}/workspaces/{workspace_id}/sync/presence"
EVENTS = "/v1/orgs/{org_id}/workspaces/{workspace_id}/sync/events"
TICKETS = "/v1/orgs/{org_id}/workspaces/{workspace_id}/sync/tickets"
WS_WORKSPACE = "/v1/orgs/{org_id}/workspaces/{workspace_id}/sync/ws"

# -- the published reference, transcribed ---------------------------------------------

REFERENCE_OPERATIONS = {  # (method, path) -> title
    ("get", STREAM): "Stream Workspace Events",
    ("post", JOIN): "Announce Presence Join",
    ("post", LEAVE): "Announce Presence Leave",
    ("post", VIEWING): "Announce Presence Viewing",
}
REFERENCE_TIMESTAMP = "2025-01-01T00:00:00.000000"
REFERENCE_ERRORS: dict[str, Any] = {
    "401": {"error": "AUTHENTICATION_FAILED", "message": "Authentication required",
            "details": {}, "timestamp": REFERENCE_TIMESTAMP, "status_code": 401},
    "403": {"error": "FORBIDDEN", "message": "You don't have permission to perform this action",
            "details": {"required_permission": "resource:action"},
            "timestamp": REFERENCE_TIMESTAMP, "status_code": 403},
    "404": {"error": "RESOURCE_NOT_FOUND", "message": "The requested resource was not found",
            "details": {"resource_type": "example", "resource_id": "xxx"},
            "timestamp": REFERENCE_TIMESTAMP, "status_code": 404},
    "422": {"detail": [{"loc": ["string"], "msg": "string", "type": "string", "input": None,
                        "ctx": {}}]},
    "500": {"error": "INTERNAL_SERVER_ERROR", "message": "An unexpected error occurred",
            "details": {}, "timestamp": REFERENCE_TIMESTAMP, "status_code": 500},
}
REFERENCE_TEXT = ROOT.parent / "shared" / "workspace-sync-api-reference.txt"

ENVELOPE_KEYS = ["error", "message", "details", "timestamp", "status_code"]
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}$")


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return json.loads(json.dumps(build()))  # as a client receives it


def operation(doc: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    return dict(doc["paths"][path][method])


def parameters(op: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(p["in"], p["name"]): p for p in op["parameters"]}


def validator(doc: dict[str, Any], schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    """A validator for ``schema``, its ``#/components/...`` references resolved in ``doc``."""
    return jsonschema.Draft202012Validator({**schema, "components": doc["components"]})


def assert_conforms(doc: dict[str, Any], method: str, path: str, status: int,
                    content_type: str, body: Any) -> None:
    """A real answer is one the document describes: status, media type and schema."""
    responses = operation(doc, method, path)["responses"]
    assert str(status) in responses, f"{method} {path}: {status} not documented"
    content = responses[str(status)]["content"]
    assert content_type in content, f"{method} {path} {status}: {content_type} not documented"
    errors = [str(e) for e in validator(doc, content[content_type]["schema"]).iter_errors(body)]
    assert not errors, (method, path, status, body, errors)


# -- the document, as the reference has it ------------------------------------------------


async def test_served_as_openapi_31_json(client: Any) -> None:
    response = await client.get("/openapi.json")
    assert response.status == 200
    assert response.content_type == "application/json"
    body = await response.json()
    assert body["openapi"].startswith("3.1.")
    assert body == json.loads(json.dumps(build()))


def test_document_is_a_valid_openapi_31_document(doc: dict[str, Any]) -> None:
    import schemathesis

    schema = schemathesis.openapi.from_dict(doc)
    schema.validate()  # the OpenAPI 3.1 meta-schema; raises on an invalid document
    assert {op.label for op in (result.ok() for result in schema.get_all_operations())} >= {
        f"{method.upper()} {path}" for method, path in REFERENCE_OPERATIONS}


def test_reference_operations_paths_methods_and_summaries(doc: dict[str, Any]) -> None:
    for (method, path), title in REFERENCE_OPERATIONS.items():
        op = operation(doc, method, path)
        assert op["summary"] == title
        assert list(doc["paths"][path]) == [method]  # nothing else on those paths
        assert {"200", "401", "403", "404", "422", "500"} <= set(op["responses"])


@pytest.mark.parametrize(("method", "path"), list(REFERENCE_OPERATIONS))
def test_reference_path_and_header_parameters(doc: dict[str, Any], method: str, path: str) -> None:
    params = parameters(operation(doc, method, path))
    assert params["path", "org_id"] == {"name": "org_id", "in": "path", "required": True,
                                        "schema": {"type": "string", "title": "Org Id"}}
    assert params["path", "workspace_id"] == {
        "name": "workspace_id", "in": "path", "required": True,
        "schema": {"type": "string", "title": "Workspace Id"}}
    authorization = params["header", "authorization"]
    assert authorization["required"] is False
    assert authorization["schema"]["anyOf"] == [{"type": "string"}, {"type": "null"}]
    required = {key for key, p in params.items() if p["required"]}
    expected = {("path", "org_id"), ("path", "workspace_id")}
    if path == VIEWING:
        expected |= {("query", "resource_type"), ("query", "resource_id")}
    assert required == expected


def test_stream_timeout_parameter(doc: dict[str, Any]) -> None:
    timeout = parameters(operation(doc, "get", STREAM))["query", "timeout"]
    assert timeout["required"] is False
    assert timeout["description"] == "Stream timeout in seconds"
    assert timeout["schema"] == {"type": "integer", "default": 3600, "minimum": 60,
                                 "maximum": 7200, "title": "Timeout",
                                 "description": "Stream timeout in seconds"}


def test_viewing_requires_both_resource_parameters(doc: dict[str, Any]) -> None:
    params = parameters(operation(doc, "post", VIEWING))
    for name, title, description in (
        ("resource_type", "Resource Type", "Type of resource being viewed"),
        ("resource_id", "Resource Id", "ID of resource being viewed"),
    ):
        param = params["query", name]
        assert param["required"] is True
        assert param["description"] == description
        assert param["schema"]["type"] == "string"
        assert param["schema"]["title"] == title
    # Only the viewing call has query parameters among the presence calls.
    assert [key for key in parameters(operation(doc, "post", JOIN)) if key[0] == "query"] == []
    assert [key for key in parameters(operation(doc, "post", LEAVE)) if key[0] == "query"] == []


@pytest.mark.parametrize(("method", "path"), list(REFERENCE_OPERATIONS))
@pytest.mark.parametrize("status", list(REFERENCE_ERRORS))
def test_reference_error_responses(doc: dict[str, Any], method: str, path: str,
                                   status: str) -> None:
    response = operation(doc, method, path)["responses"][status]
    assert list(response["content"]) == ["application/json"]
    media = response["content"]["application/json"]
    assert media["example"] == REFERENCE_ERRORS[status]
    example_errors = [str(e) for e in validator(doc, media["schema"]).iter_errors(media["example"])]
    assert not example_errors
    if status == "422":
        assert media["schema"] == {"$ref": "#/components/schemas/HTTPValidationError"}
        item = doc["components"]["schemas"]["ValidationError"]
        assert list(item["properties"]) == ["loc", "msg", "type", "input", "ctx"]
        assert item["properties"]["loc"]["items"] == {
            "anyOf": [{"type": "string"}, {"type": "integer"}]}
    else:  # the envelope, narrowed to this status's code
        envelope = doc["components"]["schemas"]["ErrorResponse"]
        assert list(envelope["properties"]) == ENVELOPE_KEYS
        assert envelope["required"] == ENVELOPE_KEYS
        wrong = {**REFERENCE_ERRORS[status], "status_code": 418}
        assert not validator(doc, media["schema"]).is_valid(wrong)


def test_reference_examples_match_the_reference_text(doc: dict[str, Any]) -> None:
    """The transcription above against the published text itself, when it is beside the repo."""
    if not REFERENCE_TEXT.exists():
        pytest.skip(f"{REFERENCE_TEXT} is not here")
    text = REFERENCE_TEXT.read_text()
    titles = list(REFERENCE_OPERATIONS.values())
    for (method, path), title in REFERENCE_OPERATIONS.items():
        section = text.split(f"\n{title}\n", 1)[1]
        following = [t for t in titles if t != title and f"\n{t}\n" in section]
        for other in following:
            section = section.split(f"\n{other}\n", 1)[0]
        assert f"\n{method.upper()}\n{path}\n" in section
        bodies = _json_values(section.split("curl ", 1)[1].split("\n", 1)[1])
        assert bodies == [None, *REFERENCE_ERRORS.values()], title
        if path == STREAM:
            assert "Default3600" in section and "Range60 <= value <= 7200" in section
            assert "Stream timeout in seconds" in section


def _json_values(text: str) -> list[Any]:
    decoder, values, index = json.JSONDecoder(), [], 0
    while index < len(text.rstrip()):
        while text[index].isspace():
            index += 1
        value, index = decoder.raw_decode(text, index)
        values.append(value)
    return values


# -- what the gateway adds ----------------------------------------------------------------


def test_extensions_are_documented(doc: dict[str, Any]) -> None:
    expected = {
        ("get", SNAPSHOT): {"200", "401", "403", "404", "422", "500", "503"},
        ("post", EVENTS): {"200", "401", "403", "404", "413", "422", "500", "503"},
        ("post", TICKETS): {"200", "401", "403", "404", "500", "503"},
        ("get", "/healthz"): {"200", "500"},
        ("get", "/readyz"): {"200", "500", "503"},
        ("get", "/metrics"): {"200", "500"},
        ("get", "/openapi.json"): {"200", "500"},
        ("get", "/v1/sync/ws"): {"101", "401", "403", "426", "500", "503"},
        ("get", WS_WORKSPACE): {"101", "401", "403", "426", "500", "503"},
    }
    for (method, path), statuses in expected.items():
        assert set(operation(doc, method, path)["responses"]) == statuses, path
    stream = parameters(operation(doc, "get", STREAM))
    assert {("query", "ticket"), ("query", "last_event_id"), ("header", "Last-Event-ID")} <= set(
        stream)
    publish = operation(doc, "post", EVENTS)
    assert ("header", "Idempotency-Key") in parameters(publish)
    assert publish["requestBody"]["required"] is True
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        **doc["components"]["securitySchemes"]["bearerAuth"],
        "type": "http", "scheme": "bearer"}
    assert doc["security"] == [{"bearerAuth": []}]
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert operation(doc, "get", path)["security"] == []
    for path in ("/v1/sync/ws", WS_WORKSPACE):
        ws = operation(doc, "get", path)
        assert "docs/websocket.md" in ws["description"]
        assert ws["responses"]["426"]["headers"]["Upgrade"]["required"] is True


def test_every_example_conforms_to_its_schema(doc: dict[str, Any]) -> None:
    checked = 0
    for path, item in doc["paths"].items():
        for method, op in item.items():
            for status, response in op["responses"].items():
                for media_type, media in response.get("content", {}).items():
                    if "example" in media and media_type == "application/json":
                        errors = [str(e) for e in
                                  validator(doc, media["schema"]).iter_errors(media["example"])]
                        assert not errors, (method, path, status, errors)
                        checked += 1
    for name, response in doc["components"]["responses"].items():
        media = response["content"]["application/json"]
        assert validator(doc, media["schema"]).is_valid(media["example"]), name
    assert checked > 40


def test_published_data_schema_is_the_portability_rule(doc: dict[str, Any]) -> None:
    """The document's integer range is the one the publish handler enforces."""
    low, high = INTEGER_RANGE
    data = validator(doc, doc["components"]["schemas"]["PublishRequest"])
    for value, portable in ((low, True), (high, True), (low - 1, False), (high + 1, False),
                            (0.5, True), (1e300, True)):
        assert (portability_problem({"n": value}) is None) is portable
        if isinstance(value, int):
            assert data.is_valid({"type": "doc.x", "data": {"n": [{"m": value}]}}) is portable
    for reserved in ("presence.joined", "sync.snapshot"):
        assert not data.is_valid({"type": reserved})
    assert data.is_valid({"type": "doc.updated"})


# -- real answers against the document ----------------------------------------------------


async def test_presence_calls_snapshot_publish_ticket_conform(client: Any, token: Any,
                                                              doc: dict[str, Any]) -> None:
    headers = auth(token(name="Alice", email="alice@example.com"))

    async def call(method: str, url: str, template: str, **kwargs: Any) -> Any:
        response = await client.request(method, url, headers=headers, **kwargs)
        body = await response.json()
        assert_conforms(doc, method.lower(), template, response.status, response.content_type,
                        body)
        return response.status, body

    assert (await call("POST", f"{BASE}/presence/join", JOIN))[0] == 200
    status, view = await call("POST", f"{BASE}/presence/viewing?resource_type=doc&resource_id=d1",
                              VIEWING)
    assert status == 200 and view["present"] is True and view["viewing"]
    status, snapshot = await call("GET", f"{BASE}/presence", SNAPSHOT)
    assert status == 200 and snapshot["members"][0]["actor"]["email"] == "alice@example.com"
    assert (await call("GET", f"{BASE}/presence?resource_type=doc&resource_id=d1", SNAPSHOT))[0] \
        == 200
    assert (await call("GET", f"{BASE}/presence?resource_type=doc", SNAPSHOT))[0] == 422
    status, envelope = await call("POST", f"{BASE}/events", EVENTS,
                                  json={"type": "doc.updated", "data": {"n": [1, 2.5, None]}})
    assert status == 200 and envelope["type"] == "doc.updated"
    status, ticket = await call("POST", f"{BASE}/tickets", TICKETS)
    assert status == 200 and ticket["ticket"]
    status, view = await call("POST", f"{BASE}/presence/leave", LEAVE)
    assert status == 200 and view == {"user_id": "user-1", "present": False, "viewing": [],
                                      "sessions": 0}
    for url, template in ((f"{BASE}/events", EVENTS),):
        big = {"type": "doc.big", "data": {"blob": "x" * 70_000}}
        assert (await call("POST", url, template, json=big))[0] == 413
        assert (await call("POST", url, template, json={"type": "sync.fake"}))[0] == 422
        assert (await call("POST", url, template, json={"type": "a.b", "data": {"n": 2**64}}))[0] \
            == 422


@pytest.mark.parametrize(("method", "template", "suffix"), [
    ("GET", STREAM, "/stream"),
    ("POST", JOIN, "/presence/join"),
    ("POST", LEAVE, "/presence/leave"),
    ("POST", VIEWING, "/presence/viewing?resource_type=doc&resource_id=d1"),
    ("GET", SNAPSHOT, "/presence"),
    ("POST", EVENTS, "/events"),
    ("POST", TICKETS, "/tickets"),
])
async def test_401_403_404_conform(client: Any, token: Any, doc: dict[str, Any], method: str,
                                   template: str, suffix: str) -> None:
    cases = [
        ({}, BASE, 401),
        (auth(token(permissions=[])), BASE, 403),
        (auth(token(org_id="other-org")), BASE, 404),
        (auth(token()), f"/v1/orgs/{ORG}/workspaces/not-granted/sync", 404),
    ]
    for headers, base, status in cases:
        response = await client.request(method, base + suffix, headers=headers)
        assert response.status == status
        body = await response.json()
        assert list(body) == ENVELOPE_KEYS and TIMESTAMP.match(body["timestamp"])
        assert_conforms(doc, method.lower(), template, status, response.content_type, body)
        if status == 401:
            assert "WWW-Authenticate" in response.headers


async def test_stream_answers_event_stream_of_documented_events(client: Any, token: Any,
                                                                doc: dict[str, Any]) -> None:
    ok = operation(doc, "get", STREAM)["responses"]["200"]
    event_schema = ok["content"]["text/event-stream"]["schema"]
    events = validator(doc, event_schema)
    envelope = validator(doc, event_schema["properties"]["data"]["contentSchema"])
    headers = auth(token())
    ticket = await (await client.post(f"{BASE}/tickets", headers=headers)).json()
    for url, request_headers in ((f"{BASE}/stream?timeout=60", headers),
                                 (f"{BASE}/stream?ticket={ticket['ticket']}", {})):
        response = await client.get(url, headers=request_headers)
        try:
            assert response.status == 200
            assert response.content_type == "text/event-stream"
            block = await _first_event(response.content)
        finally:
            response.close()
        assert block.startswith("retry: 3000\n")
        fields = dict(line.split(": ", 1) for line in block.splitlines()[1:])
        assert events.is_valid(fields), fields
        assert fields["event"] == "sync.snapshot"
        assert envelope.is_valid(json.loads(fields["data"]))


async def _first_event(stream: Any) -> str:
    """The bytes up to the end of the first event (after the ``retry:`` block)."""
    text = ""
    async with asyncio.timeout(5):
        while text.count("\n\n") < 2:
            text += (await stream.readany()).decode()
    return text.replace("\n\n", "\n", 1).split("\n\n", 1)[0]


@pytest.mark.parametrize(("query", "loc", "kind"), [
    ("timeout=30", ["query", "timeout"], "greater_than_equal"),
    ("timeout=7201", ["query", "timeout"], "less_than_equal"),
    ("timeout=soon", ["query", "timeout"], "int_parsing"),
])
async def test_stream_422_conforms(client: Any, token: Any, doc: dict[str, Any], query: str,
                                   loc: list[str], kind: str) -> None:
    response = await client.get(f"{BASE}/stream?{query}", headers=auth(token()))
    assert response.status == 422
    body = await response.json()
    assert_conforms(doc, "get", STREAM, 422, response.content_type, body)
    (item,) = body["detail"]
    assert (item["loc"], item["type"]) == (loc, kind)
    if kind == "greater_than_equal":
        assert item["ctx"] == {"ge": 60}


async def test_viewing_422_conforms(client: Any, token: Any, doc: dict[str, Any]) -> None:
    response = await client.post(f"{BASE}/presence/viewing", headers=auth(token()))
    assert response.status == 422
    body = await response.json()
    assert_conforms(doc, "post", VIEWING, 422, response.content_type, body)
    assert [(i["loc"], i["type"], i["msg"]) for i in body["detail"]] == [
        (["query", "resource_type"], "missing", "Field required"),
        (["query", "resource_id"], "missing", "Field required")]


async def test_operations_endpoints_and_websocket_urls_conform(client: Any, token: Any,
                                                               doc: dict[str, Any]) -> None:
    for path in ("/healthz", "/readyz"):
        response = await client.get(path)
        assert_conforms(doc, "get", path, response.status, response.content_type,
                        await response.json())
    metrics = await client.get("/metrics")
    assert metrics.status == 200 and metrics.content_type == "text/plain"
    for url, template in (("/v1/sync/ws", "/v1/sync/ws"), (f"{BASE}/ws", WS_WORKSPACE)):
        response = await client.get(url, headers=auth(token()))
        assert response.status == 426 and response.headers["Upgrade"] == "websocket"
        assert_conforms(doc, "get", template, 426, response.content_type, await response.json())
    response = await client.delete(f"{BASE}/presence/join")
    assert response.status == 405 and response.headers["Allow"] == "POST"
    not_allowed = doc["components"]["responses"]["MethodNotAllowed"]["content"]["application/json"]
    assert validator(doc, not_allowed["schema"]).is_valid(await response.json())


# -- defects schemathesis found -------------------------------------------------------------


def test_validation_error_of_an_undecodable_input_is_reportable() -> None:
    """aiohttp decodes a header's non-UTF-8 bytes to lone surrogates; the 422 built from
    pydantic's error could not be serialized (a 500)."""
    with pytest.raises(ValidationError) as raised:
        PublishHeaders.model_validate({"idempotency-key": "\udcd7\udcf8"})
    body = ValidationFailed.from_pydantic(raised.value, "header").body()
    json.dumps(body).encode()  # encodable
    (item,) = body["detail"]
    assert item["loc"] == ["header", "idempotency-key"] and item["type"] == "string_unicode"


async def test_non_utf8_idempotency_key_is_a_422(client: Any, token: Any,
                                                 doc: dict[str, Any]) -> None:
    body = b'{"type":"doc.updated"}'
    request = (f"POST {BASE}/events HTTP/1.1\r\nHost: x\r\n"
               f"Authorization: Bearer {token()}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n").encode()
    request += b"Idempotency-Key: \xd7\xf8\r\n\r\n" + body
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(request)
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 422"), head
    detail = json.loads(payload)
    assert_conforms(doc, "post", EVENTS, 422, "application/json", detail)
    assert detail["detail"][0]["loc"] == ["header", "idempotency-key"]


# -- schemathesis against a live node --------------------------------------------------------

SCHEMATHESIS_CONFIG = """
hooks = "{hooks}"

# Read each stream's first event (the snapshot), then hang up: a stream lasts >= 60 s. A
# resume from the newest id has no event to send: its read ends at the request timeout.
max-stream-events = 1
request-timeout = 3

[generation]
# Unknown headers and query parameters are ignored, by design (as FastAPI does).
allow-extra-parameters = false

[parameters]
# The token's organization: requests get past 404 to the real work.
"path.org_id" = "{org}"

[[operations]]
# A WebSocket URL without an upgrade answers 426 (documented); schemathesis sends no upgrade.
include-tag = "WebSocket"
checks.positive_data_acceptance.expected-statuses = ["101", "426"]
"""
# JSON Schema numbers are values: 1e21 is "an integer" to it, though the gateway reads that
# literal as a float (accepted) and 1000000000000000000000 as an integer msgpack cannot carry
# (422). The document bounds integers; a generated body with a float past those bounds is no
# counter-example, so it is not sent. (Integers past them still are, and must get a 422.)
SCHEMATHESIS_HOOKS = f"""
import schemathesis

LOW, HIGH = {INTEGER_RANGE}


def _float_out_of_integer_range(value):
    if isinstance(value, float):
        return not LOW <= value <= HIGH
    if isinstance(value, dict):
        value = list(value.values())
    return isinstance(value, list) and any(map(_float_out_of_integer_range, value))


@schemathesis.hook
def filter_body(context, body):
    return not _float_out_of_integer_range(body)
"""
SCHEMATHESIS_EXAMPLES = 25
SCHEMATHESIS_SEED = 20261202


def _schemathesis() -> list[str]:
    executable = Path(sys.executable).with_name("schemathesis")
    return [str(executable)] if executable.exists() else [sys.executable, "-m", "schemathesis.cli"]


def _drain(stream: Any, lines: list[str]) -> threading.Thread:
    """Read a process's output as it comes, so a full pipe never blocks it."""
    thread = threading.Thread(target=lambda: lines.extend(stream), daemon=True)
    thread.start()
    return thread


def test_schemathesis_all_checks_against_a_live_node(tmp_path: Path) -> None:
    """Every check schemathesis has, over every operation (the stream too), against a real
    ``serve`` process: no 5xx, no answer the document does not describe, valid requests
    accepted, invalid ones refused, auth enforced, 405 with Allow for other methods."""
    hooks = tmp_path / "hooks.py"
    hooks.write_text(SCHEMATHESIS_HOOKS)
    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG.format(hooks=hooks, org=ORG))
    token = mint_token(SECRET, sub="schemathesis", org_id=ORG, workspaces="*",
                       permissions=ALL_PERMISSIONS, ttl=600, extra={"name": "Fuzz"})
    before = {path.name for path in ROOT.iterdir()}
    loopback_only = {"HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
                     "ALL_PROXY": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1,localhost",
                     "HYPOTHESIS_STORAGE_DIRECTORY": str(tmp_path / "hypothesis")}
    with serve("--jwt-secret", SECRET, "--log-level", "WARNING") as (process, port):
        logs: list[str] = []
        _drain(process.stderr, logs)
        started = time.monotonic()
        run = subprocess.run(
            [*_schemathesis(), "--config-file", str(config), "run",
             f"http://127.0.0.1:{port}/openapi.json",
             "--checks", "all", "-H", f"Authorization: Bearer {token}",
             "--max-examples", str(SCHEMATHESIS_EXAMPLES), "--seed", str(SCHEMATHESIS_SEED),
             "--workers", "1",  # CPython 3.11's ast is not thread-safe under hypothesis
             "--generation-database", "none", "--no-color", "--report-dir", str(tmp_path)],
            cwd=tmp_path, capture_output=True, text=True, timeout=240,
            env={**os.environ, **loopback_only},
        )
        elapsed = time.monotonic() - started
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-20000:]
    assert "12 selected / 12 total" in output, output[:2000]  # every operation, the stream too
    assert not [line for line in logs if "unhandled error" in line], logs[-5:]
    assert {path.name for path in ROOT.iterdir()} == before  # nothing written in the repository
    print(f"schemathesis: {elapsed:.1f} s; {output.strip().splitlines()[-3]}")
