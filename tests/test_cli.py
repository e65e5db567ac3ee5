"""The commands a newcomer types: ``token`` and ``serve`` (dev mode and configured)."""

from __future__ import annotations

import base64
import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.client import HTTPConnection

import jwt
import pytest

from gateway.auth import mint_token
from gateway.config import Settings, parse_settings
from gateway.origins import origin_allowed
from tests.processes import ROOT, free_port, http, run_cli, serve

# No load balancer in front of these nodes: teardown need not wait (see test_shutdown.py).
NO_DELAY = {"GATEWAY_SHUTDOWN_DELAY": "0"}


def test_token_prints_a_jwt_with_the_claims():
    result = run_cli("token", "--sub", "u1", "--org", "o1", "--workspace", "w1",
                     "--workspace", "w2", "--permission", "sync:read", "--ttl", "600",
                     "--name", "Ursula", "--jwt-secret", "s" * 40)
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), "s" * 40, algorithms=["HS256"])
    assert claims["sub"] == "u1" and claims["org_id"] == "o1"
    assert claims["workspaces"] == ["w1", "w2"]
    assert claims["permissions"] == ["sync:read"]
    assert claims["name"] == "Ursula"
    assert claims["exp"] - claims["iat"] == 600


def test_token_takes_the_secret_from_the_environment_and_star_workspaces():
    result = run_cli("token", "--sub", "u1", "--org", "o1", "--workspace", "*",
                     env={"GATEWAY_JWT_SECRET": "e" * 40})
    claims = jwt.decode(result.stdout.strip(), "e" * 40, algorithms=["HS256"])
    assert claims["workspaces"] == "*"
    assert claims["permissions"] == ["sync:read", "presence:write", "events:publish"]


def test_token_without_a_secret_says_so():
    env = {key: value for key, value in os.environ.items() if key != "GATEWAY_JWT_SECRET"}
    result = subprocess.run([sys.executable, "-m", "gateway", "token", "--sub", "u", "--org", "o",
                             "--workspace", "w"], capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=30)
    assert result.returncode == 2
    assert "--jwt-secret" in result.stderr


def test_serve_refuses_a_bad_setting():
    result = run_cli("serve", "--jwt-algorithm", "none")
    assert result.returncode == 2
    assert "jwt_algorithm" in result.stderr


def test_dev_mode_prints_a_working_token_and_examples():
    with serve(env=NO_DELAY) as (process, port):
        assert process.stderr is not None
        banner = ""
        deadline = time.monotonic() + 10
        while "export TOKEN=" not in banner and time.monotonic() < deadline:
            banner += process.stderr.readline()
        while "curl -X POST" not in banner.split("export TOKEN=")[-1] and time.monotonic() < deadline:
            banner += process.stderr.readline()
        assert "DEV MODE" in banner
        token = re.search(r"export TOKEN=(\S+)", banner)[1]  # type: ignore[index]
        assert f"http://127.0.0.1:{port}/v1/orgs/demo/workspaces/lobby/sync/stream" in banner
        base = f"http://127.0.0.1:{port}/v1/orgs/demo/workspaces/lobby/sync"
        assert http("POST", f"{base}/presence/join", token)[0] == 200
        status, body = http("GET", f"{base}/presence", token)
        assert status == 200 and b'"dev-user"' in body
        assert http("POST", f"{base}/presence/join", "forged")[0] == 401


def assert_a_minted_token_joins(port: int, secret: str) -> None:
    token = run_cli("token", "--sub", "u1", "--org", "o1", "--workspace", "w1",
                    "--jwt-secret", secret).stdout.strip()
    status, _ = http("POST", f"http://127.0.0.1:{port}/v1/orgs/o1/workspaces/w1/sync/presence/join",
                     token)
    assert status == 200


def test_configured_serve_from_environment_variables():
    secret = "c" * 40
    with serve(env={"GATEWAY_JWT_SECRET": secret, **NO_DELAY}) as (process, port):
        assert_a_minted_token_joins(port, secret)
    assert process.stderr is not None
    assert "DEV MODE" not in process.stderr.read()


def test_serve_refuses_unusable_jwt_keys(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = tmp_path / "private.pem"
    private_pem.write_bytes(private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    ec_public = tmp_path / "ec.pem"
    ec_public.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    cases = [
        (private_pem, "RS256", "is not a PEM public key"),
        (garbage, "RS256", "is not a PEM public key"),
        (tmp_path / "missing.pem", "RS256", "cannot read"),
        (ec_public, "RS256", "is not an RSA public key"),
    ]
    for path, algorithm, message in cases:
        result = run_cli("serve", "--port", str(free_port()), "--jwt-algorithm", algorithm,
                         "--jwt-public-key-file", str(path))
        assert result.returncode == 2, (path, result.stderr[-500:])
        assert message in result.stderr
        assert "Traceback" not in result.stderr


def test_serve_refuses_an_unknown_log_level():
    result = run_cli("serve", "--log-level", "chatty")
    assert result.returncode == 2
    assert "log_level" in result.stderr


def test_every_setting_reads_its_environment_variable_and_flags_win():
    from gateway.config import parse_settings

    environ = {"GATEWAY_PRESENCE_TTL": "45", "GATEWAY_PORT": "9001",
               "GATEWAY_ALLOWED_ORIGINS": "https://a.example, https://b.example/",
               "GATEWAY_REDIS_URL": "redis://127.0.0.1:1/0"}
    settings = parse_settings(["--port", "9002"], environ)
    assert settings.presence_ttl == 45.0
    assert settings.port == 9002
    assert settings.allowed_origins == ("https://a.example", "https://b.example")
    assert settings.redis_url == "redis://127.0.0.1:1/0"


def _without_secrets() -> dict[str, str]:
    return {key: value for key, value in os.environ.items()
            if key not in ("GATEWAY_JWT_SECRET", "GATEWAY_JWT_PUBLIC_KEY_FILE", "GATEWAY_DEV",
                           "GATEWAY_HOST")}


def _serve_without_secret(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # A Redis URL no node can use: a serve that gets past the dev-mode check stops there,
    # before it listens anywhere.
    return subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--port", str(free_port()),
         "--redis-url", "nowhere://", *args],
        capture_output=True, text=True, timeout=30, cwd=ROOT, env={**_without_secrets(), **(env or {})})


def test_dev_mode_refuses_to_listen_beyond_loopback():
    """An image sets GATEWAY_HOST=0.0.0.0: started without a secret it must not hand every
    network a printed 12-hour token for every workspace."""
    cases = [(["--host", "0.0.0.0"], {}), ([], {"GATEWAY_HOST": "0.0.0.0"}), (["--host", "::"], {}),
             (["--host", "gateway.example"], {})]
    for args, env in cases:
        result = _serve_without_secret(*args, env=env)
        assert result.returncode == 2, (args, env, result.stderr[-500:])
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("serve: ")
        for what in ("GATEWAY_JWT_SECRET", "--host 127.0.0.1", "--dev"):
            assert what in lines[0], lines[0]
        assert "export TOKEN" not in result.stderr and "DEV MODE" not in result.stderr


def test_dev_mode_beyond_loopback_when_asked_for_and_on_any_loopback_address():
    asked = [(["--host", "0.0.0.0", "--dev"], {}), ([], {"GATEWAY_HOST": "0.0.0.0", "GATEWAY_DEV": "1"})]
    loopback = [(["--host", host], {}) for host in ("127.0.0.2", "::1", "localhost")]
    for args, env in asked + loopback:
        result = _serve_without_secret(*args, env=env)
        assert "DEV MODE" in result.stderr, (args, env, result.stderr[-500:])
        # Past the check: stopped by the unusable Redis URL, not by dev mode.
        assert result.returncode == 2 and "unsupported Redis URL" in result.stderr, result.stderr[-500:]
        assert "--dev" not in result.stderr.splitlines()[-1]


def test_a_secret_needs_no_opt_in_beyond_loopback():
    result = _serve_without_secret("--host", "0.0.0.0", env={"GATEWAY_JWT_SECRET": "k" * 40})
    assert result.returncode == 2 and "unsupported Redis URL" in result.stderr, result.stderr[-500:]
    assert "DEV MODE" not in result.stderr


def test_serve_refuses_a_negative_shutdown_delay():
    result = run_cli("serve", "--shutdown-delay", "-1")
    assert result.returncode == 2
    assert "shutdown_delay" in result.stderr


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_serve_runs_on_the_event_loop_asked_for(loop_name):  # (event_loop: a pytest-asyncio fixture)
    if loop_name == "uvloop":
        pytest.importorskip("uvloop")  # the [fast] extra
    secret = "c" * 40
    with serve("--event-loop", loop_name,
               env={"GATEWAY_JWT_SECRET": secret, **NO_DELAY}) as (process, port):
        assert_a_minted_token_joins(port, secret)
    assert process.stderr is not None
    assert f'"event_loop": "{loop_name}"' in process.stderr.read()


def test_serve_refuses_an_unknown_event_loop():
    result = run_cli("serve", "--event-loop", "trio")
    assert result.returncode == 2 and "event_loop must be auto, asyncio or uvloop" in result.stderr


# -- logs for a person, the demo page switch, dev mode's browser origins ------------------

# Settings a test of dev mode, log formats or origins must not inherit from the shell.
_INHERITED = ("GATEWAY_JWT_SECRET", "GATEWAY_JWT_PUBLIC_KEY_FILE", "GATEWAY_DEV", "GATEWAY_HOST",
              "GATEWAY_LOG_FORMAT", "GATEWAY_ALLOWED_ORIGINS", "GATEWAY_DEMO", "GATEWAY_REDIS_URL")


def _read_until(fd: int, pattern: str, deadline: float) -> str:
    """What ``fd`` gives until ``pattern`` matches it, EOF or ``deadline`` (whichever first)."""
    text = ""
    while not re.search(pattern, text) and (left := deadline - time.monotonic()) > 0:
        if not select.select([fd], [], [], left)[0]:
            break
        try:
            chunk = os.read(fd, 65_536)
        except OSError:  # a pseudo-terminal whose other end closed: EIO
            break
        if not chunk:
            break
        text += chunk.decode(errors="replace")
    return text


@contextmanager
def _serving(*args: str, terminal: bool, env: dict[str, str] | None = None
             ) -> Iterator[tuple[Callable[[], str], int]]:
    """A real ``serve`` on a free port, its stderr on a pseudo-terminal (``terminal``) or a
    pipe. Yields a function that returns its stderr up to the ``listening`` record (at most
    20 s), and the port. Stopped by its PID afterwards."""
    port = free_port()
    reader, writer = pty.openpty() if terminal else os.pipe()
    base = {key: value for key, value in os.environ.items() if key not in _INHERITED}
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--port", str(port), *args],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=writer,
        env={**base, **NO_DELAY, **(env or {})})
    os.close(writer)
    try:
        yield (lambda: _read_until(reader, r"listening[^\n]*\n", time.monotonic() + 20)), port
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        os.close(reader)


def _log_lines(stderr: str) -> list[str]:
    """The log lines: everything after the dev banner (if any), blank lines left out."""
    after_banner = stderr.rsplit("=" * 78, 1)[-1]
    return [line for line in after_banner.splitlines() if line.strip()]


_TEXT_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) [\w.]+ \S")


def _assert_text(lines: list[str], port: int) -> None:
    assert lines, "no log lines"
    for line in lines:
        assert _TEXT_LINE.match(line) and not line.startswith("{"), line
    assert any(line.endswith(f"INFO gateway listening url=http://127.0.0.1:{port}") for line in lines), lines


def _assert_json(lines: list[str]) -> None:
    assert lines, "no log lines"
    records = [json.loads(line) for line in lines]
    assert any(record["msg"] == "listening" for record in records), lines


@pytest.mark.parametrize(("args", "env", "expected"), [
    ([], {}, "text"),  # dev mode on a terminal: for a person
    (["--log-format", "json"], {}, "json"),  # asked for
    ([], {"GATEWAY_JWT_SECRET": "t" * 40}, "json"),  # a production run, even on a terminal
])
def test_logs_on_a_terminal(args, env, expected):
    with _serving(*args, terminal=True, env=env) as (read, port):
        stderr = read()
    assert ("DEV MODE" in stderr) is ("GATEWAY_JWT_SECRET" not in env), stderr[-2000:]
    if expected == "text":
        _assert_text(_log_lines(stderr), port)
    else:
        _assert_json(_log_lines(stderr))


@pytest.mark.parametrize(("args", "expected"), [([], "json"), (["--log-format", "text"], "text")])
def test_logs_without_a_terminal(args, expected):
    with _serving(*args, terminal=False) as (read, port):
        stderr = read()
    assert "DEV MODE" in stderr, stderr[-2000:]
    if expected == "text":
        _assert_text(_log_lines(stderr), port)
    else:
        _assert_json(_log_lines(stderr))


def test_log_format_auto_is_the_default_and_others_are_refused():
    assert Settings().log_format == "auto"
    result = run_cli("serve", "--log-format", "yaml")
    assert result.returncode == 2 and "log_format must be auto, json or text" in result.stderr


def test_demo_from_the_flag_and_the_environment():
    assert parse_settings([], {}).demo is False
    assert parse_settings(["--demo"], {}).demo is True
    assert parse_settings(["--demo", "--port", "9001"], {}).demo is True
    for text, value in [("1", True), ("true", True), ("YES", True), ("0", False), ("false", False),
                        ("no", False)]:
        assert parse_settings([f"--demo={text}"], {}).demo is value, text
        assert parse_settings([], {"GATEWAY_DEMO": text}).demo is value, text
    assert parse_settings(["--demo", "no"], {"GATEWAY_DEMO": "yes"}).demo is False  # the flag wins
    with pytest.raises(ValueError, match="GATEWAY_DEMO: 'maybe' is not one of"):
        parse_settings([], {"GATEWAY_DEMO": "maybe"})
    with pytest.raises(SystemExit):
        parse_settings(["--demo=maybe"], {})


def test_the_demo_page_is_on_when_asked_for_and_always_in_dev_mode():
    assert Settings().demo_enabled is False
    assert Settings(demo=True).demo_enabled is True
    assert Settings().with_dev_secret().demo_enabled is True


@pytest.mark.parametrize(("host", "origins"), [
    ("127.0.0.1", ("http://127.0.0.1:9000", "http://localhost:9000")),
    ("localhost", ("http://localhost:9000", "http://127.0.0.1:9000")),
    ("127.0.0.2", ("http://127.0.0.2:9000", "http://localhost:9000", "http://127.0.0.1:9000")),
    ("::1", ("http://[::1]:9000", "http://localhost:9000", "http://127.0.0.1:9000")),
    ("0.0.0.0", ("http://0.0.0.0:9000", "http://localhost:9000", "http://127.0.0.1:9000")),
    ("10.1.2.3", ("http://10.1.2.3:9000",)),
    ("gateway.example", ("http://gateway.example:9000",)),
])
def test_dev_mode_allows_the_origins_of_its_own_pages(host, origins):
    dev = Settings(host=host, port=9000).with_dev_secret()
    assert dev.allowed_origins == origins
    for origin in origins:  # what a browser sends for a page it loaded from there
        assert origin_allowed([origin], dev.allowed_origins), origin
    assert not origin_allowed(["http://evil.example"], dev.allowed_origins)
    assert Settings(host=host, port=9000).allowed_origins == ()  # not outside dev mode


def test_dev_mode_keeps_the_allowed_origins_given():
    given = ("https://app.example", "http://localhost:3000")
    assert Settings(allowed_origins=given).with_dev_secret().allowed_origins == given


def _upgrade_status(port: int, origin: str) -> int:
    connection = HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/v1/sync/ws", headers={
            "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(), "Origin": origin})
        return connection.getresponse().status
    finally:
        connection.close()


def test_dev_mode_banner_names_the_demo_page_and_its_pages_may_open_a_websocket():
    with _serving(terminal=False) as (read, port):
        stderr = read()
        root = f"http://127.0.0.1:{port}"
        assert f"  demo page: {root}/demo/  (browser client: {root}/client/mm-sync.js)" in stderr
        assert f"  allowed origins: {root}, http://localhost:{port}\n" in stderr
        assert _upgrade_status(port, f"http://localhost:{port}") == 101
        assert _upgrade_status(port, root) == 101
        assert _upgrade_status(port, "http://evil.example") == 403


def test_dev_mode_with_allowed_origins_given_keeps_them():
    with _serving("--allowed-origins", "https://app.example", terminal=False) as (read, port):
        stderr = read()
        assert "  allowed origins: https://app.example\n" in stderr
        assert _upgrade_status(port, "https://app.example") == 101
        assert _upgrade_status(port, f"http://127.0.0.1:{port}") == 403


@pytest.mark.parametrize(("args", "warned"), [
    (["--demo"], True),
    (["--demo", "--allowed-origins", "https://app.example"], False),
    ([], False),
])
def test_demo_without_allowed_origins_outside_dev_mode_warns(args, warned):
    with _serving(*args, terminal=False, env={"GATEWAY_JWT_SECRET": "w" * 40}) as (read, _):
        records = [json.loads(line) for line in _log_lines(read())]
    warnings = [record for record in records if record["level"] == "warning"]
    assert any("--allowed-origins is empty" in record["msg"] for record in warnings) is warned, records


def _closed_after(port: int, trickle: bytes, limit: float) -> float | None:
    """Seconds until the server closes a connection that sends ``trickle`` one byte every
    0.25 s (then nothing); None if it is still open after ``limit``."""
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as sock:
        sock.settimeout(0.25)
        for index in range(int(limit / 0.25)):
            if index < len(trickle):
                try:
                    sock.sendall(trickle[index:index + 1])
                except OSError:
                    return time.monotonic() - began
            try:
                if sock.recv(4096) == b"":
                    return time.monotonic() - began
            except TimeoutError:
                continue
            except OSError:
                return time.monotonic() - began
    return None


def test_a_request_head_trickled_or_never_sent_is_cut_off_after_the_header_timeout() -> None:
    """Slowloris: a client that sends its request head a byte at a time (or sends nothing,
    or stops between keep-alive requests) is closed after --header-timeout; a stream that
    is being answered is not (it is a request in progress)."""
    secret = "h" * 40
    with serve("--header-timeout", "2", "--keepalive", "1",
               env={"GATEWAY_JWT_SECRET": secret, **NO_DELAY}) as (_, port):
        head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100
        trickled = _closed_after(port, head, limit=8)
        assert trickled is not None and 1.5 <= trickled <= 4.5, trickled
        silent = _closed_after(port, b"", limit=8)
        assert silent is not None and 1.5 <= silent <= 4.5, silent
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            began = time.monotonic()  # the next request never comes
            sock.settimeout(8)
            while sock.recv(4096):
                pass
            assert 1.5 <= time.monotonic() - began <= 4.5
        # A stream outlives the timeout: it is a request being answered (keep-alives flow).
        token = mint_token(secret, sub="u1", org_id="org-1", workspaces=["ws-1"])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /v1/orgs/org-1/workspaces/ws-1/sync/stream HTTP/1.1\r\n"
                         b"Host: 127.0.0.1\r\nAuthorization: Bearer " + token.encode() + b"\r\n\r\n")
            received = b""
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                chunk = sock.recv(4096)
                assert chunk, f"the stream was closed after {received!r}"
                received += chunk
            assert received.startswith(b"HTTP/1.1 200") and received.count(b"\n:") >= 2, received
