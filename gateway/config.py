"""One ``Settings`` object, built from command-line flags and ``GATEWAY_<NAME>`` variables."""

from __future__ import annotations

import argparse
import os
import secrets
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

ALGORITHMS = ("HS256", "RS256", "ES256")


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    redis_url: str | None = None
    # Every key this gateway writes starts with it: several deployments can share one Redis.
    redis_key_prefix: str = "gw"
    # Command connections per Redis primary (each node also holds one pub/sub connection
    # per primary for the logs it follows).
    redis_max_connections: int = 6
    node_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{secrets.token_hex(3)}")
    jwt_secret: str | None = None
    jwt_public_key_file: str | None = None
    jwt_algorithm: str = "HS256"
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway: float = 10.0
    allowed_origins: tuple[str, ...] = ()
    presence_ttl: float = 60.0
    disconnect_grace: float = 10.0
    node_timeout: float = 15.0
    history_max_len: int = 10_000
    history_max_age: float = 86_400.0
    # Seconds a publish's Idempotency-Key is remembered (a retry within it appends nothing).
    idempotency_ttl: float = 300.0
    keepalive: float = 15.0
    retry_ms: int = 3_000
    ticket_ttl: float = 30.0
    max_event_bytes: int = 65_536
    send_buffer: int = 1_024
    sweep_interval: float = 1.0
    # WebSocket channel: largest frame accepted (larger: close 1009), messages per second
    # per connection (token bucket of ws_rate_burst), rejected messages tolerated before
    # close 1008, seconds to authenticate, subscriptions per socket, seconds a closing
    # handshake may take before the connection is cut.
    ws_max_message_bytes: int = 131_072
    ws_rate_limit: float = 50.0
    ws_rate_burst: int = 100
    ws_rate_strikes: int = 10
    ws_auth_timeout: float = 5.0
    ws_max_subscriptions: int = 100
    ws_close_timeout: float = 5.0
    # After SIGTERM: seconds the node answers /readyz 503 while it still serves everything
    # (and accepts new clients), so load balancers stop sending traffic before it stops
    # listening; then it drains and exits. 0: drain at once.
    shutdown_delay: float = 5.0
    log_format: str = "json"
    log_level: str = "INFO"
    # The event loop ``serve`` runs: uvloop (``pip install -e ".[fast]"``) when installed
    # ("auto"), or exactly "uvloop" / "asyncio" (the stdlib loop).
    event_loop: str = "auto"
    # Set by ``serve`` when no secret or key is configured: tokens are minted with a
    # random secret printed at start-up. Never silently open.
    dev_mode: bool = False

    def __post_init__(self) -> None:
        if self.jwt_algorithm not in ALGORITHMS:
            raise ValueError(f"jwt_algorithm must be one of {', '.join(ALGORITHMS)}")
        if self.jwt_algorithm == "HS256" and self.jwt_public_key_file:
            raise ValueError("HS256 takes --jwt-secret, not a public key")
        if self.jwt_algorithm != "HS256" and self.jwt_secret:
            raise ValueError(f"{self.jwt_algorithm} takes --jwt-public-key-file, not a secret")
        for name in ("presence_ttl", "disconnect_grace", "node_timeout", "keepalive",
                     "ticket_ttl", "sweep_interval", "history_max_age", "idempotency_ttl", "ws_rate_limit",
                     "ws_auth_timeout", "ws_close_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.shutdown_delay < 0:
            raise ValueError("shutdown_delay must be 0 or more")
        if self.event_loop not in ("auto", "asyncio", "uvloop"):
            raise ValueError("event_loop must be auto, asyncio or uvloop")
        if self.log_format not in ("json", "text"):
            raise ValueError("log_format must be json or text")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError("log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        for name in ("history_max_len", "max_event_bytes", "send_buffer",
                     "ws_max_message_bytes", "ws_rate_burst", "ws_rate_strikes",
                     "ws_max_subscriptions", "redis_max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")

    @property
    def has_verification_key(self) -> bool:
        return bool(self.jwt_secret or self.jwt_public_key_file)

    def with_dev_secret(self) -> Settings:
        """These settings in dev mode: a fresh random HS256 secret."""
        return replace(self, jwt_secret=secrets.token_urlsafe(32), jwt_algorithm="HS256",
                       dev_mode=True)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_origins(text: str) -> tuple[str, ...]:
    return tuple(part.strip().rstrip("/") for part in text.split(",") if part.strip())


_CONVERTERS: dict[str, Any] = {
    "int": int,
    "float": float,
    "str": str,
    "str | None": str,
    "tuple[str, ...]": _parse_origins,
}

# Settings that are not operator-facing flags.
_INTERNAL = frozenset({"dev_mode"})


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; its default comes from ``GATEWAY_<NAME>`` or the dataclass."""
    for item in fields(Settings):
        if item.name in _INTERNAL:
            continue
        parser.add_argument(
            _flag(item.name),
            dest=item.name,
            type=_CONVERTERS[str(item.type)],
            default=None,
            metavar=item.name.upper(),
            help=f"(env GATEWAY_{item.name.upper()})",
        )


def settings_from(
    args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Flags win over environment variables, which win over defaults."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for item in fields(Settings):
        if item.name in _INTERNAL:
            continue
        flag_value = getattr(args, item.name, None) if args is not None else None
        if flag_value is not None:
            values[item.name] = flag_value
            continue
        env_value = environ.get(f"GATEWAY_{item.name.upper()}")
        if env_value not in (None, ""):
            values[item.name] = _CONVERTERS[str(item.type)](env_value)
    return Settings(**values)


def parse_settings(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Settings:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    return settings_from(parser.parse_args(list(argv)), environ)
