"""Arbitrary frames at a live socket: every frame gets exactly one answer, in order,
the socket stays open, and the node keeps serving."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.app import create_app
from gateway.auth import mint_token
from gateway.config import Settings
from protocol.codecs import JSON, MSGPACK
from protocol.ws import reference_of
from tests.conftest import ORG, SECRET, WORKSPACE

ENCODINGS = {"mm-sync.v1.json": JSON, "mm-sync.v1.msgpack": MSGPACK}


@pytest.fixture(scope="module")
def live_url() -> Iterator[str]:
    """A gateway on a real socket, in a thread with its own event loop."""
    node = Settings(jwt_secret=SECRET, node_id="fuzz", ws_rate_burst=100_000,
                    ws_rate_limit=100_000.0, ws_max_message_bytes=16_384, keepalive=30.0)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, Any] = {}

    async def start() -> None:
        runner = web.AppRunner(create_app(node))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        holder["runner"] = runner
        holder["port"] = runner.addresses[0][1]
        started.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    assert started.wait(10)
    yield f"http://127.0.0.1:{holder['port']}"
    asyncio.run_coroutine_threadsafe(holder["runner"].cleanup(), loop).result(timeout=20)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)


names = st.sampled_from([ORG, WORKSPACE, "other", "", "x" * 300])
# what a msgpack client can send at all (JSON-only huge integers: see test_ws.py)
ints = st.integers(-(2**63), 2**64 - 1)
messages = st.fixed_dictionaries(
    {"op": st.sampled_from(["auth", "subscribe", "unsubscribe", "join", "leave", "viewing",
                            "publish", "ping", "nope", ""])},
    optional={
        "ref": st.one_of(ints, st.text(max_size=8), st.none(),
                         st.booleans(), st.sampled_from([2**53 + 1, "r" * 129])),
        "org_id": st.one_of(names, ints),
        "workspace_id": st.one_of(names, ints),
        "since": st.one_of(st.text(max_size=20), ints),
        "resource_type": st.one_of(names, st.none()),
        "resource_id": st.one_of(names, st.none()),
        "type": st.sampled_from(["doc.fuzzed", "sync.bad", "Nope", 3]),
        "data": st.one_of(st.dictionaries(st.text(max_size=4),
                                          ints | st.text(max_size=5),
                                          max_size=3), st.lists(ints, max_size=2)),
        "token": st.text(max_size=20),
    },
)
frames = st.one_of(
    st.binary(max_size=512).map(lambda b: ("bytes", b)),
    st.text(max_size=256).map(lambda t: ("text", t)),
    messages.map(lambda m: ("message", m)),
)


async def exchange(url: str, subprotocol: str, batch: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    codec = ENCODINGS[subprotocol]
    token = mint_token(SECRET, sub="fuzzer", org_id=ORG, workspaces=[WORKSPACE], ttl=600)
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"{url}/v1/sync/ws", protocols=(subprotocol,),
                                      headers={"Authorization": f"Bearer {token}"})
        for kind, value in batch:
            if kind == "bytes":
                await ws.send_bytes(value)
            elif kind == "text":
                await ws.send_str(value)
            else:
                encoded = codec.encode(value)
                await (ws.send_str(encoded.decode()) if codec is JSON else ws.send_bytes(encoded))
        final = codec.encode({"op": "ping", "ref": "final"})
        await (ws.send_str(final.decode()) if codec is JSON else ws.send_bytes(final))
        answers: list[dict[str, Any]] = []
        async with asyncio.timeout(10):
            while True:
                message = await ws.receive()
                assert message.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY), (
                    message.type, message.extra)
                raw = message.data.encode() if isinstance(message.data, str) else message.data
                decoded = codec.decode(raw)
                assert decoded["op"] in ("reply", "error", "pong", "event"), decoded
                if decoded["op"] == "event":
                    continue
                answers.append(decoded)
                if decoded == {"op": "pong", "ref": "final"}:
                    break
        await ws.close()
        return answers


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(frames, min_size=1, max_size=12),
       st.sampled_from(sorted(ENCODINGS)))
def test_arbitrary_frames_at_a_live_socket(live_url: str, batch: list[tuple[str, Any]],
                                           subprotocol: str) -> None:
    answers = asyncio.run(exchange(live_url, subprotocol, batch))
    assert len(answers) == len(batch) + 1  # one answer per frame, and the final pong
    for answer in answers:
        if answer["op"] == "error":
            error = answer["error"]
            assert set(error) in ({"detail"}, {"error", "message", "details", "timestamp",
                                               "status_code"}), error
            assert error.get("status_code") != 500, error
    # answers come in the order of the frames, echoing every ref the docs say is echoed
    for (kind, value), answer in zip(batch, answers, strict=False):
        if kind == "message":
            assert answer["ref"] == reference_of(value)


def test_the_node_still_serves_after_the_fuzzing(live_url: str) -> None:
    started = time.monotonic()
    answers = asyncio.run(exchange(live_url, "mm-sync.v1.json",
                                   [("message", {"op": "subscribe", "org_id": ORG,
                                                 "workspace_id": WORKSPACE, "ref": 1})]))
    assert answers[0]["op"] == "reply" and answers[0]["ref"] == 1
    assert time.monotonic() - started < 10
