"""No token, ticket or secret ever reaches the logs."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import urllib.request

from gateway.logs import TextFormatter
from tests.processes import ROOT, http, serve

SECRET = "log-secret-" + "q" * 30


def test_logs_never_carry_tokens_tickets_or_secrets():
    token = subprocess.run(
        [sys.executable, "-m", "gateway", "token", "--sub", "u1", "--org", "o1",
         "--workspace", "w1", "--jwt-secret", SECRET],
        capture_output=True, text=True, cwd=ROOT, timeout=30, check=True).stdout.strip()
    expired = subprocess.run(
        [sys.executable, "-m", "gateway", "token", "--sub", "u1", "--org", "o1",
         "--workspace", "w1", "--jwt-secret", SECRET, "--ttl", "-100"],
        capture_output=True, text=True, cwd=ROOT, timeout=30, check=True).stdout.strip()
    base = "/v1/orgs/o1/workspaces/w1/sync"
    with serve("--jwt-secret", SECRET, "--log-level", "DEBUG") as (process, port):
        url = f"http://127.0.0.1:{port}{base}"
        assert http("POST", f"{url}/presence/join", token)[0] == 200
        assert http("POST", f"{url}/presence/join", expired)[0] == 401
        assert http("POST", f"{url}/presence/join", token[:-4] + "AAAA")[0] == 401
        status, body = http("POST", f"{url}/tickets", token)
        ticket = json.loads(body)["ticket"]
        with urllib.request.urlopen(f"{url}/stream?ticket={ticket}", timeout=5) as stream:
            assert stream.status == 200
            stream.readline()
        assert http("GET", f"{url}/stream?ticket={ticket}")[0] == 401  # used
        assert http("GET", f"{url}/stream?token={token}")[0] == 401
    assert process.stderr is not None
    logs = process.stderr.read()
    assert '"path": "/v1/orgs/o1/workspaces/w1/sync/stream"' in logs  # requests were logged
    for secret in (token, expired, ticket, SECRET, token.split(".")[2]):
        assert secret not in logs


def test_a_path_with_a_newline_cannot_forge_a_text_log_line():
    record = logging.makeLogRecord({
        "msg": "request", "levelname": "INFO", "name": "aiohttp.access",
        "path": "/v1/orgs/o/workspaces/w\n2026-01-01 00:00:00 INFO admin granted\r",
        "status": 404,
    })
    line = TextFormatter("%(levelname)s %(name)s %(message)s").format(record)
    assert "\n" not in line and "\r" not in line
    assert line.endswith("path=/v1/orgs/o/workspaces/w\\n2026-01-01 00:00:00 INFO admin granted\\r status=404")
