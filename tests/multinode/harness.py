"""Real processes on loopback: a private redis-server and gateway nodes, plus a small SSE
client. Used by the multi-node tests and by ``bench/bench_cross_node.py``.

Every process is started here and stopped here by its own PID; nothing else is touched.
Every wait is bounded in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from gateway.auth import mint_token
from tests.processes import free_port

ROOT = Path(__file__).resolve().parents[2]
SECRET = "multinode-secret-" + "k" * 32
ORG = "org-1"
WORKSPACE = "ws-1"
BASE = f"/v1/orgs/{ORG}/workspaces/{WORKSPACE}/sync"


def token(sub: str, **extra: Any) -> str:
    return mint_token(SECRET, sub=sub, org_id=ORG, workspaces="*", ttl=3600, extra=extra)


def auth(sub: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(sub)}"}


def _tail(path: Path, lines: int = 40) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


class RedisServer:
    """A private redis-server on a free port; ``persist`` keeps data across a kill (AOF,
    fsync always), otherwise a restart comes back empty."""

    def __init__(self, directory: Path, *, persist: bool) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.persist = persist
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log"),
                "--daemonize", "no"]
        args += ["--appendonly", "yes", "--appendfsync", "always"] if self.persist else [
            "--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.port), timeout=0.5
            ) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start:\n{_tail(self.dir / 'redis.log')}")

    def kill(self) -> None:
        """SIGKILL: no shutdown save."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


@dataclass
class Node:
    """One ``python -m gateway serve`` process."""

    name: str
    redis_url: str
    directory: Path
    node_timeout: float = 3.0
    disconnect_grace: float = 2.0
    extra: tuple[str, ...] = ()
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.directory / f"{self.name}.log"

    def start(self) -> None:
        args = [
            sys.executable, "-m", "gateway", "serve",
            "--host", "127.0.0.1", "--port", str(self.port), "--redis-url", self.redis_url,
            "--node-id", self.name, "--jwt-secret", SECRET,
            "--node-timeout", str(self.node_timeout), "--disconnect-grace", str(self.disconnect_grace),
            "--sweep-interval", "0.2", "--log-format", "text", *self.extra,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=log)

    async def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.proc is None or self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited:\n{_tail(self.log_path)}")
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with session.get(f"{self.url}/readyz", timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status == 200:
                            return
                await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready in {timeout}s:\n{_tail(self.log_path)}")

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # in case a test left it stopped
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def logs(self) -> str:
        return _tail(self.log_path, 60)


@dataclass
class Event:
    id: str | None
    type: str | None
    data: dict[str, Any] | None


class Stream:
    """An SSE subscription read in the background; events and ``retry:`` hints collected."""

    def __init__(self, session: aiohttp.ClientSession, node: Node, user: str,
                 last_event_id: str | None = None) -> None:
        self.session, self.node, self.user = session, node, user
        self.last_event_id = last_event_id
        self.events: list[Event] = []
        self.retries: list[int] = []
        self.ended = False
        self.arrived: list[float] = []  # time.perf_counter() at each event
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.response: aiohttp.ClientResponse | None = None

    async def open(self) -> Stream:
        headers = auth(self.user)
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        self.response = await self.session.get(
            f"{self.node.url}{BASE}/stream", headers=headers,
            timeout=aiohttp.ClientTimeout(total=None, sock_read=None, sock_connect=5),
        )
        if self.response.status != 200:
            raise RuntimeError(f"stream on {self.node.name}: {self.response.status}")
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.response is not None
        current: dict[str, str] = {}
        try:
            async for raw in self.response.content:
                line = raw.decode().rstrip("\r\n")
                if not line:
                    if "data" in current or "event" in current:
                        data = json.loads(current["data"]) if "data" in current else None
                        self.events.append(Event(current.get("id"), current.get("event"), data))
                        self.arrived.append(time.perf_counter())
                        self._changed.set()
                    current = {}
                    continue
                if line.startswith(":"):
                    continue
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "retry":
                    self.retries.append(int(value))
                    self._changed.set()
                else:
                    current[name] = value
        except (aiohttp.ClientError, OSError):
            pass
        finally:
            self.ended = True
            self._changed.set()

    async def wait_for(self, predicate: Callable[[Stream], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out on {self.node.name}: {self.summary()}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))

    def of_type(self, *types: str) -> list[Event]:
        return [event for event in self.events if event.type in types]

    def presence(self) -> list[tuple[str, str]]:
        """(type, user) of every presence event received."""
        return [(e.type or "", (e.data or {}).get("data", {}).get("user_id", ""))
                for e in self.of_type("presence.joined", "presence.left")]

    def summary(self) -> str:
        return str([(e.type, e.id) for e in self.events][-20:]) + f" ended={self.ended}"

    async def close(self) -> None:
        if self.response is not None:
            self.response.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def call(session: aiohttp.ClientSession, method: str, url: str, user: str,
               **kwargs: Any) -> tuple[int, Any]:
    async with session.request(method, url, headers=auth(user),
                               timeout=aiohttp.ClientTimeout(total=10), **kwargs) as response:
        body = await response.json(content_type=None)
        return response.status, body


async def members(session: aiohttp.ClientSession, node: Node, user: str = "observer") -> list[str]:
    status, body = await call(session, "GET", f"{node.url}{BASE}/presence", user)
    assert status == 200, body
    return [member["user_id"] for member in body["members"]]


async def eventually(check: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Await ``check()`` until it returns a truthy value (returned) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"not true within {timeout}s (last: {last!r})")
