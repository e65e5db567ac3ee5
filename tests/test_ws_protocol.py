"""The pure message parser: arbitrary input never escapes as anything but a 422 whose
body both codecs can carry; valid messages parse to what they say."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.codecs import JSON, MSGPACK
from protocol.envelope import portability_problem
from protocol.errors import ValidationFailed
from protocol.ws import (
    MESSAGES,
    Auth,
    Ping,
    Publish,
    Subscribe,
    Viewing,
    codec_for,
    decode_frame,
    parse_client_message,
    reference_of,
)

# Anything a decoder could hand the parser, and worse: NaN, huge ints, lone
# surrogates, bytes, deep nesting.
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
    st.binary(max_size=20), st.sampled_from(["\ud800", 2**64, -(2**63) - 1, float("nan")]),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=20,
)
names = st.text(min_size=1, max_size=12)
fields = st.fixed_dictionaries({}, optional={
    "op": st.one_of(st.sampled_from(sorted(MESSAGES)), values),
    "ref": st.one_of(st.text(max_size=10), st.integers(), values),
    "token": st.one_of(names, values),
    "org_id": st.one_of(names, values),
    "workspace_id": st.one_of(names, values),
    "since": st.one_of(st.none(), names, values),
    "resource_type": st.one_of(names, values),
    "resource_id": st.one_of(names, values),
    "type": st.one_of(st.sampled_from(["doc.updated", "presence.joined", "A"]), values),
    "data": st.one_of(st.dictionaries(st.text(max_size=5), values, max_size=3), values),
})


def assert_sendable_422(error: ValidationFailed) -> None:
    body = error.body()
    assert set(body) == {"detail"} and body["detail"]
    for item in body["detail"]:
        assert set(item) == {"loc", "msg", "type", "input", "ctx"}
        assert item["loc"][0] == "body"
    # the error message goes back to the client in its encoding: both must work
    JSON.encode(body).decode("utf-8")
    MSGPACK.encode(body)


@settings(max_examples=400, deadline=None)
@given(st.one_of(fields, values))
def test_parser_answers_anything_with_a_message_or_a_sendable_422(raw: Any) -> None:
    try:
        message = parse_client_message(raw)
    except ValidationFailed as error:
        assert_sendable_422(error)
        return
    assert type(message) is MESSAGES[raw["op"]]
    assert portability_problem(message.model_dump()) is None
    # a parsed message's ref is what answers echo
    assert message.ref == reference_of(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(["mm-sync.v1.json", "mm-sync.v1.msgpack"]))
def test_arbitrary_frames_decode_or_fail_as_422(payload: bytes, subprotocol: str) -> None:
    codec = codec_for(subprotocol)
    try:
        raw = decode_frame(codec, payload)
    except ValidationFailed as error:
        assert_sendable_422(error)
        return
    try:
        parse_client_message(raw)
    except ValidationFailed as error:
        assert_sendable_422(error)


def test_deep_nesting_is_a_422_not_a_crash() -> None:
    for codec, payload in ((JSON, b"[" * 100_000), (MSGPACK, b"\x91" * 100_000)):
        with pytest.raises(ValidationFailed):
            decode_frame(codec, payload)
    deep: Any = "x"
    for _ in range(40):
        deep = {"a": deep}
    with pytest.raises(ValidationFailed) as failed:
        parse_client_message({"op": "publish", "org_id": "o", "workspace_id": "w",
                              "type": "doc.x", "data": deep})
    assert failed.value.items[0]["loc"][:3] == ["body", "data", "a"]


refs = st.one_of(st.none(), st.text(max_size=16), st.integers(-(2**53), 2**53))
valid_names = st.text(min_size=1, max_size=30).filter(lambda s: portability_problem(s) is None)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
              st.floats(allow_nan=False, allow_infinity=False), valid_names),
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(valid_names, children, max_size=3)),
    max_leaves=10,
)
event_types = st.from_regex(r"^[a-z][a-z0-9_.-]{0,63}$", fullmatch=True).filter(
    lambda t: not t.startswith(("presence.", "sync.")))


@settings(max_examples=200, deadline=None)
@given(st.data(), st.sampled_from(["json", "msgpack"]))
def test_valid_messages_round_trip_through_both_codecs(data: st.DataObject, name: str) -> None:
    codec = JSON if name == "json" else MSGPACK
    ref = data.draw(refs)
    org, workspace = data.draw(valid_names), data.draw(valid_names)
    cases: list[tuple[dict[str, Any], type, dict[str, Any]]] = [
        ({"op": "auth", "token": "t.k.n"}, Auth, {"token": "t.k.n"}),
        ({"op": "ping"}, Ping, {}),
        ({"op": "subscribe", "org_id": org, "workspace_id": workspace, "since": "e:1-0"},
         Subscribe, {"org_id": org, "workspace_id": workspace, "since": "e:1-0"}),
        ({"op": "viewing", "org_id": org, "workspace_id": workspace, "resource_type": "doc",
          "resource_id": org}, Viewing, {"resource_id": org}),
    ]
    event_type, payload = data.draw(event_types), data.draw(st.dictionaries(valid_names, json_values, max_size=4))
    cases.append(({"op": "publish", "org_id": org, "workspace_id": workspace, "type": event_type,
                   "data": payload}, Publish, {"type": event_type, "data": payload}))
    for raw, kind, expected in cases:
        decoded = decode_frame(codec, codec.encode({**raw, "ref": ref}))
        message = parse_client_message(decoded)
        assert type(message) is kind and message.ref == ref
        for key, value in expected.items():
            assert getattr(message, key) == value


# -- the pure pieces around the socket ------------------------------------------------------


def test_session_linger_keeps_a_draining_session_for_the_grace() -> None:
    from gateway.presence import prune, session_join, session_linger

    record = session_join("u1", {"type": "user", "id": "u1"}, "ws-a", "node-a").apply(None, 100.0)
    record = session_join("u1", {"type": "user", "id": "u1"}, "ws-b", "node-a").apply(record, 100.0)
    lingering = session_linger("ws-a", 10.0).apply(record, 200.0)
    assert lingering is not None and lingering.member() is not None
    assert lingering.next_expiry() == 210.0
    assert prune().apply(lingering, 209.0) == lingering
    after = prune().apply(lingering, 210.5)
    assert after is not None and [s.id for s in after.sessions] == ["ws-b"]
    assert session_linger("unknown", 10.0).apply(record, 200.0) == record
    assert session_linger("ws-a", 10.0).apply(None, 200.0) is None


def test_token_bucket() -> None:
    from gateway.session import TokenBucket

    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.5) and not bucket.take(0.5)  # one token per half second
    assert not bucket.take(0.4)  # a clock stepping back refills nothing
    assert bucket.take(10.0) and bucket.full  # refilled: that take was within the rate
    assert [bucket.take(10.0) for _ in range(3)] == [True, True, False]
    assert bucket.full is False


@pytest.mark.parametrize(("origin", "normal"), [
    ("https://App.Example.com", "https://app.example.com"),
    ("https://app.example.com:443", "https://app.example.com"),
    ("http://localhost:3000/", "http://localhost:3000"),
    ("null", None), ("file://", None), ("https://a.com/path", None),
    ("https://user@a.com", None), ("https://a.com:99999", None), ("ws://a.com", None),
])
def test_origin_normalisation(origin: str, normal: str | None) -> None:
    from gateway.origins import normalise_origin

    assert normalise_origin(origin) == normal
