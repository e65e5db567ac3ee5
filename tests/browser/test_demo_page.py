"""The demo page and the client module in real Chromium: two users (two browser contexts)
on two gateway nodes that share a real redis-server, behind the shipped nginx config.

What the user of each page sees: the other's join, viewing and published events; after the
node one of them is on is SIGKILLed, both pages reconnect and resume with no lost and no
duplicated events, and the presence list converges (a user who was only on the dead node
leaves within --node-timeout; the pages' own users never flicker). A page from an origin
that is not allowed can neither open a socket nor read the stream.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.browser.conftest import Deployment
from tests.browser.demo_page import DemoPage, Entry, until
from tests.multinode.harness import BASE, ORG, WORKSPACE, Node, auth, token

pytestmark = [pytest.mark.browser, pytest.mark.multinode]

PUBLISHED = 40  # numbered events published across the node's death (or drain)
KILL_AFTER = 12
AFTERWARDS = 5  # and more once it is gone


async def connections(node: Node) -> dict[str, int]:
    """Open connections by transport, from the node's own /metrics."""
    async with aiohttp.ClientSession() as session, session.get(f"{node.url}/metrics") as response:
        text = await response.text()
    found = re.findall(r'^gateway_connections\{transport="(\w+)"\} ([0-9.]+)$', text, re.M)
    return {transport: int(float(count)) for transport, count in found}


async def place(alice: DemoPage, bob: DemoPage, deployment: Deployment) -> tuple[Node, Node]:
    """Reconnect pages until Alice's and Bob's sockets are on different nodes and Alice's node
    also serves an EventSource stream; (Alice's node, Bob's node)."""
    for attempt in range(16):
        alice_node, bob_node = await alice.node(), await bob.node()
        if alice_node and bob_node and alice_node != bob_node:
            victim = deployment.node(alice_node)
            if (await connections(victim)).get("sse", 0) >= 1:
                return victim, deployment.node(bob_node)
        await (bob if attempt % 2 == 0 else alice).reconnect()
    raise AssertionError("nginx never spread the pages over both nodes")


def numbered(log: list[Entry]) -> list[int]:
    return [entry.data["seq"] for entry in log if entry.type == "note.posted" and "seq" in entry.data]


async def publish_numbered(node: Node, seqs: range) -> None:
    """Publish numbered events straight to ``node``, as a backend service, 50 ms apart."""
    async with aiohttp.ClientSession(headers=auth("service")) as session:
        for seq in seqs:
            async with session.post(f"{node.url}{BASE}/events",
                                    json={"type": "note.posted", "data": {"seq": seq}}) as response:
                assert response.status == 200, await response.text()
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
async def test_two_users_on_two_nodes_see_each_other_and_survive_a_node_leaving(
        browser: Any, deployment: Deployment, screenshots: Any, how: str) -> None:
    """SIGKILL: the node dies; SIGTERM: it drains (its sockets get close 1012, its streams
    end) after its --shutdown-delay (5 s)."""
    alice = DemoPage(await (await browser.new_context()).new_page(), "alice")
    bob = DemoPage(await (await browser.new_context()).new_page(), "bob")
    await alice.open(deployment.url, token("alice", name="Alice"), ORG, WORKSPACE)
    await bob.open(deployment.url, token("bob", name="Bob"), ORG, WORKSPACE)
    victim, survivor = await place(alice, bob, deployment)

    # What one user does appears in the other's page, on both panels.
    assert await alice.join() == "join: ok"
    assert await alice.viewing("document", "doc-7") == "viewing: ok"
    assert await bob.join() == "join: ok"
    for page in (alice, bob):
        for panel in ("ws", "sse"):
            await until(lambda page=page, panel=panel: _is(page.members(panel),
                        {"alice": "document/doc-7", "bob": ""}), 10, f"{page.user} {panel} members")
    hostile = '<img src=x onerror="document.title=\'pwned\'">'
    result = await alice.publish("note.posted", json.dumps({"text": hostile}))
    assert result.startswith("publish: "), result
    for panel in ("ws", "sse"):
        entry = await until(lambda panel=panel: _find(bob.log(panel), "note.posted", "alice"),
                            10, f"bob sees alice's event on {panel}")
        assert entry.data == {"text": hostile}
    assert await bob.page.locator("img").count() == 0  # shown as text, never as markup
    assert await bob.page.title() != "pwned"

    # Carol is on the node that will die, and nowhere else (she never reconnects).
    async with aiohttp.ClientSession() as session, session.ws_connect(
            f"{victim.url}/v1/sync/ws", protocols=("mm-sync.v1.json",)) as carol:
        await carol.send_json({"op": "auth", "ref": 1, "token": token("carol")})
        await carol.send_json({"op": "join", "ref": 2, "org_id": ORG, "workspace_id": WORKSPACE})
        for _ in range(2):
            assert (await carol.receive_json(timeout=5))["op"] == "reply"
        for page in (alice, bob):
            await until(lambda page=page: _has(page.members("ws"), "carol"), 10, "carol shown")

        # Alice's node leaves in the middle of a stream of events; more follow once it is gone.
        await publish_numbered(survivor, range(KILL_AFTER))
        victim.signal(getattr(signal, how))
        left_at = time.monotonic()
        await publish_numbered(survivor, range(KILL_AFTER, PUBLISHED))
        assert await asyncio.to_thread(victim.wait_exit, 20) in (0, -signal.SIGKILL)
        await publish_numbered(survivor, range(PUBLISHED, PUBLISHED + AFTERWARDS))

    # Carol, who was only on that node, leaves within --node-timeout of its death; after a
    # drain, within --shutdown-delay (5 s: it still serves) + --disconnect-grace. The margin
    # is for the 0.2 s sweeps and a loaded machine.
    gone_within = (victim.node_timeout if how == "SIGKILL" else 5.0 + victim.disconnect_grace) + 4.0
    await until(lambda: _gone(bob.members("ws"), "carol"),
                max(0.1, gone_within - (time.monotonic() - left_at)),
                f"carol gone from bob's page within {gone_within} s of {how}")

    for page in (alice, bob):
        for panel in ("ws", "sse"):
            await until(lambda page=page, panel=panel: _numbered_all(page, panel), 20,
                        f"{page.user}'s {panel} panel has every numbered event")
            log = await page.log(panel)
            assert numbered(log) == list(range(PUBLISHED + AFTERWARDS)), \
                f"{page.user} {panel}: lost or duplicated"
            ids = [entry.id for entry in log if entry.id]
            assert len(ids) == len(set(ids)), f"{page.user} {panel}: an event shown twice"
    assert await alice.node() == survivor.name  # Alice's socket moved to the surviving node

    # Presence converges on both pages: Carol leaves within --node-timeout (3 s here; after
    # a drain, --disconnect-grace: 2 s); Alice, who reconnected at once, never left (no
    # flicker), still viewing doc-7.
    for page in (alice, bob):
        for panel in ("ws", "sse"):
            await until(lambda page=page, panel=panel: _is(page.members(panel),
                        {"alice": "document/doc-7", "bob": ""}), victim.node_timeout + 10,
                        f"{page.user} {panel}: carol gone, alice and bob there")
            log = await page.log(panel)
            left = [entry.data["user_id"] for entry in log if entry.type == "presence.left"]
            assert left == ["carol"], f"{page.user} {panel}: {left}"
    for page in (alice, bob):
        assert page.errors == [], page.errors
    await screenshots(alice.page, f"alice-{how}")
    await screenshots(bob.page, f"bob-{how}")


async def _is(members: Any, expected: dict[str, str]) -> bool:
    return bool(await members == expected)


async def _has(members: Any, user: str) -> bool:
    return user in await members


async def _gone(members: Any, user: str) -> bool:
    return user not in await members


async def _find(log: Any, event_type: str, actor: str) -> Entry | None:
    return next((entry for entry in await log if entry.type == event_type and entry.actor == actor), None)


async def _numbered_all(page: DemoPage, panel: str) -> bool:
    return len(numbered(await page.log(panel))) >= PUBLISHED + AFTERWARDS


# -- origins ---------------------------------------------------------------------------------

PROBE = """async ([gateway, token, ticket]) => {
  const base = `${gateway}/v1/orgs/org-1/workspaces/ws-1/sync`;
  const socket = await new Promise((resolve) => {
    const ws = new WebSocket(`${gateway.replace('http', 'ws')}/v1/sync/ws`, 'mm-sync.v1.json');
    ws.onopen = () => ws.send(JSON.stringify({op: 'auth', ref: 1, token}));
    ws.onmessage = (m) => { resolve('read: ' + JSON.parse(m.data).op); ws.close(); };
    ws.onclose = (c) => resolve('closed ' + c.code);
    setTimeout(() => resolve('timeout'), 5000);
  });
  let fetched;
  try {
    const r = await fetch(`${base}/tickets`, {method: 'POST', headers: {Authorization: `Bearer ${token}`}});
    fetched = 'read: ' + Object.keys(await r.json()).join(',');
  } catch (e) { fetched = 'refused: ' + e.name; }
  const stream = await new Promise((resolve) => {
    const es = new EventSource(`${base}/stream?ticket=${ticket}`);
    es.addEventListener('sync.snapshot', () => { resolve('read: sync.snapshot'); es.close(); });
    es.onerror = () => { resolve('error'); es.close(); };
    setTimeout(() => resolve('timeout'), 5000);
  });
  return {socket, fetched, stream};
}"""


async def test_a_page_from_another_origin_cannot_open_a_socket_or_read_the_stream(
        browser: Any, deployment: Deployment, screenshots: Any) -> None:
    async def page_at(url: str) -> Any:
        page = await (await browser.new_context()).new_page()
        await page.goto(url)
        return page

    async def ticket() -> str:
        async with aiohttp.ClientSession(headers=auth("mallory")) as session, session.post(
                f"{deployment.url}{BASE}/tickets") as response:
            return str((await response.json())["ticket"])

    # A page elsewhere on loopback (another port: another origin), with a valid token and ticket.
    async def front_page(_: web.Request) -> web.Response:
        return web.Response(text="<h1>elsewhere</h1>", content_type="text/html")

    elsewhere = web.Application()
    elsewhere.router.add_get("/", front_page)
    runner = web.AppRunner(elsewhere)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        foreign = await page_at(f"http://127.0.0.1:{port}/")
        seen = await foreign.evaluate(PROBE, [deployment.url, token("mallory"), await ticket()])
        assert seen == {"socket": "closed 1006", "fetched": "refused: TypeError", "stream": "error"}, seen
        await screenshots(foreign, "foreign")
    finally:
        await runner.cleanup()
    # The same code from the allowed origin (the gateway's own page) reads all three.
    allowed = await page_at(f"{deployment.url}/demo/")
    seen = await allowed.evaluate(PROBE, [deployment.url, token("mallory"), await ticket()])
    assert seen == {"socket": "read: reply", "fetched": "read: ticket,expires_in",
                    "stream": "read: sync.snapshot"}, seen
