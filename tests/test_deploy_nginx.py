"""deploy/ works as shipped, in front of a real gateway process and through the real nginx (the
test command installs it): SSE unbuffered; ?ticket= kept out of every shipped access log;
bodies answered with the gateway's JSON error envelope, never an HTML page; /metrics not public.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from http.client import HTTPConnection
from pathlib import Path

import pytest

from gateway.auth import mint_token
from tests.nginx import nginx_in
from tests.processes import ROOT, free_port, http, serve

SECRET = "nginx-secret-" + "n" * 30
# Teardown need not wait for load balancers: there are none in front of these test nodes.
NO_DELAY = {"GATEWAY_SHUTDOWN_DELAY": "0"}
MAX_EVENT_BYTES = 65_536  # the gateway's default --max-event-bytes
ENVELOPE_KEYS = {"error", "message", "details", "timestamp", "status_code"}
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}$")  # the gateway's format


@pytest.fixture
def nginx(tmp_path: Path):
    """``nginx(upstream_port, log_format=None)``: the shipped config in front of one node."""
    with nginx_in(tmp_path) as servers:
        yield servers.start


def test_sse_through_nginx_is_unbuffered_and_tickets_are_not_logged(nginx, tmp_path):
    token = subprocess.run(
        [sys.executable, "-m", "gateway", "token", "--sub", "u1", "--org", "o1", "--workspace", "w1",
         "--jwt-secret", SECRET], capture_output=True, text=True, cwd=ROOT, check=True,
        timeout=30).stdout.strip()
    with serve("--jwt-secret", SECRET, env=NO_DELAY) as (_, gateway_port):
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


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request with the path sent exactly as written (no client-side normalising)."""
    connection = HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.headers), response.read()
    finally:
        connection.close()


def publish(port: int, body: bytes) -> tuple[int, dict[str, str], bytes]:
    token = mint_token(SECRET, sub="svc", org_id="o1", workspaces="*")
    return request(port, "POST", "/v1/orgs/o1/workspaces/w1/sync/events", body,
                   {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})


def assert_envelope(status: int, headers: dict[str, str], body: bytes, error: str) -> dict:
    """The gateway's error envelope, as every client parses it: JSON, never an HTML page."""
    assert headers["Content-Type"].startswith("application/json"), (status, headers, body[:200])
    answer = json.loads(body)
    assert set(answer) == ENVELOPE_KEYS
    assert (answer["error"], answer["status_code"]) == (error, status)
    assert TIMESTAMP.match(answer["timestamp"]), answer["timestamp"]
    return answer


def test_bodies_nginx_lets_through_get_the_gateways_answer_and_larger_ones_its_json_413(nginx):
    with serve("--jwt-secret", SECRET, env=NO_DELAY) as (_, gateway_port):
        port = nginx(gateway_port)
        # 120 KB on the wire, 40 KB of data as the gateway counts it (\u escapes): published.
        escaped = b'{"type":"doc.updated","data":{"text":"' + b"\\u00e9" * 20_000 + b'"}}'
        assert len(escaped) > 100_000
        status, headers, body = publish(port, escaped)
        assert status == 200, body[:300]
        assert json.loads(body)["data"]["text"] == "\u00e9" * 20_000
        # 100 KB of data: over --max-event-bytes, within the gateway's body limit. The
        # gateway's own 413, its limit in the details.
        large = json.dumps({"type": "doc.updated", "data": {"text": "x" * 100_000}}).encode()
        status, headers, body = publish(port, large)
        assert status == 413
        answer = assert_envelope(status, headers, body, "PAYLOAD_TOO_LARGE")
        assert answer["details"] == {"max_bytes": MAX_EVENT_BYTES}
        direct = publish(gateway_port, large)
        assert direct[0] == 413 and json.loads(direct[2])["details"] == answer["details"]
        # Over any body the gateway would read: nginx refuses it, with the same envelope.
        huge = json.dumps({"type": "doc.updated", "data": {"text": "x" * 600_000}}).encode()
        status, headers, body = publish(port, huge)
        assert status == 413
        answer = assert_envelope(status, headers, body, "PAYLOAD_TOO_LARGE")
        assert answer["details"] == {"max_bytes": MAX_EVENT_BYTES}
        assert answer["message"] == json.loads(direct[2])["message"]


def test_no_node_answering_gets_the_gateways_503_not_an_html_page(nginx):
    port = nginx(free_port())  # every node down: nothing listens there
    for path in ("/v1/orgs/o1/workspaces/w1/sync/presence", "/v1/orgs/o1/workspaces/w1/sync/stream"):
        status, headers, body = request(port, "GET", path)
        assert status == 503
        assert_envelope(status, headers, body, "SERVICE_UNAVAILABLE")
        assert headers["Retry-After"] == "1"


METRICS_SPELLINGS = ["/metrics", "/metrics?format=text", "//metrics", "/%6Detrics", "/./metrics",
                     "/healthz/../metrics", "/metrics/", "/metrics;x"]


def test_metrics_are_scraped_on_the_node_and_not_served_through_nginx(nginx):
    with serve("--jwt-secret", SECRET, env=NO_DELAY) as (_, gateway_port):
        port = nginx(gateway_port)
        status, _, body = request(gateway_port, "GET", "/metrics")  # where Prometheus scrapes
        assert status == 200 and b"# TYPE" in body
        for path in METRICS_SPELLINGS:
            for method in ("GET", "HEAD"):
                status, headers, body = request(port, method, path)
                assert status == 404, (method, path, status)
                assert b"# TYPE" not in body and b"<html" not in body.lower()
            status, headers, body = request(port, "GET", path)
            assert_envelope(status, headers, body, "RESOURCE_NOT_FOUND")
        # Everything else still goes through.
        assert request(port, "GET", "/healthz")[0] == 200


def shipped_log_formats() -> dict[str, str]:
    """Every access-log format deploy/ ships: nginx ``log_format`` directives and the
    ingress-nginx ``log-format-upstream`` setting, by where they are."""
    formats: dict[str, str] = {}
    for path in sorted((ROOT / "deploy").rglob("*")):
        if not path.is_file():
            continue
        text = path.read_text()
        name = path.relative_to(ROOT).as_posix()
        for found in re.finditer(r"log_format\s+(\S+)\s+((?:'[^']*'\s*)+);", text):
            formats[f"{name}:{found[1]}"] = "".join(re.findall(r"'([^']*)'", found[2]))
        for found in re.finditer(r"log-format-upstream:\s*'([^']*)'", text):
            formats[f"{name}:log-format-upstream"] = found[1]
    return formats


def test_deploy_ships_the_log_formats_tested_here():
    assert set(shipped_log_formats()) == {"deploy/nginx/nginx.conf:sync",
                                          "deploy/k8s/ingress-nginx-config.yaml:log-format-upstream"}


@pytest.mark.parametrize("where", sorted(shipped_log_formats()))
def test_no_shipped_access_log_records_a_ticket(nginx, tmp_path, where):
    log_format = shipped_log_formats()[where]
    with serve("--jwt-secret", SECRET, env=NO_DELAY) as (_, gateway_port):
        port = nginx(gateway_port, log_format=log_format)
        token = mint_token(SECRET, sub="u1", org_id="o1", workspaces="*")
        base = "/v1/orgs/o1/workspaces/w1/sync"
        status, _, body = request(port, "POST", f"{base}/tickets",
                                  headers={"Authorization": f"Bearer {token}"})
        ticket = json.loads(body)["ticket"]
        status, _, _ = request(port, "GET", f"{base}/stream?ticket={ticket}&timeout=abc")
        assert status == 422  # refused before the stream opens; the ticket stays unused
        request(port, "GET", f"{base}/presence?ticket={ticket}")
    log = (tmp_path / "access.log").read_text()
    assert f"{base}/stream" in log and f"{base}/presence" in log
    assert ticket not in log and "ticket=" not in log and token not in log


def test_the_ingress_exposes_only_the_api_and_keeps_its_own_log_off():
    """ingress-nginx logs the whole request line (``?ticket=``) unless told otherwise, and would
    route /metrics with everything else."""
    manifest = (ROOT / "deploy/k8s/gateway.yaml").read_text()
    ingress = manifest[manifest.index("kind: Ingress"):]
    assert 'nginx.ingress.kubernetes.io/enable-access-log: "false"' in ingress
    paths = re.findall(r"path: (\S+),", ingress)
    assert paths == ["/v1"], paths
