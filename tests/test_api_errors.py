"""Every error body is the reference's envelope, byte-for-byte in shape."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from gateway.broker import BackendUnavailable
from gateway.broker_memory import MemoryBroker
from tests.conftest import BASE, ORG, WORKSPACE, auth

TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}$")

ENDPOINTS = [
    ("GET", f"{BASE}/stream"),
    ("POST", f"{BASE}/presence/join"),
    ("POST", f"{BASE}/presence/leave"),
    ("POST", f"{BASE}/presence/viewing?resource_type=document&resource_id=d1"),
    ("GET", f"{BASE}/presence"),
    ("POST", f"{BASE}/events"),
    ("POST", f"{BASE}/tickets"),
]

PERMISSION_OF = {
    "/stream": "sync:read",
    "/presence/join": "presence:write",
    "/presence/leave": "presence:write",
    "/presence/viewing": "presence:write",
    "/presence": "sync:read",
    "/events": "events:publish",
    "/tickets": "sync:read",
}


def assert_envelope(body: dict[str, Any], code: str, status: int, message: str,
                    details: dict[str, Any]) -> None:
    assert list(body) == ["error", "message", "details", "timestamp", "status_code"]
    assert body["error"] == code
    assert body["message"] == message
    assert body["details"] == details
    assert body["status_code"] == status
    assert TIMESTAMP.match(body["timestamp"]), body["timestamp"]


def permission_for(path: str) -> str:
    route = path.split("/sync", 1)[1].split("?", 1)[0]
    return PERMISSION_OF[route]


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Basic abc", "Bearer not.a.jwt",
                                    "Bearer eyJhbGciOiJIUzI1NiJ9.e30.bad"])
async def test_unauthenticated_is_401_envelope(client, method, path, header):
    headers = {} if header is None else {"Authorization": header}
    response = await client.request(method, path, headers=headers)
    assert response.status == 401
    assert response.content_type == "application/json"
    assert_envelope(await response.json(), "AUTHENTICATION_FAILED", 401,
                    "Authentication required", {})
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
async def test_token_of_another_org_is_404_organization(client, token, method, path):
    response = await client.request(method, path, headers=auth(token(org_id="other-org")))
    assert response.status == 404
    assert_envelope(await response.json(), "RESOURCE_NOT_FOUND", 404,
                    "The requested resource was not found",
                    {"resource_type": "organization", "resource_id": ORG})


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
async def test_workspace_not_granted_is_404_workspace(client, token, method, path):
    response = await client.request(method, path, headers=auth(token(workspaces=["elsewhere"])))
    assert response.status == 404
    assert_envelope(await response.json(), "RESOURCE_NOT_FOUND", 404,
                    "The requested resource was not found",
                    {"resource_type": "workspace", "resource_id": WORKSPACE})


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
async def test_missing_permission_is_403_naming_it(client, token, method, path):
    needed = permission_for(path)
    others = [p for p in ("sync:read", "presence:write", "events:publish") if p != needed]
    response = await client.request(method, path, headers=auth(token(permissions=others)))
    assert response.status == 403
    assert_envelope(await response.json(), "FORBIDDEN", 403,
                    "You don't have permission to perform this action",
                    {"required_permission": needed})


async def test_wildcard_workspaces_grant_every_workspace_of_the_org(client, token):
    headers = auth(token(workspaces="*"))
    response = await client.post(
        f"/v1/orgs/{ORG}/workspaces/any-other/sync/presence/join", headers=headers)
    assert response.status == 200


@pytest.mark.parametrize(
    ("query", "item"),
    [
        ("timeout=30", {"loc": ["query", "timeout"], "msg": "Input should be greater than or equal to 60",
                        "type": "greater_than_equal", "input": "30", "ctx": {"ge": 60}}),
        ("timeout=7201", {"loc": ["query", "timeout"], "msg": "Input should be less than or equal to 7200",
                          "type": "less_than_equal", "input": "7201", "ctx": {"le": 7200}}),
        ("timeout=abc", {"loc": ["query", "timeout"],
                         "msg": "Input should be a valid integer, unable to parse string as an integer",
                         "type": "int_parsing", "input": "abc", "ctx": {}}),
        ("timeout=", {"loc": ["query", "timeout"],
                      "msg": "Input should be a valid integer, unable to parse string as an integer",
                      "type": "int_parsing", "input": "", "ctx": {}}),
    ],
)
async def test_stream_timeout_validation_is_fastapi_422(client, token, query, item):
    response = await client.get(f"{BASE}/stream?{query}", headers=auth(token()))
    assert response.status == 422
    assert response.content_type == "application/json"
    assert await response.json() == {"detail": [item]}


@pytest.mark.parametrize("timeout", ["60", "7200"])
async def test_stream_timeout_bounds_are_inclusive(client, token, timeout):
    response = await client.get(f"{BASE}/stream?timeout={timeout}", headers=auth(token()))
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    response.close()


async def test_viewing_without_resource_type_is_422_missing(client, token):
    response = await client.post(f"{BASE}/presence/viewing?resource_id=d1", headers=auth(token()))
    assert response.status == 422
    assert await response.json() == {"detail": [
        {"loc": ["query", "resource_type"], "msg": "Field required", "type": "missing",
         "input": None, "ctx": {}},
    ]}


async def test_viewing_without_both_lists_both(client, token):
    response = await client.post(f"{BASE}/presence/viewing", headers=auth(token()))
    body = await response.json()
    assert response.status == 422
    assert [item["loc"] for item in body["detail"]] == [
        ["query", "resource_type"], ["query", "resource_id"]]
    assert {item["type"] for item in body["detail"]} == {"missing"}


async def test_viewing_with_oversized_resource_id_is_422(client, token):
    response = await client.post(
        f"{BASE}/presence/viewing?resource_type=doc&resource_id={'x' * 300}", headers=auth(token()))
    body = await response.json()
    assert response.status == 422
    assert body["detail"][0]["type"] == "string_too_long"
    assert body["detail"][0]["ctx"] == {"max_length": 256}


async def test_presence_filter_needs_both_halves(client, token):
    response = await client.get(f"{BASE}/presence?resource_type=doc", headers=auth(token()))
    assert response.status == 422
    assert (await response.json())["detail"][0]["loc"] == ["query", "resource_id"]


async def test_auth_is_checked_before_validation(client):
    response = await client.get(f"{BASE}/stream?timeout=30")
    assert response.status == 401


async def test_unknown_route_is_404_envelope(client):
    response = await client.get("/v1/nothing/here")
    assert response.status == 404
    assert_envelope(await response.json(), "RESOURCE_NOT_FOUND", 404,
                    "The requested resource was not found",
                    {"resource_type": "route", "resource_id": "/v1/nothing/here"})


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("DELETE", f"{BASE}/presence/join", ["POST"]),
    ("GET", f"{BASE}/presence/leave", ["POST"]),
    ("POST", f"{BASE}/stream", ["GET"]),
    ("HEAD", f"{BASE}/stream", ["GET"]),
    ("PUT", f"{BASE}/events", ["POST"]),
])
async def test_wrong_method_is_405_envelope(client, method, path, allowed):
    response = await client.request(method, path)
    assert response.status == 405
    assert set(response.headers["Allow"].split(",")) == set(allowed)
    if method == "HEAD":  # no body: a HEAD of the stream must not open one either
        return
    body = await response.json()
    assert_envelope(body, "METHOD_NOT_ALLOWED", 405,
                    "The method is not allowed for the requested URL",
                    {"method": method, "allowed_methods": allowed})
    assert set(response.headers["Allow"].split(",")) == set(allowed)


async def test_publish_payload_over_limit_is_413(app_factory, settings, token):
    from dataclasses import replace

    client = await app_factory(replace(settings, max_event_bytes=1024))
    body = {"type": "doc.updated", "data": {"blob": "x" * 2000}}
    response = await client.post(f"{BASE}/events", json=body, headers=auth(token()))
    assert response.status == 413
    assert_envelope(await response.json(), "PAYLOAD_TOO_LARGE", 413,
                    "The request payload is too large", {"max_bytes": 1024})


async def test_huge_body_is_413_without_reading_it_all(client, token):
    response = await client.post(f"{BASE}/events", data=b"{" + b" " * 5_000_000 + b"}",
                                 headers={**auth(token()), "Content-Type": "application/json"})
    assert response.status == 413
    assert (await response.json())["error"] == "PAYLOAD_TOO_LARGE"


async def test_chunked_huge_body_is_413(client, token):
    async def chunks():
        for _ in range(100):
            yield b" " * 10_000

    response = await client.post(f"{BASE}/events", data=chunks(), headers=auth(token()))
    assert response.status == 413
    assert (await response.json())["error"] == "PAYLOAD_TOO_LARGE"


@pytest.mark.parametrize(("body", "loc", "kind"), [
    (b"{not json", ["body", 0], "json_invalid"),
    (b"", ["body"], "missing"),
    (b"[1,2]", ["body"], "model_type"),
    (b'{"data":{}}', ["body", "type"], "missing"),
    (b'{"type":"Doc Updated"}', ["body", "type"], "string_pattern_mismatch"),
    (b'{"type":"presence.joined"}', ["body", "type"], "value_error"),
    (b'{"type":"sync.snapshot"}', ["body", "type"], "value_error"),
    (b'{"type":"doc.updated","data":[1]}', ["body", "data"], "dict_type"),
    (b'{"type":"doc.updated","extra":1}', ["body", "extra"], "extra_forbidden"),
])
async def test_publish_validation_is_422(client, token, body, loc, kind):
    response = await client.post(f"{BASE}/events", data=body,
                                 headers={**auth(token()), "Content-Type": "application/json"})
    assert response.status == 422
    item = (await response.json())["detail"][0]
    assert item["loc"] == loc
    assert item["type"] == kind
    assert set(item) == {"loc", "msg", "type", "input", "ctx"}


class _ExplodingBroker(MemoryBroker):
    async def append(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret internals /etc/passwd")


class _UnavailableBroker(MemoryBroker):
    async def change_presence(self, *args: Any, **kwargs: Any) -> Any:
        raise BackendUnavailable("redis down")

    async def ping(self) -> None:
        raise BackendUnavailable("redis down")


async def test_unexpected_error_is_500_without_traceback(app_factory, settings, token, caplog):
    client = await app_factory(settings, broker=_ExplodingBroker())
    response = await client.post(f"{BASE}/events", json={"type": "doc.updated", "data": {}},
                                 headers=auth(token()))
    assert response.status == 500
    text = await response.text()
    assert "Traceback" not in text and "secret internals" not in text
    assert_envelope(await response.json(), "INTERNAL_SERVER_ERROR", 500,
                    "An unexpected error occurred", {})


async def test_backend_down_is_503_and_not_ready(app_factory, settings, token):
    client = await app_factory(settings, broker=_UnavailableBroker())
    response = await client.post(f"{BASE}/presence/join", headers=auth(token()))
    assert response.status == 503
    assert_envelope(await response.json(), "SERVICE_UNAVAILABLE", 503,
                    "The service is temporarily unavailable", {})
    ready = await client.get("/readyz")
    assert ready.status == 503
    assert (await ready.json())["details"] == {"reason": "backend_unavailable"}
    assert (await client.get("/healthz")).status == 200


@pytest.mark.parametrize(("workspace", "kind"), [
    ("a:b", "workspace"), ("a%20b", "workspace"), ("x" * 129, "workspace"),
    ("ws1%0A", "workspace"),  # a trailing newline (once accepted: the pattern ended in "$")
    ("a}b", "route"), ("{x}", "route"),  # the router itself refuses braces
])
async def test_workspace_ids_that_cannot_exist_are_404(client, token, workspace, kind):
    response = await client.post(f"/v1/orgs/{ORG}/workspaces/{workspace}/sync/presence/join",
                                 headers=auth(token(workspaces="*")))
    assert response.status == 404
    assert (await response.json())["details"]["resource_type"] == kind


@pytest.mark.parametrize(("in_path", "org"), [("a:b", "a:b"), ("org1%0A", "org1\n")])
async def test_org_id_that_cannot_exist_is_404_even_if_the_token_names_it(client, token, in_path, org):
    response = await client.post(f"/v1/orgs/{in_path}/workspaces/w/sync/presence/join",
                                 headers=auth(token(org_id=org, workspaces="*")))
    assert response.status == 404
    assert (await response.json())["details"] == {"resource_type": "organization",
                                                  "resource_id": org}


async def test_lone_surrogate_in_published_data_is_422(client, token):
    body = b'{"type":"doc.updated","data":{"a":"\\ud800"}}'
    response = await client.post(f"{BASE}/events", data=body,
                                 headers={**auth(token()), "Content-Type": "application/json"})
    assert response.status == 422
    item = (await response.json())["detail"][0]
    assert (item["loc"], item["type"]) == (["body", "data", "a"], "value_error")


async def test_absurdly_nested_body_is_422_not_500(client, token):
    body = b'{"type":"doc.updated","data":{"a":' + b"[" * 30000 + b"]" * 30000 + b"}}"
    response = await client.post(f"{BASE}/events", data=body,
                                 headers={**auth(token()), "Content-Type": "application/json"})
    assert response.status == 422
    assert (await response.json())["detail"][0]["type"] == "json_invalid"


async def test_the_limit_is_on_the_data_not_on_how_the_body_spells_it(app_factory, settings, token):
    from dataclasses import replace

    client = await app_factory(replace(settings, max_event_bytes=1024))
    # 400 x "é": 800 bytes as the gateway encodes it, 2400 bytes as \u escapes in the body.
    body = json.dumps({"type": "doc.updated", "data": {"t": "é" * 400}}).encode()
    assert len(body) > 2048
    response = await client.post(f"{BASE}/events", data=body,
                                 headers={**auth(token()), "Content-Type": "application/json"})
    assert response.status == 200
    assert (await response.json())["data"] == {"t": "é" * 400}


async def test_413_for_a_body_past_the_transport_limit_names_the_data_limit(
        app_factory, settings, token):
    from dataclasses import replace

    client = await app_factory(replace(settings, max_event_bytes=1024))

    async def chunks():  # no Content-Length: refused while reading, past 6 x 1024 + 4096
        for _ in range(20):
            yield b" " * 1000

    response = await client.post(f"{BASE}/events", data=chunks(), headers=auth(token()))
    assert response.status == 413
    assert (await response.json())["details"] == {"max_bytes": 1024}
