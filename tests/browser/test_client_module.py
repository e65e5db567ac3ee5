"""The client module itself in real Chromium, imported by a page from the gateway: a fresh
token after ``4401`` on both transports (resuming, not starting over), and a refused token
that never turns into a tight reconnect loop."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.auth import mint_token
from tests.browser.conftest import Deployment
from tests.multinode.harness import ORG, SECRET, token

pytestmark = [pytest.mark.browser, pytest.mark.multinode]

PROBE = """async ([short, fresh, bad]) => {
  const { SyncClient, EventStream } = await import('/client/mm-sync.js');
  const until = (check, ms) => new Promise((resolve, reject) => {
    const started = Date.now();
    const timer = setInterval(() => {
      if (check()) { clearInterval(timer); resolve(); }
      else if (Date.now() - started > ms) { clearInterval(timer); reject(new Error('not in time')); }
    }, 50);
  });
  // The first connection of each gets a token about to expire; every later one a fresh one.
  let wsTokens = 0, esTokens = 0;
  const client = new SyncClient({ url: location.origin, token: () => (wsTokens++ ? fresh : short) });
  const design = client.workspace('org-1', 'ws-1');
  const wsEvents = [], closes = [];
  let wsOpens = 0;
  design.on('event', (event) => wsEvents.push(event.type));
  client.on('disconnect', (close) => closes.push(close.code));
  client.on('open', () => { wsOpens += 1; });
  const stream = new EventStream({ url: location.origin, orgId: 'org-1', workspaceId: 'ws-1',
    token: () => (esTokens++ ? fresh : short), events: ['note.posted'] });
  const esEvents = [];
  let esOpens = 0;
  stream.on('event', (event) => esEvents.push(event.type));
  stream.on('state', (state) => { if (state === 'open') esOpens += 1; });
  await until(() => wsOpens >= 2 && esOpens >= 2, 20000);
  await design.publish('note.posted', { after: 'renewal' });
  await until(() => wsEvents.includes('note.posted') && esEvents.includes('note.posted'), 10000);
  client.close();
  stream.close();

  const refused = new SyncClient({ url: location.origin, token: bad });
  refused.workspace('org-1', 'ws-1');
  let attempts = 0;
  const errors = new Set();
  refused.on('disconnect', () => { attempts += 1; });
  refused.on('error', (error) => errors.add(error.error));
  await new Promise((resolve) => setTimeout(resolve, 4000));
  refused.close();
  return { closes, wsTokens, esTokens, wsEvents, esEvents, attempts, errors: [...errors] };
}"""


async def test_a_fresh_token_after_4401_resumes_and_a_refused_token_backs_off(
        browser: Any, deployment: Deployment, screenshots: Any) -> None:
    page = await (await browser.new_context()).new_page()
    await page.goto(f"{deployment.url}/demo/")
    short = mint_token(SECRET, sub="ada", org_id=ORG, workspaces="*", ttl=2)
    bad = mint_token("another-secret-" + "x" * 32, sub="ada", org_id=ORG, workspaces="*")
    seen = await page.evaluate(PROBE, [short, token("ada"), bad])
    # Each transport was told, closed, came back with a fresh token and resumed where it was:
    # no second snapshot, and the next event exactly once.
    assert seen["closes"] == [4401], seen
    assert seen["wsTokens"] == 2 and seen["esTokens"] == 2, seen
    expected = ["sync.snapshot", "sync.token_expired", "note.posted"]
    assert seen["wsEvents"] == expected and seen["esEvents"] == expected, seen
    # A token that is refused: an error each time, and a few attempts in 4 s, not hundreds.
    assert seen["errors"] == ["AUTHENTICATION_FAILED"], seen
    assert 2 <= seen["attempts"] <= 6, seen
    await screenshots(page, "client")
