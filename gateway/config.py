"""One ``Settings`` object, built from command-line flags and ``GATEWAY_<NAME>`` variables.

Each setting's meaning lives once, in its field's ``metadata``: ``help`` (one line: what it
does) and, where the dataclass default does not say it plainly (``None``, an empty tuple, a
computed value), ``default`` (the default as a person should read it). ``serve --help`` is
built from them; a setting without ``help`` is refused (``setting_help``)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import socket
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from typing import Any

ALGORITHMS = ("HS256", "RS256", "ES256")
LOG_FORMATS = ("auto", "json", "text")


def _meaning(text: str, default: str | None = None) -> dict[str, str]:
    """A field's metadata: its one-line ``help`` and, when needed, its ``default`` as shown."""
    return {"help": text} if default is None else {"help": text, "default": default}


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = field(default="127.0.0.1", metadata=_meaning(
        "address to listen on; without a JWT secret or key only a loopback one, unless --dev"))
    port: int = field(default=8080, metadata=_meaning("TCP port to listen on"))
    redis_url: str | None = field(default=None, metadata=_meaning(
        "the shared backend: redis://, rediss://, unix://, redis+cluster://host:port[,...] or "
        "redis+sentinel://host:port[,...]/service[/db]; memory:// is the embedded one",
        "unset (embedded in-process backend)"))
    redis_key_prefix: str = field(default="gw", metadata=_meaning(
        "start of every Redis key this gateway writes: several deployments can share one Redis"))
    redis_max_connections: int = field(default=6, metadata=_meaning(
        "command connections per Redis primary (each node also holds one pub/sub connection "
        "per primary for the logs it follows)"))
    redis_allow_eviction: bool = field(default=False, metadata=_meaning(
        "start even when Redis's maxmemory-policy is not noeviction (refused at start-up "
        "otherwise: it may evict presence records, epochs, liveness and idempotency keys; "
        "allowed, it is logged as an error); 1/true/yes or 0/false/no, the flag alone means on",
        "off"))
    node_id: str = field(
        default_factory=lambda: f"{socket.gethostname()}-{secrets.token_hex(3)}",
        metadata=_meaning("this node's name in presence sessions, logs and the X-Gateway-Node "
                          "header; unique per node", "<hostname>-<random>"))
    jwt_secret: str | None = field(default=None, metadata=_meaning(
        "HS256 secret that verifies client JWTs (`sync-gateway token` signs with it)",
        "unset (and no --jwt-public-key-file: dev mode, a random secret per run)"))
    jwt_public_key_file: str | None = field(default=None, metadata=_meaning(
        "PEM public key file that verifies RS256/ES256 client JWTs", "unset"))
    jwt_algorithm: str = field(default="HS256", metadata=_meaning(
        "the one JWT algorithm accepted: HS256 (--jwt-secret), RS256 or ES256 "
        "(--jwt-public-key-file)"))
    jwt_audience: str | None = field(default=None, metadata=_meaning(
        "the `aud` claim every client JWT must carry", "unset (not checked)"))
    jwt_issuer: str | None = field(default=None, metadata=_meaning(
        "the `iss` claim every client JWT must carry", "unset (not checked)"))
    jwt_leeway: float = field(default=10.0, metadata=_meaning(
        "seconds of clock skew tolerated on a JWT's exp, nbf and iat"))
    jwt_max_lifetime: float = field(default=86_400.0, metadata=_meaning(
        "longest a client JWT may be valid, in seconds: exp - iat (iat is then required, and "
        "may not be in the future); longer ones are refused with 401; 0: no ceiling"))
    allowed_origins: tuple[str, ...] = field(default=(), metadata=_meaning(
        "comma-separated browser origins (scheme://host[:port]) whose pages may open a "
        "WebSocket and read REST/SSE answers (CORS); exact matches only",
        "none: no browser page may connect (dev mode: the dev banner's page origins)"))
    presence_ttl: float = field(default=60.0, metadata=_meaning(
        "seconds a user's REST presence lasts after their last REST presence call"))
    disconnect_grace: float = field(default=10.0, metadata=_meaning(
        "seconds a user stays present after their stream or socket closes: a reconnect "
        "within it shows no left/joined"))
    node_timeout: float = field(default=15.0, metadata=_meaning(
        "seconds without a node's Redis heartbeat before the others drop its presence "
        "sessions (Redis backends only)"))
    history_max_len: int = field(default=10_000, metadata=_meaning(
        "events kept per workspace for resuming (a resume from before them gets sync.reset)"))
    history_max_age: float = field(default=86_400.0, metadata=_meaning(
        "seconds events are kept for resuming"))
    idempotency_ttl: float = field(default=300.0, metadata=_meaning(
        "seconds a publish's Idempotency-Key is remembered (a retry within it appends nothing)"))
    keepalive: float = field(default=15.0, metadata=_meaning(
        "seconds between keep-alives: SSE comment lines and WebSocket pings"))
    retry_ms: int = field(default=3_000, metadata=_meaning(
        "milliseconds an SSE client waits before reconnecting (its `retry:` line; a draining "
        "node spreads them over 1-3 times this)"))
    ticket_ttl: float = field(default=30.0, metadata=_meaning(
        "seconds a one-time stream ticket (POST .../tickets) stays usable"))
    max_event_bytes: int = field(default=65_536, metadata=_meaning(
        "largest published event `data`, in bytes of JSON (larger: 413)"))
    send_buffer: int = field(default=1_024, metadata=_meaning(
        "frames queued per connection; a client that falls further behind is disconnected "
        "(it resumes later)"))
    sweep_interval: float = field(default=1.0, metadata=_meaning(
        "seconds between sweeps that end expired presence sessions"))
    ws_max_message_bytes: int = field(default=131_072, metadata=_meaning(
        "largest WebSocket message accepted from a client (larger: close 1009)"))
    ws_rate_limit: float = field(default=50.0, metadata=_meaning(
        "WebSocket messages per second per connection (token bucket of --ws-rate-burst)"))
    ws_rate_burst: int = field(default=100, metadata=_meaning(
        "WebSocket messages a connection may send at once (the token bucket's size)"))
    ws_rate_strikes: int = field(default=10, metadata=_meaning(
        "rejected WebSocket messages tolerated before close 1008"))
    header_timeout: float = field(default=15.0, metadata=_meaning(
        "seconds a connection has to send a whole request head (line and headers), at its "
        "start and between keep-alive requests; then it is closed (slowloris)"))
    ws_auth_timeout: float = field(default=5.0, metadata=_meaning(
        "seconds a new WebSocket has to authenticate"))
    ws_max_subscriptions: int = field(default=100, metadata=_meaning(
        "workspaces one WebSocket may subscribe to"))
    ws_close_timeout: float = field(default=5.0, metadata=_meaning(
        "seconds a WebSocket closing handshake may take before the connection is cut"))
    shutdown_delay: float = field(default=5.0, metadata=_meaning(
        "seconds after SIGTERM the node answers /readyz 503 while still serving, so load "
        "balancers stop sending traffic before it drains and exits; 0: drain at once"))
    log_format: str = field(default="auto", metadata=_meaning(
        "json (one object a line), text (readable lines) or auto: text in dev mode on a "
        "terminal, json otherwise"))
    log_level: str = field(default="INFO", metadata=_meaning(
        "the least severe records logged: DEBUG, INFO, WARNING, ERROR or CRITICAL"))
    event_loop: str = field(default="auto", metadata=_meaning(
        "the event loop: auto (uvloop when installed: pip install -e \".[fast]\"), uvloop or "
        "asyncio (the stdlib loop)"))
    demo: bool = field(default=False, metadata=_meaning(
        "serve the demo page at /demo/ (always on in dev mode); 1/true/yes or 0/false/no, "
        "the flag alone means on", "off"))
    # Not a flag: set by ``serve`` when no secret or key is configured. Never silently open.
    dev_mode: bool = field(default=False, metadata=_meaning(
        "dev mode: tokens are minted with a random secret printed at start-up", "off"))

    def __post_init__(self) -> None:
        if self.jwt_algorithm not in ALGORITHMS:
            raise ValueError(f"jwt_algorithm must be one of {', '.join(ALGORITHMS)}")
        if self.jwt_algorithm == "HS256" and self.jwt_public_key_file:
            raise ValueError("HS256 takes --jwt-secret, not a public key")
        if self.jwt_algorithm != "HS256" and self.jwt_secret:
            raise ValueError(f"{self.jwt_algorithm} takes --jwt-public-key-file, not a secret")
        for name in ("presence_ttl", "disconnect_grace", "node_timeout", "keepalive",
                     "ticket_ttl", "sweep_interval", "history_max_age", "idempotency_ttl", "ws_rate_limit",
                     "ws_auth_timeout", "ws_close_timeout", "header_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.shutdown_delay < 0:
            raise ValueError("shutdown_delay must be 0 or more")
        if self.event_loop not in ("auto", "asyncio", "uvloop"):
            raise ValueError("event_loop must be auto, asyncio or uvloop")
        if self.log_format not in LOG_FORMATS:
            raise ValueError("log_format must be auto, json or text")
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

    @property
    def demo_enabled(self) -> bool:
        """The demo page is served at ``/demo/``: asked for, or dev mode."""
        return self.demo or self.dev_mode

    def with_dev_secret(self) -> Settings:
        """These settings in dev mode: a fresh random HS256 secret, and, when no allowed
        origins were given, the origins of this node's own pages (``page_origins``), so that
        the demo page it serves may open its WebSocket. Origins that were given are kept as
        they are."""
        return replace(self, jwt_secret=secrets.token_urlsafe(32), jwt_algorithm="HS256",
                       dev_mode=True,
                       allowed_origins=self.allowed_origins or page_origins(self.host, self.port))


def is_loopback(host: str) -> bool:
    """``host`` reaches this machine only: 127.0.0.0/8, ::1 or ``localhost`` (names are not
    resolved: any other name counts as reachable from elsewhere)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _is_every_interface(host: str) -> bool:
    """0.0.0.0 or :: (which include loopback)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def base_url(host: str, port: int) -> str:
    """``http://host:port``, an IPv6 address in brackets."""
    bare = host.strip("[]")
    return f"http://[{bare}]:{port}" if ":" in bare else f"http://{host}:{port}"


def page_origins(host: str, port: int) -> tuple[str, ...]:
    """The origins a browser gives pages served at ``host:port``: ``http://host:port`` and,
    when ``host`` is loopback (or every interface, loopback included), also
    ``http://localhost:port`` and ``http://127.0.0.1:port``."""
    origins = [base_url(host, port)]
    if is_loopback(host) or _is_every_interface(host):
        origins += [f"http://localhost:{port}", f"http://127.0.0.1:{port}"]
    return tuple(dict.fromkeys(origins))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_origins(text: str) -> tuple[str, ...]:
    return tuple(part.strip().rstrip("/") for part in text.split(",") if part.strip())


def boolean(text: str) -> bool:
    """1/true/yes/on or 0/false/no/off, any case."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not one of 1/true/yes or 0/false/no")


_CONVERTERS: dict[str, Any] = {
    "int": int,
    "float": float,
    "str": str,
    "str | None": str,
    "bool": boolean,
    "tuple[str, ...]": _parse_origins,
}

# Settings that are not operator-facing flags.
_INTERNAL = frozenset({"dev_mode"})


def _shown_default(item: Field[Any]) -> str:
    """The default as ``--help`` shows it: the metadata's ``default``, else the plain value."""
    if "default" in item.metadata:
        return str(item.metadata["default"])
    value = item.default
    if value is MISSING or value is None or value == ():
        raise ValueError(f"setting {item.name} needs metadata 'default': how to show its default")
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def setting_help(item: Field[Any]) -> str:
    """A setting's ``--help`` line: its meaning, its default and its environment variable.
    ValueError for a setting without a ``help`` in its metadata."""
    meaning = str(item.metadata.get("help", "")).strip()
    if not meaning:
        raise ValueError(f"setting {item.name} has no metadata 'help': say what it does")
    return f"{meaning} [default: {_shown_default(item)}; env GATEWAY_{item.name.upper()}]"


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; its default comes from ``GATEWAY_<NAME>`` or the dataclass."""
    for item in fields(Settings):
        if item.name in _INTERNAL:
            continue
        options: dict[str, Any] = {"nargs": "?", "const": True} if str(item.type) == "bool" else {}
        parser.add_argument(
            _flag(item.name),
            dest=item.name,
            type=_CONVERTERS[str(item.type)],
            default=None,
            metavar=item.name.upper(),
            help=setting_help(item).replace("%", "%%"),
            **options,
        )


def settings_from(
    args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Flags win over environment variables, which win over defaults. ValueError (naming the
    variable) for a value that does not parse."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for item in fields(Settings):
        if item.name in _INTERNAL:
            continue
        flag_value = getattr(args, item.name, None) if args is not None else None
        if flag_value is not None:
            values[item.name] = flag_value
            continue
        variable = f"GATEWAY_{item.name.upper()}"
        env_value = environ.get(variable)
        if env_value not in (None, ""):
            try:
                values[item.name] = _CONVERTERS[str(item.type)](env_value)
            except ValueError as exc:
                raise ValueError(f"{variable}: {exc}") from None
    return Settings(**values)


def parse_settings(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Settings:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    return settings_from(parser.parse_args(list(argv)), environ)
