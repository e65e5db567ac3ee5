"""SIGTERM on a real ``serve`` process: not ready first, still serving for the shutdown delay,
then every client handed back and the process gone.

A load balancer only stops sending traffic after it has seen ``/readyz`` fail (or, on
Kubernetes, after the endpoint removal has spread); a node that stopped listening before that
would refuse the requests still on their way.
"""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp

from gateway.auth import mint_token
from tests.processes import serve

SECRET = "shutdown-secret-" + "s" * 30
BASE = "/v1/orgs/o1/workspaces/w1/sync"
DELAY = 2.5  # short for the test; the default is in gateway/config.py
GRACE = 10.0  # the drain after the delay: sockets' close handshakes, the backend's close


def auth(sub: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(SECRET, sub=sub, org_id='o1', workspaces='*')}"}


class Stream:
    """An SSE stream read in the background: the event types and ``retry:`` hints it got."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.events: list[str] = []
        self.retries: list[str] = []
        self.ended_at: float | None = None
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.response.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    self.events.append(line.removeprefix("event: "))
                elif line.startswith("retry: "):
                    self.retries.append(line.removeprefix("retry: "))
        except (aiohttp.ClientError, OSError):
            pass
        finally:
            self.ended_at = time.monotonic()

    async def wait_for(self, event_type: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while event_type not in self.events:
            assert time.monotonic() < deadline, f"no {event_type} in {self.events}"
            await asyncio.sleep(0.02)


async def open_stream(session: aiohttp.ClientSession, url: str) -> Stream:
    response = await session.get(f"{url}{BASE}/stream", headers=auth("reader"),
                                 timeout=aiohttp.ClientTimeout(total=None, sock_read=None))
    assert response.status == 200, await response.text()
    stream = Stream(response)
    await stream.wait_for("sync.snapshot")
    return stream


async def test_sigterm_answers_not_ready_but_keeps_serving_for_the_delay_then_exits() -> None:
    # The delay comes from the environment, as the deploy files set it.
    with serve("--jwt-secret", SECRET, env={"GATEWAY_SHUTDOWN_DELAY": str(DELAY)}) as (process, port):
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            before = await open_stream(session, url)
            process.send_signal(signal.SIGTERM)
            sent = time.monotonic()

            # Not ready at once: the load balancer stops sending new clients ...
            while True:
                async with session.get(f"{url}/readyz") as response:
                    if response.status == 503:
                        assert (await response.json())["error"] == "SERVICE_UNAVAILABLE"
                        break
                assert time.monotonic() - sent < 1.0, "/readyz still 200 a second after SIGTERM"
                await asyncio.sleep(0.02)

            # ... while everything on its way still gets served: new streams, writes, and the
            # streams already open, which keep their events.
            async with session.get(f"{url}/healthz") as response:
                assert response.status == 200
            after = await open_stream(session, url)
            socket = await session.ws_connect(f"{url}/v1/sync/ws", protocols=["mm-sync.v1.json"])
            await socket.send_json({"op": "auth", "ref": 1, "token": auth("ws")["Authorization"][7:]})
            assert (await socket.receive_json(timeout=5))["op"] == "reply"
            closing = asyncio.create_task(socket.receive())  # read as a client does
            async with session.post(f"{url}{BASE}/presence/join", headers=auth("late")) as response:
                assert response.status == 200
                # Keep-alive connections are retired, so none is left to break at the close.
                assert response.headers["Connection"] == "close"
            async with session.post(f"{url}{BASE}/events", headers=auth("late"),
                                    json={"type": "doc.updated", "data": {}}) as response:
                assert response.status == 200
            await before.wait_for("doc.updated")
            await after.wait_for("doc.updated")
            assert time.monotonic() - sent < DELAY, "the test ran too slowly to check the delay"
            assert before.ended_at is None and after.ended_at is None and not closing.done()
            async with session.get(f"{url}/readyz") as response:
                assert response.status == 503

            # Then the drain: every stream is handed back with a reconnect hint, and the
            # process exits cleanly.
            code = await asyncio.to_thread(process.wait, DELAY + GRACE)
            exited = time.monotonic()
            assert code == 0
            for stream in (before, after):
                await asyncio.wait_for(stream.task, 5)
                assert stream.ended_at is not None and stream.ended_at >= sent + DELAY - 0.1
                assert len(stream.retries) == 2 and int(stream.retries[-1]) >= 3000  # the hand-back hint
            assert exited - sent < DELAY + GRACE
            assert (await closing).type == aiohttp.WSMsgType.CLOSE
            assert socket.close_code == 1012  # service restart: reconnect elsewhere


async def test_a_second_sigterm_does_not_cut_the_delay_short_and_sigint_does() -> None:
    """A repeated SIGTERM (an impatient supervisor) keeps the delay; Ctrl-C (SIGINT) stops at once."""
    with serve("--jwt-secret", SECRET, env={"GATEWAY_SHUTDOWN_DELAY": "30"}) as (process, port):
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(1.5)  # past the old fixed second
            async with session.get(f"{url}/healthz") as response:
                assert response.status == 200
            async with session.get(f"{url}/readyz") as response:
                assert response.status == 503
            process.send_signal(signal.SIGINT)
            assert await asyncio.to_thread(process.wait, GRACE) == 0
