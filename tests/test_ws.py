"""The WebSocket channel (SPEC §6): every op in both encodings, resume, errors, limits,
presence lifetime, and parity with SSE."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from gateway.auth import EVENTS_PUBLISH, PRESENCE_WRITE, SYNC_READ
from gateway.clock import ManualClock
from gateway.config import Settings
from gateway.handlers.common import GATEWAY
from protocol.envelope import EventId, WorkspaceKey
from tests.conftest import BASE, ORG, WORKSPACE, auth, with_settings
from tests.wsclient import Peer, connect

WS = "/v1/sync/ws"
HERE = {"org_id": ORG, "workspace_id": WORKSPACE}
ENCODINGS = ["json", "msgpack"]


@pytest.fixture(params=ENCODINGS)
def encoding(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def authed(client: TestClient, token: str, encoding: str = "json") -> Peer:
    """A socket authenticated with an ``auth`` message (the browser way)."""
    peer = await connect(client, encoding=encoding)
    answer = await peer.request("auth", token=token)
    assert answer["op"] == "reply", answer
    return peer


async def subscribed(client: TestClient, token: str, encoding: str = "json") -> Peer:
    peer = await authed(client, token, encoding)
    answer = await peer.request("subscribe", **HERE)
    assert answer["op"] == "reply", answer
    assert (await peer.event())["type"] == "sync.snapshot"
    return peer


async def publish_rest(client: TestClient, token: str, event_type: str, **data: Any) -> dict[str, Any]:
    response = await client.post(f"{BASE}/events", headers=auth(token),
                                 json={"type": event_type, "data": data})
    assert response.status == 200, await response.text()
    return dict(await response.json())


def assert_error(answer: dict[str, Any], status: int, code: str | None = None) -> dict[str, Any]:
    assert answer["op"] == "error", answer
    error = answer["error"]
    if status == 422:
        assert set(error) == {"detail"} and error["detail"], error
        for item in error["detail"]:
            assert set(item) == {"loc", "msg", "type", "input", "ctx"}
            assert item["loc"][0] == "body"
    else:
        assert set(error) == {"error", "message", "details", "timestamp", "status_code"}
        assert error["status_code"] == status and error["error"] == code, error
    return dict(error)


# -- the op table, both encodings ------------------------------------------------------


async def test_every_op_of_the_table(client: TestClient, token: Callable[..., str],
                                     encoding: str) -> None:
    peer = await connect(client, encoding=encoding)
    # auth
    answer = await peer.request("auth", token=token(name="Ada"))
    assert answer["op"] == "reply" and answer["data"]["user_id"] == "user-1"
    assert answer["data"]["node_id"] == client.app[GATEWAY].node_id  # who serves this socket
    # subscribe: the reply carries the snapshot; the events begin with it, as on SSE
    answer = await peer.request("subscribe", **HERE)
    assert answer["op"] == "reply"
    data = answer["data"]
    assert data["org_id"] == ORG and data["workspace_id"] == WORKSPACE
    assert data["subscribed"] is True and data["resumed"] is False
    snapshot = data["snapshot"]
    assert snapshot["type"] == "sync.snapshot"
    assert snapshot["data"] == {"members": [], "last_event_id": snapshot["id"]}
    assert await peer.event() == snapshot
    # join
    answer = await peer.request("join", **HERE)
    assert answer["data"]["present"] is True and answer["data"]["sessions"] == 1
    joined = await peer.event()
    assert joined["type"] == "presence.joined" and joined["data"]["user_id"] == "user-1"
    assert joined["actor"] == {"type": "user", "id": "user-1", "name": "Ada"}
    # viewing
    answer = await peer.request("viewing", **HERE, resource_type="document", resource_id="d1")
    assert answer["data"]["viewing"] == [{"resource_type": "document", "resource_id": "d1"}]
    viewing = await peer.event()
    assert viewing["type"] == "presence.viewing"
    assert viewing["data"]["viewing"] == [{"resource_type": "document", "resource_id": "d1"}]
    # publish: the reply is the envelope every subscriber gets
    answer = await peer.request("publish", **HERE, type="doc.updated", data={"id": "d1", "n": 1})
    assert answer["op"] == "reply"
    published = answer["data"]
    assert published["type"] == "doc.updated" and published["data"] == {"id": "d1", "n": 1}
    assert await peer.event() == published
    # ping
    assert await peer.request("ping") == {"op": "pong", "ref": f"r{peer._refs}"}
    # leave
    answer = await peer.request("leave", **HERE)
    assert answer["data"]["present"] is False
    left = await peer.event()
    assert left["type"] == "presence.left"
    assert left["data"] == {"user_id": "user-1", "reason": "leave"}
    # unsubscribe: no more events of the workspace
    answer = await peer.request("unsubscribe", **HERE)
    assert answer == {"op": "reply", "ref": f"r{peer._refs}",
                      "data": {**HERE, "subscribed": False}}
    await publish_rest(client, token(), "doc.updated", id="d2")
    assert (await peer.request("ping"))["op"] == "pong"
    assert not peer.events
    await peer.close()


async def test_presence_is_visible_to_rest(client: TestClient, token: Callable[..., str],
                                           encoding: str) -> None:
    peer = await authed(client, token(), encoding)
    await peer.request("viewing", **HERE, resource_type="document", resource_id="d9")
    response = await client.get(f"{BASE}/presence?resource_type=document&resource_id=d9",
                                headers=auth(token("other")))
    members = (await response.json())["members"]
    assert [m["user_id"] for m in members] == ["user-1"]
    await peer.close()


async def test_workspace_url_subscribes_once_authenticated(
    client: TestClient, token: Callable[..., str], encoding: str
) -> None:
    # header auth: subscribed at once
    peer = await connect(client, f"{BASE}/ws", encoding=encoding, token=token())
    first = await peer.receive()
    assert first["op"] == "reply" and first["ref"] is None
    assert first["data"]["snapshot"]["type"] == "sync.snapshot"
    assert (await peer.event())["type"] == "sync.snapshot"
    await peer.close()
    # message auth: subscribed right after the auth reply
    peer = await connect(client, f"{BASE}/ws", encoding=encoding)
    await peer.send({"op": "auth", "token": token(), "ref": "a"})
    assert (await peer.receive())["ref"] == "a"
    reply = await peer.receive()
    assert reply["op"] == "reply" and reply["data"]["workspace_id"] == WORKSPACE
    await peer.close()


async def test_workspace_url_reports_404_as_an_error_message(
    client: TestClient, token: Callable[..., str]
) -> None:
    peer = await connect(client, f"/v1/orgs/{ORG}/workspaces/secret/sync/ws", token=token())
    error = assert_error(await peer.receive(), 404, "RESOURCE_NOT_FOUND")
    assert error["details"] == {"resource_type": "workspace", "resource_id": "secret"}
    assert (await peer.request("ping"))["op"] == "pong"  # still open
    await peer.close()


async def test_no_subprotocol_means_json(client: TestClient, token: Callable[..., str]) -> None:
    ws = await client.ws_connect(WS)
    assert ws.protocol is None
    await ws.send_str(json.dumps({"op": "auth", "token": token(), "ref": 1}))
    message = await ws.receive(timeout=5)
    assert message.type == aiohttp.WSMsgType.TEXT
    assert json.loads(message.data)["op"] == "reply"
    await ws.close()


# -- resume ------------------------------------------------------------------------------


async def test_since_replays_missed_events_then_live(
    client: TestClient, token: Callable[..., str], encoding: str
) -> None:
    first = await publish_rest(client, token(), "doc.a", n=1)
    second = await publish_rest(client, token(), "doc.b", n=2)
    third = await publish_rest(client, token(), "doc.c", n=3)
    peer = await authed(client, token(), encoding)
    answer = await peer.request("subscribe", **HERE, since=first["id"])
    assert answer["data"]["resumed"] is True
    assert [await peer.event(), await peer.event()] == [second, third]
    fourth = await publish_rest(client, token(), "doc.d", n=4)
    assert await peer.event() == fourth
    assert (await peer.request("ping"))["op"] == "pong" and not peer.events  # exactly once
    await peer.close()


async def test_since_that_cannot_be_resumed_gives_reset_and_snapshot(
    client: TestClient, token: Callable[..., str], encoding: str
) -> None:
    await publish_rest(client, token(), "doc.a")
    for since in ("0000:1-0", "garbage", "deadbeef:99999999999999-0"):
        peer = await authed(client, token(), encoding)
        answer = await peer.request("subscribe", **HERE, since=since)
        assert answer["data"]["resumed"] is False
        reset, snapshot = await peer.event(), await peer.event()
        assert reset["type"] == "sync.reset"
        assert reset["data"] == {"reason": "history_unavailable", "last_event_id": since}
        assert snapshot["type"] == "sync.snapshot" and snapshot["id"] == reset["id"]
        await peer.close()


async def test_websocket_and_sse_clients_see_identical_envelopes(
    client: TestClient, token: Callable[..., str], encoding: str
) -> None:
    sse = await client.get(f"{BASE}/stream", headers=auth(token("watcher")))
    assert sse.status == 200
    peer = await subscribed(client, token("watcher"), encoding)
    actor = await authed(client, token("actor"), "json")
    await actor.request("join", **HERE)
    await actor.request("viewing", **HERE, resource_type="doc", resource_id="1")
    await actor.request("publish", **HERE, type="doc.edited", data={"text": "line1\nline2"})
    await publish_rest(client, token(), "doc.saved", ok=True)
    await actor.close()  # presence.left, reason disconnected

    ws_events = [await peer.event() for _ in range(5)]
    sse_events = await read_sse(sse, 6)
    assert sse_events[0]["type"] == "sync.snapshot"
    assert ws_events == sse_events[1:]
    assert [e["type"] for e in ws_events] == [
        "presence.joined", "presence.viewing", "doc.edited", "doc.saved", "presence.left"]
    sse.close()
    await peer.close()


async def read_sse(response: aiohttp.ClientResponse, count: int) -> list[dict[str, Any]]:
    """``count`` events of an SSE body, each its ``data`` line parsed, ``id`` checked."""
    events: list[dict[str, Any]] = []
    fields: dict[str, str] = {}
    async with asyncio.timeout(5):
        while len(events) < count:
            line = (await response.content.readline()).decode().rstrip("\n")
            if line == "":
                if "data" in fields:
                    envelope = json.loads(fields["data"])
                    assert fields["id"] == envelope["id"] and fields["event"] == envelope["type"]
                    events.append(envelope)
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = value
    return events


# -- bad input: an error, and the socket stays open ---------------------------------------


@pytest.mark.parametrize(
    ("message", "loc", "kind"),
    [
        ({"op": "teleport"}, ["body", "op"], "literal_error"),
        ({"ref": 1}, ["body", "op"], "missing"),
        ({"op": "subscribe", "org_id": ORG}, ["body", "workspace_id"], "missing"),
        ({"op": "subscribe", "org_id": 7, "workspace_id": WORKSPACE}, ["body", "org_id"],
         "string_type"),
        ({"op": "publish", **HERE, "type": "x", "data": [1]}, ["body", "data"], "dict_type"),
        ({"op": "publish", **HERE, "type": "Bad Type"}, ["body", "type"], "string_pattern_mismatch"),
        ({"op": "publish", **HERE, "type": "sync.fake"}, ["body", "type"], "value_error"),
        ({"op": "viewing", **HERE, "resource_type": "doc"}, ["body", "resource_id"], "missing"),
        ({"op": "subscribe", **HERE, "since": 5}, ["body", "since"], "string_type"),
    ],
)
async def test_bad_messages_get_a_422_error_echoing_ref(
    client: TestClient, token: Callable[..., str], encoding: str,
    message: dict[str, Any], loc: list[Any], kind: str,
) -> None:
    peer = await authed(client, token(), encoding)
    await peer.send({**message, "ref": "bad"} if "ref" not in message else message)
    answer = await peer.receive()
    error = assert_error(answer, 422)
    assert answer["ref"] == message.get("ref", "bad")
    assert any(item["loc"] == loc and item["type"] == kind for item in error["detail"]), error
    assert (await peer.request("ping"))["op"] == "pong"
    await peer.close()


@pytest.mark.parametrize(
    "frame", [b"{not json", b"\xff\xfe\x00", b"[1,2,3]", b'"just a string"', b"\xc1", b"",
              b"\x81\xa2op", b"9" * 5000, b"[" * 5000]
)
async def test_undecodable_frames_get_an_error(
    client: TestClient, token: Callable[..., str], encoding: str, frame: bytes
) -> None:
    peer = await authed(client, token(), encoding)
    await peer.ws.send_bytes(frame)
    answer = await peer.receive()
    assert_error(answer, 422)
    assert answer["ref"] is None
    assert (await peer.request("ping"))["op"] == "pong"
    await peer.close()


async def test_values_no_codec_can_carry_are_refused(
    client: TestClient, token: Callable[..., str]
) -> None:
    peer = await authed(client, token())
    for text in ('{"op":"publish","ref":1,"org_id":"org-1","workspace_id":"ws-1","type":"a",'
                 '"data":{"n":NaN}}',
                 '{"op":"publish","ref":1,"org_id":"org-1","workspace_id":"ws-1","type":"a",'
                 '"data":{"n":' + "9" * 40 + "}}",
                 '{"op":"ping","ref":1,"x":"\\ud800"}'):
        await peer.ws.send_str(text)
        answer = await peer.receive()
        assert_error(answer, 422)
        assert answer["ref"] == 1
    # and the REST publish path refuses them too (msgpack subscribers could not receive them)
    response = await client.post(f"{BASE}/events", headers={**auth(token()),
                                 "Content-Type": "application/json"},
                                 data='{"type":"a","data":{"n":' + "9" * 40 + "}}")
    assert response.status == 422
    await peer.close()


async def test_rest_rules_as_error_messages(client: TestClient, token: Callable[..., str],
                                            encoding: str) -> None:
    peer = await authed(client, token(permissions=[SYNC_READ]), encoding)
    error = assert_error(await peer.request("subscribe", org_id=ORG, workspace_id="other"),
                         404, "RESOURCE_NOT_FOUND")
    assert error["details"] == {"resource_type": "workspace", "resource_id": "other"}
    error = assert_error(await peer.request("subscribe", org_id="org-2", workspace_id=WORKSPACE),
                         404, "RESOURCE_NOT_FOUND")
    assert error["details"] == {"resource_type": "organization", "resource_id": "org-2"}
    for op, permission, extra in (
        ("join", PRESENCE_WRITE, {}),
        ("leave", PRESENCE_WRITE, {}),
        ("viewing", PRESENCE_WRITE, {"resource_type": "d", "resource_id": "1"}),
        ("publish", EVENTS_PUBLISH, {"type": "doc.x", "data": {}}),
    ):
        error = assert_error(await peer.request(op, **HERE, **extra), 403, "FORBIDDEN")
        assert error["details"] == {"required_permission": permission}
    answer = await peer.request("subscribe", **HERE)  # sync:read is granted
    assert answer["op"] == "reply"
    await peer.close()


async def test_publish_over_the_size_limit_is_413(client: TestClient, settings: Settings,
                                                  token: Callable[..., str]) -> None:
    peer = await authed(client, token())
    big = "x" * (settings.max_event_bytes + 10)
    error = assert_error(await peer.request("publish", **HERE, type="doc.big", data={"t": big}),
                         413, "PAYLOAD_TOO_LARGE")
    assert error["details"] == {"max_bytes": settings.max_event_bytes}
    await peer.close()


async def test_subscribing_twice_is_an_error(client: TestClient, token: Callable[..., str]) -> None:
    peer = await subscribed(client, token())
    assert_error(await peer.request("subscribe", **HERE), 422)
    await peer.close()


# -- limits --------------------------------------------------------------------------------


async def test_oversized_frame_closes_1009(app_factory: Callable[..., Any], settings: Settings,
                                           token: Callable[..., str]) -> None:
    client = await app_factory(with_settings(settings, ws_max_message_bytes=4096))
    peer = await authed(client, token())
    await peer.ws.send_str(json.dumps({"op": "ping", "pad": "x" * 5000}))
    code, _ = await peer.closed()
    assert code == 1009
    # the node is fine
    other = await authed(client, token())
    assert (await other.request("ping"))["op"] == "pong"
    await other.close()


async def test_text_frame_that_is_not_utf8_closes_1007(client: TestClient,
                                                       token: Callable[..., str]) -> None:
    peer = await authed(client, token())
    await peer.ws._writer.send_frame(b'{"op":"ping","x":"\xff"}', aiohttp.WSMsgType.TEXT)
    code, _ = await peer.closed()
    assert code == 1007


async def test_flood_gets_429_then_close_1008(app_factory: Callable[..., Any], settings: Settings,
                                              token: Callable[..., str]) -> None:
    # The test clock does not move: the bucket never refills, the outcome is exact.
    client = await app_factory(with_settings(settings, ws_rate_burst=20, ws_rate_strikes=5))
    peer = await connect(client, token=token())
    for n in range(200):
        await peer.send({"op": "ping", "ref": n})
    code, before = await peer.closed()
    assert code == 1008
    pongs = [m for m in before if m["op"] == "pong"]
    limited = [m for m in before if m["op"] == "error"]
    # Answered in order while within the burst; what is still queued at the close is
    # dropped (a closed socket's queue is), but the last word is always the 429.
    refs = [m["ref"] for m in pongs]
    assert refs == list(range(len(refs))) and 0 < len(refs) <= 20
    assert 1 <= len(limited) <= 6 and before[-1] == limited[-1]
    for message in limited:
        assert_error(message, 429, "RATE_LIMITED")
    other = await connect(client, token=token())  # one client's flood is its own problem
    assert (await other.request("ping"))["op"] == "pong"
    await other.close()


async def test_subscriptions_per_socket_are_limited(
    app_factory: Callable[..., Any], settings: Settings, token: Callable[..., str]
) -> None:
    client = await app_factory(with_settings(settings, ws_max_subscriptions=2))
    peer = await authed(client, token(workspaces="*"))
    for workspace in ("a", "b"):
        assert (await peer.request("subscribe", org_id=ORG, workspace_id=workspace))["op"] == "reply"
    assert_error(await peer.request("subscribe", org_id=ORG, workspace_id="c"), 429, "RATE_LIMITED")
    await peer.request("unsubscribe", org_id=ORG, workspace_id="a")
    assert (await peer.request("subscribe", org_id=ORG, workspace_id="c"))["op"] == "reply"
    await peer.close()


async def test_one_socket_follows_many_workspaces(client: TestClient,
                                                  token: Callable[..., str]) -> None:
    peer = await authed(client, token(workspaces=["a", "b"]))
    for workspace in ("a", "b"):
        await peer.request("subscribe", org_id=ORG, workspace_id=workspace)
        assert (await peer.event())["workspace_id"] == workspace
    await peer.request("publish", org_id=ORG, workspace_id="b", type="doc.x", data={})
    await peer.request("publish", org_id=ORG, workspace_id="a", type="doc.y", data={})
    got = [await peer.event(), await peer.event()]
    assert [(e["workspace_id"], e["type"]) for e in got] == [("b", "doc.x"), ("a", "doc.y")]
    await peer.close()


# -- authentication and origin ------------------------------------------------------------


async def test_no_auth_in_time_closes_4401(app_factory: Callable[..., Any], settings: Settings) -> None:
    client = await app_factory(with_settings(settings, ws_auth_timeout=0.2))
    peer = await connect(client)
    code, before = await peer.closed()
    assert code == 4401
    assert_error(before[-1], 401, "AUTHENTICATION_FAILED")


async def test_ops_before_auth_are_401_and_auth_still_works(
    client: TestClient, token: Callable[..., str]
) -> None:
    peer = await connect(client)
    assert_error(await peer.request("subscribe", **HERE), 401, "AUTHENTICATION_FAILED")
    assert_error(await peer.request("ping"), 401, "AUTHENTICATION_FAILED")
    assert (await peer.request("auth", token=token()))["op"] == "reply"
    assert_error(await peer.request("auth", token=token()), 422)  # once is enough
    assert (await peer.request("subscribe", **HERE))["op"] == "reply"
    await peer.close()


def forged_tokens(token: Callable[..., str], clock: ManualClock) -> dict[str, str]:
    import base64

    import jwt

    def b64(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    claims = {"sub": "mallory", "org_id": ORG, "workspaces": "*",
              "permissions": [SYNC_READ], "exp": int(clock.now()) + 3600}
    good = token()
    header, payload, signature = good.split(".")
    return {
        "alg_none": f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}.",
        "wrong_key": token(secret="not-the-secret-" + "y" * 32),
        "expired": token(ttl=-3600),
        "tampered_claims": f"{header}.{b64(claims)}.{signature}",
        "hs256_with_public_looking_key": jwt.encode(claims, "-----BEGIN PUBLIC KEY-----" + "A" * 40,
                                                    algorithm="HS256"),
        "garbage": "not.a.jwt",
        "not_yet_valid": token(nbf=int(clock.now()) + 3600),
    }


@pytest.mark.parametrize("kind", ["alg_none", "wrong_key", "expired", "tampered_claims",
                                  "hs256_with_public_looking_key", "garbage", "not_yet_valid"])
async def test_forged_tokens_are_refused(
    client: TestClient, token: Callable[..., str], clock: ManualClock, kind: str
) -> None:
    forged = forged_tokens(token, clock)[kind]
    # in an auth message: a 401 error, then close 4401
    peer = await connect(client)
    await peer.send({"op": "auth", "token": forged, "ref": "x"})
    code, before = await peer.closed()
    assert code == 4401
    assert before[0]["ref"] == "x"
    assert_error(before[0], 401, "AUTHENTICATION_FAILED")
    # in the upgrade's header: refused at the handshake, no socket
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(WS, headers=auth(forged))
    assert refused.value.status == 401


async def test_token_expiry_sends_token_expired_then_closes(
    client: TestClient, token: Callable[..., str], clock: ManualClock, settings: Settings,
    encoding: str,
) -> None:
    watcher = await subscribed(client, token("watcher"), "json")
    peer = await subscribed(client, token(ttl=60), encoding)
    await peer.request("join", **HERE)
    joined = await peer.event()
    assert (await watcher.event())["type"] == "presence.joined"
    clock.advance(60 + settings.jwt_leeway + 1)
    code, before = await peer.closed()
    assert code == 4401
    assert [m["event"]["type"] for m in before] == ["sync.token_expired"]
    expired = before[0]["event"]
    assert expired["id"] == joined["id"]  # where to resume from with a fresh token
    assert expired["workspace_id"] == WORKSPACE
    left = await watcher.event()
    assert left["type"] == "presence.left" and left["data"]["reason"] == "disconnected"
    await watcher.close()


ALLOWED = ("https://app.example.com", "http://localhost:3000")


@pytest.mark.parametrize("origin", ["https://app.example.com", "https://APP.example.com:443",
                                    "http://localhost:3000", None])
async def test_allowed_origins_and_non_browsers_connect(
    app_factory: Callable[..., Any], settings: Settings, token: Callable[..., str],
    origin: str | None,
) -> None:
    client = await app_factory(with_settings(settings, allowed_origins=ALLOWED))
    headers = {"Origin": origin} if origin else {}
    peer = await connect(client, token=token(), headers=headers)
    assert (await peer.request("ping"))["op"] == "pong"
    await peer.close()


@pytest.mark.parametrize("origin", [
    "https://evil.example.net",
    "https://app.example.com.evil.net",          # suffix trick
    "https://evilapp.example.com",               # prefix trick
    "https://evil.net/https://app.example.com",  # path trick
    "https://app.example.com@evil.net",          # userinfo trick
    "http://app.example.com",                    # wrong scheme
    "https://app.example.com:8443",              # wrong port
    "http://localhost:30000",
    "null",                                      # sandboxed iframe, file://
    "*",
    "",
])
async def test_cross_site_websocket_hijacking_is_refused_at_the_handshake(
    app_factory: Callable[..., Any], settings: Settings, token: Callable[..., str], origin: str
) -> None:
    client = await app_factory(with_settings(settings, allowed_origins=ALLOWED))
    # even with credentials a browser would attach (the token), no socket is opened
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(WS, headers={"Origin": origin, **auth(token())})
    assert refused.value.status == 403
    response = await client.get(WS, headers={"Origin": origin, "Upgrade": "websocket",
                                              "Connection": "Upgrade",
                                              "Sec-WebSocket-Version": "13",
                                              "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    body = await response.json()
    assert body["error"] == "FORBIDDEN" and body["details"] == {"reason": "origin_not_allowed"}


async def test_empty_allow_list_admits_no_browser(client: TestClient,
                                                  token: Callable[..., str]) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(WS, headers={"Origin": "http://127.0.0.1"})
    assert refused.value.status == 403


async def test_two_origin_headers_are_refused(app_factory: Callable[..., Any],
                                              settings: Settings) -> None:
    client = await app_factory(with_settings(settings, allowed_origins=ALLOWED))
    from multidict import CIMultiDict

    headers = CIMultiDict([("Origin", "https://app.example.com"), ("Origin", "https://evil.net")])
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect(WS, headers=headers)
    assert refused.value.status == 403


# -- presence lifetime -----------------------------------------------------------------------


async def test_three_tabs_are_one_member(client: TestClient, token: Callable[..., str]) -> None:
    watcher = await subscribed(client, token("watcher"))
    tabs = [await authed(client, token()) for _ in range(3)]
    for tab in tabs:
        answer = await tab.request("join", **HERE)
    assert answer["data"]["sessions"] == 3
    await tabs[0].close()
    await tabs[1].request("leave", **HERE)
    await tabs[1].close()
    marker = await publish_rest(client, token("watcher"), "marker.one")
    assert (await watcher.event())["type"] == "presence.joined"
    assert await watcher.event() == marker  # no presence.left while a tab is open
    await tabs[2].close()
    left = await watcher.event()
    assert left["type"] == "presence.left"
    assert left["data"] == {"user_id": "user-1", "reason": "disconnected"}
    await watcher.close()


async def test_half_open_connection_is_detected_and_its_presence_ends(
    app_factory: Callable[..., Any], settings: Settings, token: Callable[..., str]
) -> None:
    client = await app_factory(with_settings(settings, keepalive=0.2))
    watcher = await subscribed(client, token("watcher"))
    # A client that never answers pings (as a peer whose network vanished).
    ws = await client.ws_connect(WS, headers=auth(token()), autoping=False)
    await ws.send_str(json.dumps({"op": "join", **HERE, "ref": 1}))
    assert (await watcher.event())["type"] == "presence.joined"
    left = await watcher.event(timeout=5)  # ping at 0.2 s, no pong 0.1 s later
    assert left["type"] == "presence.left" and left["data"]["reason"] == "disconnected"
    # a client that answers pings stays
    assert (await watcher.request("ping"))["op"] == "pong"
    await ws.close()
    await watcher.close()


async def test_drain_closes_1012_and_keeps_presence_for_the_grace(
    app_factory: Callable[..., Any], settings: Settings, token: Callable[..., str],
    clock: ManualClock,
) -> None:
    node_a = await app_factory(with_settings(settings, node_id="node-a"))
    broker = node_a.server.app[GATEWAY].broker
    node_b = await app_factory(with_settings(settings, node_id="node-b"), broker=broker)
    peer = await subscribed(node_a, token())
    idle = await authed(node_a, token("idle"))  # no subscription: drained too
    await peer.request("join", **HERE)
    joined = await peer.event()

    await node_a.server.app.shutdown()  # on_shutdown: the drain
    code, _ = await peer.closed()
    assert code == 1012
    assert (await idle.closed())[0] == 1012
    workspace = WorkspaceKey(ORG, WORKSPACE)

    async def members() -> list[str]:
        snapshot = await broker.presence_snapshot(workspace)
        return sorted(snapshot.members)

    await asyncio.sleep(0.05)  # the handler's cleanup
    assert await members() == ["user-1"]  # kept for the grace period
    # the client reconnects to another node within the grace and joins again
    again = await subscribed(node_b, token())
    await again.request("join", **HERE)
    clock.advance(settings.disconnect_grace + 1)
    await broker.sweep()
    assert await members() == ["user-1"]
    after = await broker.read_after(workspace, EventId.parse(joined["id"]))
    assert [e.type for e in after] == []  # no left/joined flicker
    # without a reconnect, the lingering session ends after the grace
    await again.close()
    await asyncio.sleep(0.05)
    assert await members() == []


@pytest.mark.parametrize("path", ["/v1/sync/ws", "/v1/orgs/org-1/workspaces/ws-1/sync/ws"])
async def test_plain_get_without_upgrade_is_426_envelope(client: TestClient, path: str) -> None:
    response = await client.get(path)
    assert response.status == 426
    assert response.headers["Upgrade"] == "websocket"
    body = await response.json()
    assert body["error"] == "UPGRADE_REQUIRED"
    assert body["details"] == {"upgrade": "websocket"}
    assert body["status_code"] == 426


async def test_publishes_sent_back_to_back_then_a_close_all_land_in_order_before_the_leave(
    app_factory: Callable[..., Any], settings: Settings, broker: Any, token: Callable[..., str]
) -> None:
    # Publishes are pipelined (answered in turn, not one after the other): a client that
    # sends many and goes away at once must still have every one of them in the log, in the
    # order sent, and its presence must end after them.
    client = await app_factory(settings, broker=broker)
    gateway = client.app[GATEWAY]
    workspace = WorkspaceKey(ORG, WORKSPACE)
    start = (await gateway.broker.presence_snapshot(workspace)).position
    peer = await authed(client, token())
    await peer.request("join", **HERE)
    for n in range(30):
        await peer.send({"op": "publish", "ref": n, **HERE, "type": "doc.updated", "data": {"n": n}})
    await peer.close()
    async with asyncio.timeout(5):
        while not (logged := await gateway.broker.read_after(workspace, start)) or \
                logged[-1].type != "presence.left":  # noqa: ASYNC110 (the node ends it)
            await asyncio.sleep(0.02)
    assert [e.type for e in logged] == ["presence.joined", *["doc.updated"] * 30, "presence.left"]
    assert [e.data["n"] for e in logged[1:-1]] == list(range(30))


async def test_a_publish_flood_is_answered_in_order_then_limited(
    app_factory: Callable[..., Any], settings: Settings, broker: Any, token: Callable[..., str]
) -> None:
    # Publishes are under way together; the rate limit's 429s (and a malformed frame's 422)
    # still come after the answers to the publishes sent before them.
    client = await app_factory(with_settings(settings, ws_rate_burst=12, ws_rate_strikes=50),
                               broker=broker)
    peer = await connect(client, token=token())
    frames: list[Any] = [{"op": "publish", "ref": n, **HERE, "type": "doc.updated", "data": {"n": n}}
                         for n in range(8)]
    frames.append({"op": "publish", "ref": "bad", **HERE, "type": "Not A Type"})
    frames += [{"op": "publish", "ref": n, **HERE, "type": "doc.updated", "data": {"n": n}}
               for n in range(8, 20)]
    for frame in frames:
        await peer.send(frame)
    answers = [await peer.receive() for _ in frames]
    assert [a["ref"] for a in answers][:12] == [*range(8), "bad", 8, 9, 10]
    assert [a["op"] for a in answers][:12] == ["reply"] * 8 + ["error"] + ["reply"] * 3
    assert_error(answers[8], 422)
    for answer in answers[12:]:  # past the burst of 12: refused, each in its turn
        assert_error(answer, 429, "RATE_LIMITED")
    ids = [EventId.parse(a["data"]["id"]).entry for a in answers if a["op"] == "reply"]
    assert ids == sorted(ids) and len(set(ids)) == 11
    await peer.close()


@pytest.mark.parametrize(("size", "most"), [(100, 64), (60_000, 4)])
async def test_a_socket_holds_a_bounded_number_and_size_of_publishes_under_way(
    app_factory: Callable[..., Any], settings: Settings, token: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch, size: int, most: int
) -> None:
    # A client that sends publishes faster than they land may have 64 under way, or 256 KiB
    # of frames, not more: the next frame waits (its memory is bounded, not its patience).
    client = await app_factory(with_settings(settings, ws_rate_burst=200))
    broker = client.app[GATEWAY].broker
    real, under_way, seen = type(broker).append, [0], [0]
    release = asyncio.Event()

    async def slow(self: Any, *args: Any, **kwargs: Any) -> Any:
        under_way[0] += 1
        seen[0] = max(seen[0], under_way[0])
        await release.wait()
        under_way[0] -= 1
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(type(broker), "append", slow)
    peer = await authed(client, token())
    for n in range(100):
        await peer.send({"op": "publish", "ref": n, **HERE, "type": "doc.updated",
                         "data": {"n": n, "pad": "x" * size}})
    await asyncio.sleep(0.3)  # the socket reads what it may
    assert seen[0] == most
    release.set()
    answers = [await peer.receive() for _ in range(100)]
    assert [a["ref"] for a in answers] == list(range(100))
    assert all(a["op"] == "reply" for a in answers), answers[0]
    await peer.close()
