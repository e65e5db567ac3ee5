"""Idempotent publishing as a publisher sees it (SPEC §8): ``Idempotency-Key`` on
``POST .../events`` and ``idempotency_key`` on the WebSocket ``publish`` op.

A retry with the same key answers the original envelope and appends nothing, whichever
transport and node it comes through; a malformed key is a 422 naming the header."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.broker import tail
from gateway.handlers.common import GATEWAY
from protocol.envelope import EventId, WorkspaceKey
from tests.conftest import BASE, ORG, WORKSPACE, auth
from tests.wsclient import connect

HERE = WorkspaceKey(ORG, WORKSPACE)


async def post(client: TestClient, token: str, key: str | None, **data: Any) -> tuple[int, Any]:
    headers = auth(token)
    if key is not None:
        headers["Idempotency-Key"] = key
    response = await client.post(f"{BASE}/events", headers=headers,
                                 json={"type": "doc.updated", "data": data})
    return response.status, await response.json()


async def log_after(client: TestClient, position: str) -> list[dict[str, Any]]:
    """Every event the workspace log holds after ``position`` (what any subscriber gets)."""
    broker = client.app[GATEWAY].broker
    return [envelope.to_dict()
            for envelope in await broker.read_after(HERE, EventId.parse(position), 1000)]


async def start(client: TestClient) -> str:
    return str((await client.app[GATEWAY].broker.presence_snapshot(HERE)).position)


async def test_a_rest_retry_answers_the_original_envelope(client: TestClient,
                                                           token: Callable[..., str]) -> None:
    position = await start(client)
    status, first = await post(client, token(), "order-17/attempt", n=1)
    assert status == 200
    status, again = await post(client, token(), "order-17/attempt", n=1)
    assert (status, again) == (200, first)
    assert await log_after(client, position) == [first]


async def test_concurrent_rest_retries_append_once(client: TestClient,
                                                   token: Callable[..., str]) -> None:
    position = await start(client)
    answers = await asyncio.gather(*(post(client, token(), "same", n=n) for n in range(10)))
    assert {status for status, _ in answers} == {200}
    assert len({body["id"] for _, body in answers}) == 1
    assert await log_after(client, position) == [answers[0][1]]


async def test_rest_and_websocket_share_the_key(client: TestClient,
                                                token: Callable[..., str]) -> None:
    position = await start(client)
    _, first = await post(client, token(), "k1", n=1)
    peer = await connect(client, token=token())
    answer = await peer.request("publish", org_id=ORG, workspace_id=WORKSPACE,
                                type="doc.updated", data={"n": 2}, idempotency_key="k1")
    assert answer["op"] == "reply" and answer["data"] == first
    fresh = await peer.request("publish", org_id=ORG, workspace_id=WORKSPACE,
                               type="doc.updated", data={"n": 3}, idempotency_key="k2")
    again = await peer.request("publish", org_id=ORG, workspace_id=WORKSPACE,
                               type="doc.updated", data={"n": 3}, idempotency_key="k2")
    assert again["data"] == fresh["data"] != first
    await peer.close()
    assert await log_after(client, position) == [first, fresh["data"]]


async def test_the_retried_event_is_delivered_once(client: TestClient,
                                                   token: Callable[..., str]) -> None:
    broker = client.app[GATEWAY].broker
    position = EventId.parse(await start(client))
    delivered: list[str] = []

    async def follow() -> None:
        async for batch in tail(broker, HERE, position):
            delivered.extend(envelope.id for envelope in batch)

    follower = asyncio.create_task(follow())
    _, first = await post(client, token(), "once")
    await post(client, token(), "once")
    _, last = await post(client, token(), None)
    async with asyncio.timeout(5):
        while len(delivered) < 2:  # noqa: ASYNC110 (filled by the follower task)
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    follower.cancel()
    assert delivered == [first["id"], last["id"]]


@pytest.mark.parametrize(("key", "kind"), [
    ("", "string_too_short"),
    ("k" * 129, "string_too_long"),
    ("tab\there", "string_pattern_mismatch"),
    ("caf\u00e9", "string_pattern_mismatch"),
])
async def test_a_malformed_rest_key_is_422_naming_the_header(
    client: TestClient, token: Callable[..., str], key: str, kind: str
) -> None:
    position = await start(client)
    headers = {**auth(token()), "Idempotency-Key": key}
    response = await client.post(f"{BASE}/events", headers=headers,
                                 json={"type": "doc.updated", "data": {}})
    assert response.status == 422
    detail = (await response.json())["detail"]
    assert [(item["loc"], item["type"]) for item in detail] == [(["header", "idempotency-key"], kind)]
    assert await log_after(client, position) == []


async def test_a_key_of_128_printable_characters_is_accepted(client: TestClient,
                                                            token: Callable[..., str]) -> None:
    key = "".join(chr(32 + n % 95) for n in range(128))
    status, first = await post(client, token(), key)
    assert status == 200
    assert await post(client, token(), key) == (200, first)


async def test_a_malformed_websocket_key_is_a_422_error(client: TestClient,
                                                        token: Callable[..., str]) -> None:
    peer = await connect(client, token=token())
    answer = await peer.request("publish", org_id=ORG, workspace_id=WORKSPACE,
                                type="doc.updated", data={}, idempotency_key="x" * 129)
    assert answer["op"] == "error"
    assert [item["loc"] for item in answer["error"]["detail"]] == [["body", "idempotency_key"]]
    assert (await peer.request("ping"))["op"] == "pong"  # the socket stays open
    await peer.close()
