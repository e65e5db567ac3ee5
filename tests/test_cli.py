"""The commands a newcomer types: ``token`` and ``serve`` (dev mode and configured)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import jwt
import pytest

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
