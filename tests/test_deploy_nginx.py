"""deploy/nginx works as shipped: SSE through it is unbuffered, and ?ticket= stays out of its log.

Runs the real nginx (the test command installs it) in front of a real gateway process.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.processes import ROOT, free_port, http, serve

SECRET = "nginx-secret-" + "n" * 30


@pytest.fixture
def nginx(tmp_path: Path):
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        pytest.skip("nginx is not installed (scripts/test.sh installs it)")

    def start(upstream_port: int) -> int:
        port = free_port()
        conf = (ROOT / "deploy/nginx/nginx.conf").read_text()
        conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{port};")
        conf = conf.replace("access_log /dev/stdout sync;", f"access_log {tmp_path}/access.log sync;")
        (tmp_path / "nginx.conf").write_text(conf)
        (tmp_path / "upstream.conf").write_text(
            f"upstream sync_gateway {{ server 127.0.0.1:{upstream_port}; keepalive 8; }}\n")
        process = subprocess.Popen(
            [binary, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"),
             "-g", f"daemon off; pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        started.append(process)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if http("GET", f"http://127.0.0.1:{port}/healthz")[0] == 200:
                    return port
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"nginx did not start: {(tmp_path / 'error.log').read_text()}")

    started: list[subprocess.Popen[bytes]] = []
    yield start
    for process in started:
        process.send_signal(signal.SIGQUIT)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_sse_through_nginx_is_unbuffered_and_tickets_are_not_logged(nginx, tmp_path):
    token = subprocess.run(
        [sys.executable, "-m", "gateway", "token", "--sub", "u1", "--org", "o1", "--workspace", "w1",
         "--jwt-secret", SECRET], capture_output=True, text=True, cwd=ROOT, check=True,
        timeout=30).stdout.strip()
    with serve("--jwt-secret", SECRET) as (_, gateway_port):
        port = nginx(gateway_port)
        base = f"http://127.0.0.1:{port}/v1/orgs/o1/workspaces/w1/sync"
        ticket = json.loads(http("POST", f"{base}/tickets", token)[1])["ticket"]
        with urllib.request.urlopen(f"{base}/stream?ticket={ticket}", timeout=5) as stream:
            assert stream.headers["Content-Type"] == "text/event-stream"
            assert stream.readline() == b"retry: 3000\n"
            stream.readline()
            assert stream.readline().startswith(b"id: ")
            assert stream.readline() == b"event: sync.snapshot\n"
            stream.readline(), stream.readline()
            sent = time.monotonic()
            request = urllib.request.Request(
                f"{base}/events", method="POST", data=b'{"type":"doc.updated","data":{}}',
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
            urllib.request.urlopen(request, timeout=5).read()
            stream.readline()  # id:
            assert stream.readline() == b"event: doc.updated\n"
            # A buffering proxy would hold a small event back until its buffer fills or the
            # stream ends; through this config it arrives at once.
            assert time.monotonic() - sent < 2.0
    log = (tmp_path / "access.log").read_text()
    assert "/sync/stream" in log
    assert ticket not in log and token not in log
