"""``sync-gateway tail``: a workspace's live events, one JSON envelope a line.

A small WebSocket client of the channel (docs/websocket.md): it opens the
workspace's socket URL with header auth, prints every ``event`` message's envelope
on stdout, reports errors and the close on stderr (with the id to resume from),
and ends when the server closes the socket or on Ctrl-C.
"""

from __future__ import annotations

import json
import sys
from typing import Final, TextIO
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import aiohttp

from protocol.ws import SUBPROTOCOL_JSON, CloseCode

_SCHEMES: Final = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}
# Closes after which the same command, with --since, carries on.
_RESUMABLE: Final = {CloseCode.NORMAL, CloseCode.SERVICE_RESTART, CloseCode.POLICY_VIOLATION}


def socket_url(base: str, org: str, workspace: str, since: str | None = None) -> str:
    """The per-workspace socket URL under ``base`` (http(s):// or ws(s)://)."""
    parts = urlsplit(base if "://" in base else f"http://{base}")
    scheme = _SCHEMES.get(parts.scheme.lower())
    if scheme is None:
        raise ValueError(f"unsupported URL scheme {parts.scheme!r}")
    path = (f"{parts.path.rstrip('/')}/v1/orgs/{quote(org, safe='')}"
            f"/workspaces/{quote(workspace, safe='')}/sync/ws")
    query = urlencode({"since": since}) if since else ""
    return urlunsplit((scheme, parts.netloc, path, query, ""))

HEARTBEAT_SECONDS = 15.0


async def tail(
    url: str, org: str, workspace: str, token: str, *, since: str | None = None,
    out: TextIO = sys.stdout, err: TextIO = sys.stderr,
) -> int:
    """Print events until the socket ends. 0: closed by the server in a resumable way;
    1: refused, an error on subscribing, or closed for authentication."""
    target = socket_url(url, org, workspace, since)
    last_id = since
    async with aiohttp.ClientSession() as session:
        try:
            ws = await session.ws_connect(
                target, headers={"Authorization": f"Bearer {token}"},
                protocols=(SUBPROTOCOL_JSON,), max_msg_size=0, autoping=True,
                # Our own pings: a half-open connection ends the tail instead of hanging it.
                heartbeat=HEARTBEAT_SECONDS,
            )
        except aiohttp.WSServerHandshakeError as exc:
            print(f"tail: refused: HTTP {exc.status}", file=err)
            return 1
        except aiohttp.ClientError as exc:
            print(f"tail: cannot connect: {exc}", file=err)
            return 1
        async with ws:
            async for message in ws:
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                decoded = json.loads(message.data)
                if decoded.get("op") == "event":
                    event = decoded["event"]
                    last_id = event.get("id") or last_id
                    print(json.dumps(event, separators=(",", ":"), ensure_ascii=False),
                          file=out, flush=True)
                elif decoded.get("op") == "error":
                    print(f"tail: error: {json.dumps(decoded['error'])}", file=err, flush=True)
                    if decoded.get("ref") is None:  # the subscription itself failed
                        return 1
            code = ws.close_code
    hint = f"; resume with --since {last_id}" if last_id else ""
    print(f"tail: closed by the server ({code}){hint}", file=err, flush=True)
    return 0 if code in _RESUMABLE else 1
