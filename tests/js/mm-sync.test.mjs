// Unit tests of the browser client module's decisions (node --test; run by
// tests/test_client_js.py): what it sends, when it reconnects, what state it keeps. The
// socket, EventSource, fetch and the timers are fakes here; tests/browser/ runs the same
// module in real Chromium against real gateways.
import assert from 'node:assert/strict';
import { afterEach, beforeEach, test } from 'node:test';

import { Backoff, EventStream, Presence, SyncClient, SyncError } from '../../gateway/static/client/mm-sync.js';

// -- fakes ----------------------------------------------------------------------------------

class FakeSocket {
  static made = [];

  constructor(url, protocol) {
    this.url = url;
    this.protocol = protocol;
    this.readyState = 0;
    this.sent = [];
    this.closedWith = null;
    FakeSocket.made.push(this);
  }

  send(text) { this.sent.push(JSON.parse(text)); }

  close(code, reason) { this.readyState = 3; this.closedWith = code; }

  open() { this.readyState = 1; this.onopen(); }

  message(body) { this.onmessage({ data: JSON.stringify(body) }); }

  drop(code, reason = '') { this.readyState = 3; this.onclose({ code, reason }); }

  last(op) { return [...this.sent].reverse().find((message) => message.op === op); }

  /** Answer the auth message. */
  authenticate(user = 'ada') {
    const auth = this.last('auth');
    this.message({ op: 'reply', ref: auth.ref, data: { user_id: user, org_id: 'acme', node_id: 'n1' } });
  }
}

let timers;
let now;
const realSetTimeout = globalThis.setTimeout;
const realClearTimeout = globalThis.clearTimeout;
const realSetInterval = globalThis.setInterval;
const realClearInterval = globalThis.clearInterval;
const realNow = Date.now;

beforeEach(() => {
  FakeSocket.made = [];
  timers = [];
  now = 1_000_000;
  let id = 0;
  globalThis.setTimeout = (fn, delay) => { timers.push({ id: ++id, fn, delay, repeat: false }); return id; };
  globalThis.setInterval = (fn, delay) => { timers.push({ id: ++id, fn, delay, repeat: true }); return id; };
  globalThis.clearTimeout = globalThis.clearInterval = (handle) => {
    timers = timers.filter((timer) => timer.id !== handle);
  };
  Date.now = () => now;
});

afterEach(() => {
  globalThis.setTimeout = realSetTimeout;
  globalThis.clearTimeout = realClearTimeout;
  globalThis.setInterval = realSetInterval;
  globalThis.clearInterval = realClearInterval;
  Date.now = realNow;
});

const settle = () => new Promise((resolve) => setImmediate(resolve));

/** The pending one-shot timer (the reconnect wait): its delay, then run it. */
async function fireReconnect() {
  const timer = timers.find((item) => !item.repeat);
  assert.ok(timer, 'a reconnect is scheduled');
  timers = timers.filter((item) => item !== timer);
  timer.fn();
  await settle();
  return timer.delay;
}

async function connected(options = {}) {
  const tokens = [];
  const client = new SyncClient({
    url: 'https://sync.example.com', WebSocket: FakeSocket,
    token: () => { tokens.push(tokens.length); return `token-${tokens.length}`; }, ...options,
  });
  const workspace = client.workspace('acme', 'design');
  await settle();
  const socket = FakeSocket.made.at(-1);
  socket.open();
  socket.authenticate();
  return { client, workspace, socket, tokens };
}

function event(socket, id, type, data = {}) {
  socket.message({ op: 'event', event: { id, type, org_id: 'acme', workspace_id: 'design', actor: {}, data } });
}

// -- SyncClient -----------------------------------------------------------------------------

test('authenticates with its first message, then subscribes', async () => {
  const { socket } = await connected();
  assert.equal(socket.url, 'wss://sync.example.com/v1/sync/ws');
  assert.equal(socket.protocol, 'mm-sync.v1.json');
  assert.deepEqual(socket.sent.map((message) => message.op), ['auth', 'subscribe']);
  assert.equal(socket.sent[0].token, 'token-1');
  const subscribe = socket.sent[1];
  assert.deepEqual([subscribe.org_id, subscribe.workspace_id, subscribe.since], ['acme', 'design', undefined]);
});

test('resumes each workspace after its last event id on the next socket', async () => {
  const { client, socket } = await connected();
  const other = client.workspace('acme', 'other');
  event(socket, 'e:1-0', 'sync.snapshot', { members: [] });
  event(socket, 'e:2-0', 'doc.updated');
  socket.drop(1006);
  await fireReconnect();
  const next = FakeSocket.made.at(-1);
  next.open();
  next.authenticate();
  const subscribes = next.sent.filter((message) => message.op === 'subscribe');
  assert.deepEqual(subscribes.map((message) => [message.workspace_id, message.since]),
    [['design', 'e:2-0'], ['other', undefined]]);
  assert.equal(other.lastEventId, null);
});

test('a socket that lived reconnects at once; early failures back off, capped, never zero', async () => {
  const { socket } = await connected({ backoff: { initial: 500, max: 4000 } });
  now += 60_000; // up for a minute
  socket.drop(1012, 'node draining');
  const quick = await fireReconnect();
  assert.ok(quick >= 0 && quick < 250, `drain: ${quick}`);
  const delays = [];
  for (let attempt = 0; attempt < 6; attempt += 1) {
    const failing = FakeSocket.made.at(-1);
    failing.drop(1006); // refused before it opened
    delays.push(await fireReconnect());
  }
  const caps = [500, 1000, 2000, 4000, 4000, 4000];
  delays.forEach((delay, index) => {
    assert.ok(delay >= caps[index] / 2 && delay <= caps[index], `attempt ${index}: ${delay}`);
  });
});

test('a drain (1012) reconnects at once even right after the socket opened; a refusal then backs off', async () => {
  const { socket } = await connected();
  socket.drop(1012, 'node draining'); // no time has passed since it was authenticated
  const quick = await fireReconnect();
  assert.ok(quick < 250, `drain: ${quick}`);
  FakeSocket.made.at(-1).drop(1006); // the draining node refused the new one
  assert.ok((await fireReconnect()) >= 250);
  FakeSocket.made.at(-1).drop(1012); // never authenticated: no 1012 shortcut
  assert.ok((await fireReconnect()) >= 500);
});

test('4401 gets a fresh token from the callback; a refused token backs off', async () => {
  const { socket, tokens } = await connected();
  now += 10_000;
  event(socket, 'e:5-0', 'sync.token_expired');
  socket.drop(4401, 'token expired');
  await fireReconnect();
  let next = FakeSocket.made.at(-1);
  next.open();
  assert.equal(next.last('auth').token, 'token-2');
  assert.equal(tokens.length, 2);
  // this one is refused: 401 error, close 4401 right away -> a backoff, not a loop
  next.message({ op: 'error', ref: next.last('auth').ref, error: { error: 'AUTHENTICATION_FAILED', status_code: 401 } });
  next.drop(4401);
  const delay = await fireReconnect();
  assert.ok(delay >= 250, `${delay}`);
  next = FakeSocket.made.at(-1);
  next.open();
  assert.equal(next.last('auth').token, 'token-3');
});

test('a subscribe refused for now is asked again; one refused for good is dropped', async () => {
  const { client, socket } = await connected();
  const errors = [];
  client.on('error', (error) => errors.push(error.status_code));
  const busy = socket.last('subscribe');
  socket.message({ op: 'error', ref: busy.ref, error: { error: 'SERVICE_UNAVAILABLE', status_code: 503 } });
  const retry = timers.find((timer) => !timer.repeat);
  assert.ok(retry.delay >= 500 && retry.delay <= 1500, `${retry.delay}`);
  await fireReconnect(); // (the one-shot timer: here, the subscribe's retry)
  const again = socket.last('subscribe');
  assert.notEqual(again.ref, busy.ref);
  assert.equal(again.workspace_id, 'design');
  const secret = client.workspace('acme', 'secret');
  const refused = socket.last('subscribe');
  assert.equal(refused.workspace_id, 'secret');
  socket.message({ op: 'error', ref: refused.ref, error: { error: 'RESOURCE_NOT_FOUND', status_code: 404 } });
  assert.equal(timers.filter((timer) => !timer.repeat).length, 0);
  assert.deepEqual(errors, [503, 404]);
  socket.message({ op: 'event', event: { id: '1', type: 'sync.snapshot', org_id: 'acme', workspace_id: 'secret', data: { members: [] } } });
  assert.equal(secret.lastEventId, null); // no longer followed
});

test('unsubscribing while the subscribe is unanswered still unsubscribes', async () => {
  const { client, workspace, socket } = await connected();
  const closing = workspace.close();
  await settle();
  const unsubscribe = socket.last('unsubscribe');
  assert.equal(unsubscribe.workspace_id, 'design');
  socket.message({ op: 'reply', ref: unsubscribe.ref, data: { subscribed: false } });
  await closing;
  assert.equal(client.state, 'open');
});

test('calls resolve with the reply and reject with the error body', async () => {
  const { workspace, socket } = await connected();
  const joined = workspace.join();
  const join = socket.last('join');
  socket.message({ op: 'reply', ref: join.ref, data: { user_id: 'ada', present: true } });
  assert.deepEqual(await joined, { user_id: 'ada', present: true });
  const refused = workspace.publish('doc.updated', { a: 1 });
  const publish = socket.last('publish');
  const body = { error: 'FORBIDDEN', message: 'no', details: { required_permission: 'events:publish' },
    timestamp: '2025-01-01T00:00:00.000000', status_code: 403 };
  socket.message({ op: 'error', ref: publish.ref, error: body });
  await assert.rejects(refused, (error) => error instanceof SyncError && error.error === 'FORBIDDEN'
    && error.status_code === 403 && error.details.required_permission === 'events:publish'
    && error.body.message === 'no');
});

test('a publish cut off by a close is sent again with the same idempotency key', async () => {
  const { workspace, socket } = await connected();
  const published = workspace.publish('doc.updated', { a: 1 });
  const first = socket.last('publish');
  assert.match(first.idempotency_key, /^[0-9a-f]{32}$/);
  socket.drop(1006);
  await fireReconnect();
  const next = FakeSocket.made.at(-1);
  next.open();
  next.authenticate();
  const again = next.last('publish');
  assert.equal(again.idempotency_key, first.idempotency_key);
  next.message({ op: 'reply', ref: again.ref, data: { id: 'e:9-0', type: 'doc.updated' } });
  assert.equal((await published).id, 'e:9-0');
});

test('what the page asked for (viewing, joined) is asserted again on the next socket', async () => {
  const { workspace, socket } = await connected();
  workspace.viewing('document', 'doc-1');
  socket.message({ op: 'reply', ref: socket.last('viewing').ref, data: {} });
  socket.drop(1006);
  await fireReconnect();
  const next = FakeSocket.made.at(-1);
  next.open();
  next.authenticate();
  assert.deepEqual(next.sent.map((message) => message.op), ['auth', 'subscribe', 'viewing']);
  assert.equal(next.last('viewing').resource_id, 'doc-1');
  workspace.leave();
  next.message({ op: 'reply', ref: next.last('leave').ref, data: {} });
  next.drop(1006);
  await fireReconnect();
  const third = FakeSocket.made.at(-1);
  third.open();
  third.authenticate();
  assert.deepEqual(third.sent.map((message) => message.op), ['auth', 'subscribe']);
});

test('an unanswered ping replaces the socket (half-open)', async () => {
  const { socket } = await connected({ heartbeatMs: 1000 });
  const heartbeat = timers.find((timer) => timer.repeat);
  heartbeat.fn();
  const ping = socket.last('ping');
  socket.message({ op: 'pong', ref: ping.ref });
  heartbeat.fn(); // answered: another ping
  assert.equal(socket.sent.filter((message) => message.op === 'ping').length, 2);
  heartbeat.fn(); // not answered
  assert.equal(socket.closedWith, 4000);
  await fireReconnect();
  assert.equal(FakeSocket.made.length, 2);
});

test('close() rejects what is pending and stops for good', async () => {
  const { client, workspace, socket } = await connected();
  const joined = workspace.join();
  client.close();
  await assert.rejects(joined, (error) => error.error === 'CLIENT_CLOSED');
  assert.equal(socket.closedWith, 1000);
  assert.equal(client.state, 'closed');
  assert.equal(timers.filter((timer) => !timer.repeat).length, 0);
});

// -- Presence -------------------------------------------------------------------------------

test('presence follows the snapshot and the presence events, and is rebuilt on reset', () => {
  const presence = new Presence();
  const ada = { user_id: 'ada', viewing: [] };
  presence.apply({ id: '1', type: 'sync.snapshot', data: { members: [ada] } });
  presence.apply({ id: '2', type: 'presence.joined', data: { user_id: 'bob', viewing: [] } });
  presence.apply({ id: '3', type: 'presence.viewing',
    data: { user_id: 'bob', viewing: [{ resource_type: 'document', resource_id: 'd1' }] } });
  assert.deepEqual(presence.list().map((member) => member.user_id), ['ada', 'bob']);
  assert.deepEqual(presence.viewers('document', 'd1').map((member) => member.user_id), ['bob']);
  assert.equal(presence.apply({ id: '4', type: 'presence.left', data: { user_id: 'ada' } }), true);
  assert.deepEqual(presence.list().map((member) => member.user_id), ['bob']);
  presence.apply({ id: 'x', type: 'sync.reset', data: {} });
  assert.deepEqual(presence.list(), []);
  assert.equal(presence.lastEventId, 'x');
});

test('Backoff: equal jitter within [cap/2, cap], reset starts over', () => {
  const low = new Backoff({ initial: 100, max: 800, random: () => 0 });
  const high = new Backoff({ initial: 100, max: 800, random: () => 1 });
  assert.deepEqual([1, 2, 3, 4, 5].map(() => low.next()), [50, 100, 200, 400, 400]);
  assert.deepEqual([1, 2, 3, 4, 5].map(() => high.next()), [100, 200, 400, 800, 800]);
  low.reset();
  assert.equal(low.next(), 50);
});

// -- EventStream ----------------------------------------------------------------------------

class FakeEventSource {
  static made = [];

  constructor(url) {
    this.url = new URL(url);
    this.listeners = new Map();
    this.closed = false;
    FakeEventSource.made.push(this);
  }

  addEventListener(type, listener) { this.listeners.set(type, listener); }

  close() { this.closed = true; }

  emit(type, envelope) { this.listeners.get(type)?.({ data: JSON.stringify(envelope) }); }
}

function ticketFetch(answers) {
  const calls = [];
  const fetch = async (url, init) => {
    calls.push({ url, init });
    const [status, body] = answers.length > 1 ? answers.shift() : answers[0];
    return { ok: status < 300, status, json: async () => body };
  };
  return { fetch, calls };
}

test('EventStream: a fresh ticket for every connection, resuming with last_event_id', async () => {
  FakeEventSource.made = [];
  const { fetch, calls } = ticketFetch([[200, { ticket: 't1' }], [200, { ticket: 't2' }]]);
  let tokens = 0;
  const stream = new EventStream({ url: 'https://sync.example.com', orgId: 'acme', workspaceId: 'design',
    token: () => `token-${++tokens}`, events: ['doc.updated'], EventSource: FakeEventSource, fetch });
  await settle();
  const first = FakeEventSource.made[0];
  assert.equal(first.url.pathname, '/v1/orgs/acme/workspaces/design/sync/stream');
  assert.equal(first.url.searchParams.get('ticket'), 't1');
  assert.equal(first.url.searchParams.get('last_event_id'), null);
  assert.equal(calls[0].init.headers.Authorization, 'Bearer token-1');
  const seen = [];
  stream.on('event', (envelope) => seen.push(envelope.type));
  first.onopen();
  first.emit('sync.snapshot', { id: 'e:1-0', type: 'sync.snapshot', data: { members: [] } });
  first.emit('doc.updated', { id: 'e:2-0', type: 'doc.updated', data: {} });
  now += 30_000;
  first.onerror(); // the stream ended: the browser would retry with the spent ticket
  assert.equal(first.closed, true);
  await fireReconnect();
  const second = FakeEventSource.made[1];
  assert.equal(second.url.searchParams.get('ticket'), 't2');
  assert.equal(second.url.searchParams.get('last_event_id'), 'e:2-0');
  assert.equal(calls[1].init.headers.Authorization, 'Bearer token-2');
  assert.deepEqual(seen, ['sync.snapshot', 'doc.updated']);
  stream.close();
});

test('EventStream: a ticket refused for good stops it; a 503 is retried', async () => {
  FakeEventSource.made = [];
  const notFound = { error: 'RESOURCE_NOT_FOUND', details: { resource_type: 'workspace' }, status_code: 404 };
  const { fetch } = ticketFetch([[404, notFound]]);
  const errors = [];
  const stream = new EventStream({ url: 'https://sync.example.com', orgId: 'acme', workspaceId: 'gone',
    token: 'x', EventSource: FakeEventSource, fetch });
  stream.on('error', (error) => errors.push(error.error));
  await settle();
  assert.deepEqual(errors, ['RESOURCE_NOT_FOUND']);
  assert.equal(stream.state, 'closed');
  assert.equal(timers.length, 0);

  const busy = ticketFetch([[503, { error: 'SERVICE_UNAVAILABLE', status_code: 503 }], [200, { ticket: 't' }]]);
  const retried = new EventStream({ url: 'https://sync.example.com', orgId: 'acme', workspaceId: 'design',
    token: 'x', EventSource: FakeEventSource, fetch: busy.fetch });
  await settle();
  assert.ok((await fireReconnect()) >= 250);
  assert.equal(FakeEventSource.made.length, 1);
  retried.close();
});
