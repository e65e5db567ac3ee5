"""``sync-gateway tail``: live events one JSON envelope a line, over the WebSocket channel."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from gateway.tail import socket_url, tail
from tests.conftest import BASE, ORG, WORKSPACE, auth

ROOT = Path(__file__).resolve().parent.parent


async def publish(client: TestClient, token: str, event_type: str, **data: Any) -> dict[str, Any]:
    response = await client.post(f"{BASE}/events", headers=auth(token),
                                 json={"type": event_type, "data": data})
    assert response.status == 200
    return dict(await response.json())


async def lines_of(buffer: io.StringIO, count: int) -> list[dict[str, Any]]:
    async with asyncio.timeout(5):
        while len(buffer.getvalue().splitlines()) < count:  # noqa: ASYNC110 (tail writes it)
            await asyncio.sleep(0.01)
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_socket_url() -> None:
    assert socket_url("http://h:8080", "o", "w") == "ws://h:8080/v1/orgs/o/workspaces/w/sync/ws"
    assert socket_url("https://h/base/", "o 1", "w/2", since="e:1-0") == (
        "wss://h/base/v1/orgs/o%201/workspaces/w%2F2/sync/ws?since=e%3A1-0")


async def test_tail_prints_each_event_on_one_line_and_ends_on_drain(
    client: TestClient, token: Callable[..., str]
) -> None:
    out, err = io.StringIO(), io.StringIO()
    url = str(client.make_url("/"))
    task = asyncio.create_task(tail(url, ORG, WORKSPACE, token(), out=out, err=err))
    assert (await lines_of(out, 1))[0]["type"] == "sync.snapshot"
    first = await publish(client, token(), "doc.edited", text="two\nlines")
    second = await publish(client, token(), "doc.saved")
    assert (await lines_of(out, 3))[1:] == [first, second]
    # --since: every event after that id first (nothing twice), then live ones
    resumed = io.StringIO()
    again = asyncio.create_task(tail(url, ORG, WORKSPACE, token(), since=first["id"], out=resumed,
                                     err=io.StringIO()))
    assert await lines_of(resumed, 1) == [second]
    await client.server.app.shutdown()  # drain: the server closes with 1012
    assert await asyncio.wait_for(task, 5) == 0
    assert await asyncio.wait_for(again, 5) == 0
    assert f"closed by the server (1012); resume with --since {second['id']}" in err.getvalue()
    assert len(resumed.getvalue().splitlines()) == 1


async def test_tail_reports_refusals(client: TestClient, token: Callable[..., str]) -> None:
    url = str(client.make_url("/"))
    err = io.StringIO()
    assert await tail(url, ORG, WORKSPACE, "not-a-token", out=io.StringIO(), err=err) == 1
    assert "HTTP 401" in err.getvalue()
    err = io.StringIO()
    assert await tail(url, ORG, "elsewhere", token(), out=io.StringIO(), err=err) == 1
    assert "RESOURCE_NOT_FOUND" in err.getvalue()


async def test_tail_command_runs_and_stops_on_ctrl_c(
    client: TestClient, token: Callable[..., str]
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "tail", "--url", str(client.make_url("/")),
        "--org", ORG, "--workspace", WORKSPACE, "--token", token(),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        async with asyncio.timeout(15):
            snapshot = json.loads(await process.stdout.readline())
            assert snapshot["type"] == "sync.snapshot"
            event = await publish(client, token(), "doc.created", id="d1")
            assert json.loads(await process.stdout.readline()) == event
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(10):
            code = await process.wait()
        assert code == 130
        assert b"Traceback" not in await process.stderr.read()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
