"""``sync-gateway serve | token | tail`` (also ``python -m gateway``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Sequence

from aiohttp import web

from gateway import logs
from gateway.auth import ALL_PERMISSIONS, mint_token
from gateway.broker import BackendRefused
from gateway.config import Settings, add_settings_arguments, base_url, is_loopback, settings_from

log = logging.getLogger("gateway")

DEV_ORG = "demo"
DEV_WORKSPACE = "lobby"


def _dev_banner(settings: Settings) -> str:
    """The secret, a ready token, commands to try, the demo page and the browser origins
    allowed (``Settings.with_dev_secret``)."""
    assert settings.jwt_secret is not None
    token = mint_token(settings.jwt_secret, sub="dev-user", org_id=DEV_ORG, workspaces="*",
                       ttl=12 * 3600, extra={"name": "Dev User"})
    root = base_url(settings.host, settings.port)
    base = f"{root}/v1/orgs/{DEV_ORG}/workspaces/{DEV_WORKSPACE}/sync"
    return "\n".join([
        "",
        "=" * 78,
        "  DEV MODE: no --jwt-secret or --jwt-public-key-file was given.",
        "  Tokens are signed with a random secret made for this run. NOT FOR PRODUCTION.",
        "=" * 78,
        f"  secret (for `sync-gateway token --jwt-secret ...`): {settings.jwt_secret}",
        "  a ready token (user dev-user, org demo, every workspace, 12 h):",
        "",
        f"export TOKEN={token}",
        "",
        "  try, in another terminal:",
        f"  curl -N -H \"Authorization: Bearer $TOKEN\" {base}/stream",
        f"  curl -X POST -H \"Authorization: Bearer $TOKEN\" {base}/presence/join",
        f"  curl -X POST -H \"Authorization: Bearer $TOKEN\" "
        f"'{base}/presence/viewing?resource_type=document&resource_id=doc-1'",
        f"  curl -H \"Authorization: Bearer $TOKEN\" {base}/presence",
        f"  curl -X POST -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/json' "
        f"-d '{{\"type\":\"doc.updated\",\"data\":{{\"id\":\"doc-1\"}}}}' {base}/events",
        f"  sync-gateway tail --url {root} --org {DEV_ORG} "
        f"--workspace {DEV_WORKSPACE} --token $TOKEN      # watch over WebSocket",
        "",
        f"  demo page: {root}/demo/  (browser client: {root}/client/mm-sync.js)",
        f"  allowed origins: {', '.join(settings.allowed_origins) or 'none'}",
        "=" * 78,
        "",
    ])


def _dev_mode_refusal(settings: Settings, allowed: bool) -> str | None:
    """Why dev mode must not start with these settings, or None. Dev mode prints a 12-hour
    token for every workspace: fine on loopback, an open door on any other interface (an
    image that listens on 0.0.0.0 and was started without its secret)."""
    if settings.has_verification_key or allowed or is_loopback(settings.host):
        return None
    return (f"no JWT secret or key, and dev mode would listen on {settings.host or 'every interface'!r}, "
            "which is not loopback: set GATEWAY_JWT_SECRET (or --jwt-secret / --jwt-public-key-file), "
            "or listen on --host 127.0.0.1, or pass --dev (GATEWAY_DEV=1) to run dev mode there anyway")


def _backend_name(url: str | None) -> str:
    """For the logs: ``memory``, or the Redis URL without its credentials."""
    if url is None or url.startswith("memory://"):
        return "memory"
    from gateway.redis_topology import RedisUrl

    return RedisUrl.parse(url).describe()


def event_loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory for ``uvloop`` (ImportError if it is not installed) and for
    ``auto`` when it is installed; None for the stdlib loop."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise
        return None
    return uvloop.new_event_loop


def serve(settings: Settings, *, dev: bool = False) -> int:
    """Run one node until SIGTERM/SIGINT. ``dev``: dev mode may listen beyond loopback."""
    from gateway.app import create_app, leave_on_sigterm

    refusal = _dev_mode_refusal(settings, dev)
    if refusal is not None:
        print(f"serve: {refusal}", file=sys.stderr)
        return 2
    if not settings.has_verification_key:
        settings = settings.with_dev_secret()
    logs.configure(settings.log_level, settings.log_format, dev_mode=settings.dev_mode)
    if settings.dev_mode:
        print(_dev_banner(settings), file=sys.stderr, flush=True)
        log.warning("running in DEV MODE with a random secret")
    elif settings.demo and not settings.allowed_origins:
        log.warning("--demo is on but --allowed-origins is empty: add the page's own origin "
                    "(how browsers reach this node) or its WebSocket/stream is refused",
                    extra={"demo_page": f"{base_url(settings.host, settings.port)}/demo/"})
    try:
        backend = _backend_name(settings.redis_url)
        app = create_app(settings)
    except ValueError as exc:  # e.g. an unreadable or wrong JWT key file, a bad Redis URL
        print(f"serve: {exc}", file=sys.stderr)
        return 2
    log.info(
        "starting gateway",
        extra={"node_id": settings.node_id, "host": settings.host, "port": settings.port,
               "backend": backend},
    )
    leave_on_sigterm(app)
    from gateway.logs import AccessLogger

    try:
        loop_factory = event_loop_factory(settings.event_loop)
    except ImportError:
        print("serve: --event-loop uvloop needs uvloop: pip install -e \".[fast]\"", file=sys.stderr)
        return 2
    log.info("event loop", extra={"event_loop": "uvloop" if loop_factory else "asyncio"})
    try:
        web.run_app(
            app, host=settings.host, port=settings.port, access_log_class=AccessLogger,
            loop=loop_factory() if loop_factory else asyncio.new_event_loop(),
            print=lambda *_: log.info("listening",
                                      extra={"url": f"http://{settings.host}:{settings.port}"}),
            # Room for sockets to answer their close frame before the backend closes.
            shutdown_timeout=max(5.0, settings.ws_close_timeout + 2.0), handle_signals=True,
            # aiohttp's keep-alive timer runs from a connection's start and from each answer,
            # and closes it if no whole request head arrived by then: a client trickling its
            # headers (slowloris) holds its socket that long, never a handler. Streams and
            # sockets in progress are requests being answered: never cut by it.
            keepalive_timeout=settings.header_timeout,
        )
    except BackendRefused as exc:  # e.g. a Redis that may evict the gateway's keys
        print(f"serve: {exc}", file=sys.stderr)
        return 2
    return 0


def token(args: argparse.Namespace) -> int:
    secret = args.jwt_secret or os.environ.get("GATEWAY_JWT_SECRET")
    if not secret:
        print("token: needs --jwt-secret or GATEWAY_JWT_SECRET (the serve secret)", file=sys.stderr)
        return 2
    workspaces: list[str] | str = "*" if args.workspace == ["*"] else args.workspace
    extra = {"name": args.name} if args.name else {}
    if args.service:
        extra["kind"] = "service"
    print(mint_token(secret, sub=args.sub, org_id=args.org, workspaces=workspaces,
                     permissions=args.permission or ALL_PERMISSIONS, ttl=args.ttl, extra=extra))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sync-gateway", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve_parser = commands.add_parser(
        "serve", help="run a gateway node", usage="%(prog)s [options]",
        description="Run one gateway node until SIGTERM/SIGINT. Every option is also an "
                    "environment variable; a flag wins over its variable.")
    add_settings_arguments(serve_parser)
    serve_parser.add_argument(
        "--dev", action="store_true",
        help="allow dev mode (no secret: a random one, and a printed token) on a --host other "
             "than loopback [default: off; env GATEWAY_DEV=1]")

    token_parser = commands.add_parser("token", help="print a signed JWT (HS256)")
    token_parser.add_argument("--sub", required=True, help="user (or service) id")
    token_parser.add_argument("--org", required=True, help="the organisation id (org_id claim)")
    token_parser.add_argument("--workspace", action="append", required=True,
                              help="a workspace id (repeat), or * for all")
    token_parser.add_argument("--permission", action="append",
                              help=f"a permission to grant (repeat) [default: {' '.join(ALL_PERMISSIONS)}]")
    token_parser.add_argument("--ttl", type=int, default=3600,
                              help="seconds until the token expires [default: 3600]")
    token_parser.add_argument("--name", help="display name copied into presence")
    token_parser.add_argument("--service", action="store_true", help="a backend service token")
    token_parser.add_argument("--jwt-secret",
                              help="the HS256 secret `serve` verifies with [env GATEWAY_JWT_SECRET]")

    tail_parser = commands.add_parser("tail", help="print a workspace's live events, one per line")
    tail_parser.add_argument("--url", default="http://127.0.0.1:8080",
                             help="the gateway's base URL [default: http://127.0.0.1:8080]")
    tail_parser.add_argument("--org", required=True, help="the organisation id")
    tail_parser.add_argument("--workspace", required=True, help="the workspace to follow")
    tail_parser.add_argument("--token", help="a JWT with sync:read [env GATEWAY_TOKEN]")
    tail_parser.add_argument("--since", help="an event id: first print every event after it")
    return parser


def tail(args: argparse.Namespace) -> int:
    from gateway.tail import tail as follow

    token_value = args.token or os.environ.get("GATEWAY_TOKEN")
    if not token_value:
        print("tail: needs --token or GATEWAY_TOKEN", file=sys.stderr)
        return 2
    try:
        return asyncio.run(follow(args.url, args.org, args.workspace, token_value,
                                  since=args.since))
    except KeyboardInterrupt:
        return 130
    except ValueError as exc:
        print(f"tail: {exc}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        try:
            settings = settings_from(args)
        except ValueError as exc:
            print(f"serve: {exc}", file=sys.stderr)
            return 2
        dev = args.dev or os.environ.get("GATEWAY_DEV", "").lower() in ("1", "true", "yes")
        return serve(settings, dev=dev)
    if args.command == "token":
        return token(args)
    if args.command == "tail":
        return tail(args)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
