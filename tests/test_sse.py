"""The SSE stream as a client reads it: exact bytes, keep-alive, timeout, resume and reset."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import pytest

from gateway.handlers.common import GATEWAY
from protocol.envelope import WorkspaceKey
from protocol.sse import encode_envelope, frame
from tests.conftest import BASE, ORG, WORKSPACE, auth, make_broker
from tests.sse_client import SSEReader, parse_block

STREAM = f"{BASE}/stream"
KEY = WorkspaceKey(ORG, WORKSPACE)


async def open_stream(client, token, *, query="", headers=None):
    response = await client.get(f"{STREAM}{query}", headers={**auth(token), **(headers or {})})
    assert response.status == 200, await response.text()
    return response, SSEReader(response)


async def raw_stream(client, request: bytes):
    """``request`` sent on a raw connection; (reader, writer, the bytes up to the snapshot)."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(request)
    await writer.drain()
    received = b""
    async with asyncio.timeout(5):
        while b"event: sync.snapshot" not in received:
            chunk = await reader.read(65536)
            assert chunk, received
            received += chunk
    return reader, writer, received


async def publish(client, token, n: int, type_: str = "doc.updated") -> list[dict]:
    out = []
    for i in range(n):
        response = await client.post(f"{BASE}/events", json={"type": type_, "data": {"n": i}},
                                     headers=auth(token))
        assert response.status == 200
        out.append(await response.json())
    return out


def test_frame_strips_field_injection_and_splits_data():
    assert frame("a\nb\r\nc", event="x\ny", event_id="1\r\n2\x00") == (
        b"id: 12\nevent: xy\ndata: a\ndata: b\ndata: c\n\n")


async def test_stream_starts_with_exact_retry_and_snapshot_bytes(client, token):
    response, reader = await open_stream(client, token())
    assert response.headers["Content-Type"] == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert await reader.raw(len(b"retry: 3000\n\n")) == b"retry: 3000\n\n"
    block = await reader.block()
    event_id, event, data = block.decode().split("\n")[:3]
    envelope = json.loads(data.removeprefix("data: "))
    # data is the compact one-line JSON of the envelope, nothing else in the block
    assert block == (f"id: {envelope['id']}\nevent: sync.snapshot\n"
                     f"data: {json.dumps(envelope, separators=(',', ':'))}\n\n").encode()
    assert event_id == f"id: {envelope['id']}"
    assert envelope["type"] == "sync.snapshot"
    assert envelope["org_id"] == ORG and envelope["workspace_id"] == WORKSPACE
    assert envelope["data"] == {"members": [], "last_event_id": envelope["id"]}
    assert list(envelope) == ["id", "type", "org_id", "workspace_id", "actor", "data", "timestamp"]
    response.close()


async def test_live_event_bytes_match_the_envelope(client, token):
    response, reader = await open_stream(client, token())
    await reader.next()  # snapshot
    [published] = await publish(client, token(), 1)
    block = await reader.block()
    assert block == (f"id: {published['id']}\nevent: doc.updated\ndata: "
                     f"{json.dumps(published, separators=(',', ':'), ensure_ascii=False)}\n\n"
                     ).encode()
    response.close()


async def test_unicode_and_newlines_in_data_stay_one_data_line(client, token):
    response, reader = await open_stream(client, token())
    await reader.next()
    data = {"text": "line one\nline two\r\nzwölf 🚀", "nested": {"a": [1, None, True]}}
    await client.post(f"{BASE}/events", json={"type": "doc.updated", "data": data},
                      headers=auth(token()))
    block = await reader.block()
    assert block.count(b"\ndata: ") == 1
    assert json.loads(block.split(b"data: ", 1)[1])["data"] == data
    response.close()


async def test_keepalive_comments(app_factory, settings, token):
    client = await app_factory(replace(settings, keepalive=0.1))
    response, reader = await open_stream(client, token())
    await reader.next()
    assert await reader.block(timeout=2) == b": ping\n\n"
    response.close()


async def test_stream_ends_cleanly_at_timeout(client, token, clock):
    response, reader = await open_stream(client, token(), query="?timeout=60")
    await reader.next()
    clock.advance(59)
    await publish(client, token(), 1)
    assert (await reader.next()).event == "doc.updated"
    clock.advance(1.5)
    assert await reader.until_eof() == []
    assert reader.eof and not reader.aborted


async def test_token_expiry_sends_token_expired_then_ends(client, token, clock):
    response, reader = await open_stream(client, token(ttl=120))
    snapshot = await reader.next()
    clock.advance(120 + 11)  # past exp and the leeway
    event = await reader.next()
    assert event.event == "sync.token_expired"
    assert event.envelope["data"] == {"reason": "token_expired"}
    assert event.id == snapshot.id  # resuming from it loses nothing
    assert await reader.until_eof() == []


@pytest.mark.parametrize("how", ["header", "query"])
async def test_last_event_id_replays_exactly_the_missed_events(client, token, how):
    response, reader = await open_stream(client, token())
    await reader.next()
    seen = await publish(client, token(), 3)
    got = await reader.events(3)
    assert [e.id for e in got] == [p["id"] for p in seen]
    response.close()

    missed = await publish(client, token(), 4)
    resume_from = got[-1].id
    if how == "header":
        response, reader = await open_stream(client, token(), headers={"Last-Event-ID": resume_from})
    else:
        response, reader = await open_stream(client, token(), query=f"?last_event_id={resume_from}")
    replay = await reader.events(4)
    assert [e.id for e in replay] == [m["id"] for m in missed]
    assert [e.envelope for e in replay] == missed
    live = await publish(client, token(), 1)
    assert (await reader.next()).id == live[0]["id"]
    response.close()


async def test_resume_from_the_snapshot_id_gets_everything_after_it(client, token):
    response, reader = await open_stream(client, token())
    snapshot = await reader.next()
    response.close()
    missed = await publish(client, token(), 2)
    response, reader = await open_stream(client, token(), headers={"Last-Event-ID": snapshot.id})
    assert [e.id for e in await reader.events(2)] == [m["id"] for m in missed]
    response.close()


async def test_resume_at_the_head_gets_no_replay_and_live_events(client, token):
    [last] = await publish(client, token(), 1)
    response, reader = await open_stream(client, token(), headers={"Last-Event-ID": last["id"]})
    [live] = await publish(client, token(), 1)
    assert (await reader.next()).id == live["id"]
    response.close()


async def test_events_published_during_replay_arrive_once_in_order(client, token):
    await publish(client, token(), 1)
    first_id = (await publish(client, token(), 1))[0]["id"]
    await publish(client, token(), 20)
    response, reader = await open_stream(client, token(), headers={"Last-Event-ID": first_id})
    more = asyncio.create_task(publish(client, token(), 20))
    events = await reader.events(40)
    await more
    ids = [e.id for e in events]
    assert len(set(ids)) == 40
    assert [e.envelope["data"]["n"] for e in events] == list(range(20)) * 2
    response.close()


async def test_id_older_than_retained_count_gets_reset_and_snapshot(app_factory, settings, token):
    client = await app_factory(replace(settings, history_max_len=3))
    [first, *_] = await publish(client, token(), 10)
    await client.post(f"{BASE}/presence/join", headers=auth(token("bob")))
    response, reader = await open_stream(client, token(), headers={"Last-Event-ID": first["id"]})
    reset, snapshot = await reader.events(2)
    assert reset.event == "sync.reset"
    assert reset.envelope["data"] == {"reason": "history_unavailable", "last_event_id": first["id"]}
    assert snapshot.event == "sync.snapshot"
    assert [m["user_id"] for m in snapshot.envelope["data"]["members"]] == ["bob"]
    [live] = await publish(client, token(), 1)
    assert (await reader.next()).id == live["id"]
    response.close()


async def test_id_older_than_retained_age_gets_reset(app_factory, settings, token, clock):
    client = await app_factory(replace(settings, history_max_age=60))
    [old] = await publish(client, token(), 1)
    await publish(client, token(), 1)
    clock.advance(120)
    response, reader = await open_stream(client, token(), headers={"Last-Event-ID": old["id"]})
    assert (await reader.next()).event == "sync.reset"
    response.close()


@pytest.mark.parametrize("bad_id", ["garbage", "0-0", "deadbeef:1-0", "abc:99999999999999-0",
                                    "x" * 200, "1:2:3",
                                    # beyond Redis's 64-bit id parts (once a 500)
                                    "abc:99999999999999999999-0", "abc:1-99999999999999999999"])
async def test_unusable_ids_get_reset_not_an_error(client, token, bad_id):
    await publish(client, token(), 1)
    response, reader = await open_stream(client, token(), headers={"Last-Event-ID": bad_id})
    reset, snapshot = await reader.events(2)
    assert (reset.event, snapshot.event) == ("sync.reset", "sync.snapshot")
    response.close()


@pytest.mark.parametrize("entry", ["99999999999999-0", "99999999999999999999-0"])
async def test_future_id_of_this_epoch_gets_reset(client, token, entry):
    [published] = await publish(client, token(), 1)
    epoch = published["id"].split(":")[0]
    response, reader = await open_stream(
        client, token(), headers={"Last-Event-ID": f"{epoch}:{entry}"})
    assert (await reader.next()).event == "sync.reset"
    response.close()
    # Only that client: the log kept its epoch, and a true id still resumes.
    [later] = await publish(client, token(), 1)
    response, reader = await open_stream(client, token(), headers={"Last-Event-ID": published["id"]})
    assert (await reader.next()).id == later["id"]
    response.close()


async def test_two_streams_see_the_same_ids_in_the_same_order(client, token):
    one, reader_one = await open_stream(client, token("a"))
    two, reader_two = await open_stream(client, token("b"))
    await reader_one.next(), await reader_two.next()
    await client.post(f"{BASE}/presence/join", headers=auth(token("c")))
    await publish(client, token(), 5)
    first = [e.envelope for e in await reader_one.events(6)]
    second = [e.envelope for e in await reader_two.events(6)]
    assert first == second
    one.close(), two.close()


async def test_client_that_stops_reading_is_cut_off_and_can_resume(app_factory, settings, token):
    client = await app_factory(replace(settings, send_buffer=8))
    gateway = client.app[GATEWAY]
    response, reader = await open_stream(client, token())
    snapshot = await reader.next()
    blob = "x" * 60_000
    # Far more than the socket buffers hold while the client reads nothing.
    for i in range(400):
        await gateway.broker.append(KEY, "doc.updated", {"type": "service", "id": "t"},
                                    {"n": i, "blob": blob})
        await asyncio.sleep(0)
    for _ in range(100):
        if not gateway.hub.subscribers():
            break
        await asyncio.sleep(0.05)
    assert gateway.hub.subscribers() == []  # the slow client was dropped, nobody else is affected
    got = await reader.until_eof(timeout=5)
    assert reader.aborted
    assert len(got) < 400
    last_seen = got[-1].id if got else snapshot.id
    response.close()
    resumed, resumed_reader = await open_stream(client, token(),
                                                headers={"Last-Event-ID": last_seen})
    rest = await resumed_reader.events(400 - len(got), timeout=10)
    assert [e.envelope["data"]["n"] for e in rest] == list(range(len(got), 400))
    resumed.close()


async def test_draining_ends_streams_with_a_jittered_retry(client, token):
    response, reader = await open_stream(client, token())
    await reader.next()
    gateway = client.app[GATEWAY]
    gateway.draining = True
    gateway.hub.close_all("drain")
    hint = await reader.block()
    assert hint.startswith(b"retry: ")
    assert 3000 <= int(hint.split(b" ")[1]) <= 9000
    assert await reader.until_eof() == []
    assert (await client.get("/readyz")).status == 503
    assert (await client.get(STREAM, headers=auth(token()))).status == 503


async def test_a_drain_while_a_stream_opens_still_answers_a_well_formed_stream(
    client, token, monkeypatch
):
    """The node drains between the stream's subscription and its headers: the client gets
    the headers, then the jittered retry hint, then the end (no bytes before the headers)."""
    from gateway.core import Gateway

    stream_opened = Gateway.stream_opened

    async def draining_meanwhile(self, identity, workspace):
        self.hub.close_all("drain")
        await stream_opened(self, identity, workspace)

    monkeypatch.setattr(Gateway, "stream_opened", draining_meanwhile)
    response, reader = await open_stream(client, token())
    assert response.headers["Content-Type"] == "text/event-stream"
    blocks = []
    while (block := await reader.block()) is not None:
        blocks.append(block)
    assert blocks[-1].startswith(b"retry: ")
    assert 3000 <= int(blocks[-1].split(b" ")[1]) <= 9000
    assert not reader.aborted


def test_encode_envelope_is_cached_per_event(client):
    from gateway.transports import SSE_CHUNKED
    from protocol.envelope import Envelope

    envelope = Envelope("e:1-0", "doc.updated", ORG, WORKSPACE, {}, {}, "t")
    first = SSE_CHUNKED.encoded(envelope)
    assert first == b"%x\r\n%b\r\n" % (len(encode_envelope(envelope)), encode_envelope(envelope))
    assert SSE_CHUNKED.encoded(envelope) is first


async def test_timeout_wins_over_a_later_token_expiry(client, token, clock):
    response, reader = await open_stream(client, token(ttl=55), query="?timeout=60")
    await reader.next()
    clock.advance(60.5)  # token (55 s + 10 s leeway) is still valid: this is the timeout
    assert await reader.until_eof() == []
    assert not reader.aborted


async def test_non_utf8_last_event_id_gets_a_clean_reset(client, token):
    """Raw header bytes that are not UTF-8 must not break the response framing."""
    host = client.server.host
    reader, writer, received = await raw_stream(client, (
        f"GET {STREAM} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token()}\r\n".encode()
        + b"Last-Event-ID: \xff\xfex\r\n\r\n"))
    writer.close()
    assert received.startswith(b"HTTP/1.1 200")
    assert received.count(b"HTTP/1.1") == 1
    assert b"event: sync.reset" in received


async def test_an_http_1_0_client_gets_the_stream_unchunked_until_it_ends(client, token, clock):
    """HTTP/1.0 has no chunked encoding: the same events, as plain bytes, and the end of
    the stream is the end of the connection."""
    host = client.server.host
    reader, writer, received = await raw_stream(client, (
        f"GET {STREAM}?timeout=60 HTTP/1.0\r\nHost: {host}\r\n"
        f"Authorization: Bearer {token()}\r\n\r\n").encode())
    [published] = await publish(client, token(), 1)
    clock.advance(61)
    async with asyncio.timeout(5):
        received += await reader.read()  # to the end of the connection
    writer.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"Transfer-Encoding" not in head
    assert b"text/event-stream" in head
    assert body.startswith(b"retry: 3000\n\nid: ")
    events = [parse_block(block + b"\n\n") for block in body.split(b"\n\n")[1:-1]]
    assert [e.event for e in events] == ["sync.snapshot", "doc.updated"]
    assert events[1].id == published["id"]


async def test_slow_consumer_is_counted(app_factory, settings, token):
    client = await app_factory(replace(settings, send_buffer=4))
    gateway = client.app[GATEWAY]
    response, reader = await open_stream(client, token())
    await reader.next()
    for i in range(400):
        await gateway.broker.append(KEY, "doc.updated", {"type": "service", "id": "t"},
                                    {"n": i, "blob": "x" * 60_000})
        await asyncio.sleep(0)
    await reader.until_eof(timeout=5)
    text = await (await client.get("/metrics")).text()
    assert 'gateway_slow_consumer_disconnects_total{transport="sse"} 1.0' in text
    response.close()


async def test_long_last_event_id_in_the_query_is_a_reset_like_the_header(client, token):
    response, reader = await open_stream(client, token(), query=f"?last_event_id={'x' * 1000}")
    assert (await reader.next()).event == "sync.reset"
    response.close()


@pytest.mark.parametrize("entry", ["99999999999999999999-0", "1-99999999999999999999"])
async def test_an_id_beyond_64_bits_is_a_reset_on_every_backend(app_factory, settings, backend_name,
                                                                 clock, token, entry):
    # On Redis such an id once reached XRANGE and answered 500 with a traceback.
    client = await app_factory(settings, broker=make_broker(backend_name, settings, clock))
    [published] = await publish(client, token(), 1)
    epoch = published["id"].split(":")[0]
    response, reader = await open_stream(client, token(), headers={"Last-Event-ID": f"{epoch}:{entry}"})
    assert response.status == 200
    reset, snapshot = await reader.events(2)
    assert (reset.event, snapshot.event) == ("sync.reset", "sync.snapshot")
    response.close()
