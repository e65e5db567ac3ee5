// mm-sync.js: the MechaMental Workspace Sync client for web pages. An ES module with no
// dependencies, served by every gateway at /client/mm-sync.js. Guide: docs/client.md;
// protocol: docs/websocket.md.
//
//   SyncClient   one WebSocket (mm-sync.v1.json) for any number of workspaces: first-message
//                auth, per-workspace resume with `since` after any close, capped jittered
//                backoff, presence state, join/leave/viewing/publish as promises.
//   EventStream  one workspace over EventSource: a fresh single-use ticket for every
//                (re)connect, resuming with last_event_id; presence calls over REST.
//
// Both keep a workspace's presence and last event id in the same `Presence` (below).

export const SUBPROTOCOL = 'mm-sync.v1.json';
export const CLOSE_DRAINING = 1012;
export const CLOSE_UNAUTHORIZED = 4401;
const CLOSE_HEARTBEAT = 4000; // our own close: a ping went unanswered
const STABLE_MS = 1000; // a connection that lasted this long reconnects at once (with jitter)
const QUICK_JITTER_MS = 250;
const RESUBSCRIBE_MS = 1000; // a subscribe refused for now is asked again after 0.5-1.5 s
const REFUSED_FOR_GOOD = [403, 404, 422];

/** Error of a rejected call: the gateway's error body (REST envelope, or the 422 `detail`
 * shape) with its fields on the error itself: `err.error`, `err.status_code`, `err.details`. */
export class SyncError extends Error {
  constructor(body) {
    const message = body.message ?? (body.detail ? 'Validation failed' : 'Request failed');
    super(message);
    this.name = 'SyncError';
    this.body = body;
    Object.assign(this, body);
    this.message = message;
    if (this.status_code === undefined) this.status_code = body.detail ? 422 : 0;
    if (this.error === undefined && body.detail) this.error = 'VALIDATION_FAILED';
  }
}

function clientError(code, message) {
  return new SyncError({ error: code, message, details: {}, timestamp: null, status_code: 0 });
}

/** Capped exponential backoff with "equal jitter": the n-th delay lies in [cap/2, cap],
 * cap = min(max, initial * 2^n). Never zero, so a failing server is never hammered. */
export class Backoff {
  constructor({ initial = 500, max = 30000, random = Math.random } = {}) {
    this.initial = initial;
    this.max = max;
    this.random = random;
    this.attempt = 0;
  }

  next() {
    const cap = Math.min(this.max, this.initial * 2 ** this.attempt);
    this.attempt = Math.min(this.attempt + 1, 32);
    return Math.round(cap / 2 + (this.random() * cap) / 2);
  }

  reset() {
    this.attempt = 0;
  }
}

/** A tiny event emitter: `on(type, fn)` returns a function that removes `fn`. */
class Emitter {
  #listeners = new Map();

  on(type, listener) {
    if (!this.#listeners.has(type)) this.#listeners.set(type, new Set());
    this.#listeners.get(type).add(listener);
    return () => this.off(type, listener);
  }

  off(type, listener) {
    this.#listeners.get(type)?.delete(listener);
  }

  emit(type, ...args) {
    for (const listener of [...(this.#listeners.get(type) ?? [])]) {
      try {
        listener(...args);
      } catch (error) {
        setTimeout(() => { throw error; }); // a listener's bug must not stop the client
      }
    }
  }
}

/** A workspace's members, kept from the `sync.snapshot` and the `presence.*` events and
 * rebuilt after `sync.reset`; and the id of the last event seen (the resume point). */
export class Presence {
  constructor() {
    this.members = new Map(); // user_id -> member {user_id, actor, viewing, joined_at}
    this.lastEventId = null;
  }

  /** Apply one event; true when the member list changed. */
  apply(envelope) {
    if (typeof envelope.id === 'string') this.lastEventId = envelope.id;
    const data = envelope.data ?? {};
    switch (envelope.type) {
      case 'sync.snapshot':
        this.members = new Map((data.members ?? []).map((member) => [member.user_id, member]));
        return true;
      case 'sync.reset':
        this.members = new Map(); // a fresh snapshot follows
        return true;
      case 'presence.joined':
      case 'presence.viewing':
        this.members.set(data.user_id, data);
        return true;
      case 'presence.left':
        return this.members.delete(data.user_id);
      default:
        return false;
    }
  }

  /** The members, ordered by user id. */
  list() {
    return [...this.members.values()].sort((a, b) => (a.user_id < b.user_id ? -1 : 1));
  }

  /** Who is viewing one resource. */
  viewers(resourceType, resourceId) {
    return this.list().filter((member) => (member.viewing ?? []).some(
      (item) => item.resource_type === resourceType && item.resource_id === resourceId));
  }
}

function workspaceKey(orgId, workspaceId) {
  return JSON.stringify([orgId, workspaceId]);
}

async function resolveToken(token) {
  const value = typeof token === 'function' ? await token() : token;
  if (typeof value !== 'string' || value === '') throw clientError('NO_TOKEN', 'no token to connect with');
  return value;
}

function randomKey() {
  const bytes = new Uint8Array(16);
  globalThis.crypto.getRandomValues(bytes);
  return Array.from(bytes, (byte) => byte.toString(16).padStart(2, '0')).join('');
}

/** ws(s)://host/v1/sync/ws from an http(s) or ws(s) base URL (a bare origin or a full URL). */
function socketUrl(url) {
  const parsed = new URL(url, globalThis.location?.href);
  if (parsed.protocol === 'http:') parsed.protocol = 'ws:';
  if (parsed.protocol === 'https:') parsed.protocol = 'wss:';
  if (parsed.pathname === '/' || parsed.pathname === '') parsed.pathname = '/v1/sync/ws';
  return parsed.toString();
}

/** http(s)://host from the same kinds of URL. */
function httpOrigin(url) {
  const parsed = new URL(url, globalThis.location?.href);
  if (parsed.protocol === 'ws:') parsed.protocol = 'http:';
  if (parsed.protocol === 'wss:') parsed.protocol = 'https:';
  return parsed.origin;
}

function workspacePath(orgId, workspaceId) {
  return `/v1/orgs/${encodeURIComponent(orgId)}/workspaces/${encodeURIComponent(workspaceId)}/sync`;
}

/** What both transports share for one workspace: its presence, its resume point, and the
 * events `event` (every envelope, sync.* included), `presence` (member list changed),
 * `reset` (history was lost: state rebuilt from the snapshot that follows). */
class WorkspaceFeed extends Emitter {
  constructor(orgId, workspaceId, since) {
    super();
    this.orgId = orgId;
    this.workspaceId = workspaceId;
    this.presence = new Presence();
    this.presence.lastEventId = since ?? null;
  }

  get lastEventId() {
    return this.presence.lastEventId;
  }

  get members() {
    return this.presence.list();
  }

  receive(envelope) {
    const changed = this.presence.apply(envelope);
    if (envelope.type === 'sync.reset') this.emit('reset', envelope.data);
    this.emit('event', envelope);
    if (changed) this.emit('presence', this.presence.list());
  }
}

/** One workspace on a `SyncClient`. Calls resolve with the reply's `data` or reject with a
 * `SyncError`. What it asked for (joined, viewing) is asserted again after a reconnect. */
export class Workspace extends WorkspaceFeed {
  #client;

  constructor(client, orgId, workspaceId, since) {
    super(orgId, workspaceId, since);
    this.#client = client;
    this.joined = false; // what this page asked for, re-asserted after every reconnect
    this.viewingResource = null;
    this.subscribed = false;
  }

  join() {
    this.joined = true;
    return this.#call('join');
  }

  leave() {
    this.joined = false;
    this.viewingResource = null;
    return this.#call('leave');
  }

  viewing(resourceType, resourceId) {
    this.joined = true;
    this.viewingResource = { resource_type: resourceType, resource_id: resourceId };
    return this.#call('viewing', this.viewingResource);
  }

  /** Publish an event. The call carries an idempotency key, so a retry after a reconnect
   * appends it once and resolves with the original envelope. */
  publish(type, data = {}, { idempotencyKey = randomKey() } = {}) {
    return this.#call('publish', { type, data, idempotency_key: idempotencyKey });
  }

  /** Leave (if joined) and stop following this workspace. */
  async close() {
    await this.#client.unsubscribe(this);
  }

  #call(op, fields = {}) {
    return this.#client.request(op, { org_id: this.orgId, workspace_id: this.workspaceId, ...fields });
  }
}

/**
 * The WebSocket client. Events: `state` ('connecting' | 'open' | 'closed'), `open`
 * ({user_id, org_id, node_id, expires_at}), `disconnect` ({code, reason}), `error`
 * (SyncError: a refused subscribe, a bad token...).
 *
 *   const client = new SyncClient({ url: 'https://sync.example.com', token: getToken });
 *   const design = client.workspace('acme', 'design');
 *   design.on('event', (event) => ...); design.on('presence', (members) => ...);
 *   await design.join();
 */
export class SyncClient extends Emitter {
  #url;
  #token;
  #backoff;
  #heartbeatMs;
  #WebSocket;
  #socket = null;
  #state = 'idle';
  #stopped = false;
  #ref = 0;
  #pending = new Map(); // ref -> {op, fields, resolve, reject, internal}
  #queue = []; // calls waiting for an authenticated socket
  #workspaces = new Map();
  #timer = null;
  #heartbeat = null;
  #awaitingPong = false;
  #openedAt = 0;
  #online = () => this.#reconnectNow();

  constructor({ url, token, backoff = {}, heartbeatMs = 25000, WebSocket: Impl = globalThis.WebSocket } = {}) {
    super();
    if (!url) throw new TypeError('SyncClient needs a url');
    if (!token) throw new TypeError('SyncClient needs a token (a string or a function returning one)');
    this.#url = socketUrl(url);
    this.#token = token;
    this.#backoff = backoff instanceof Backoff ? backoff : new Backoff(backoff);
    this.#heartbeatMs = heartbeatMs;
    this.#WebSocket = Impl;
    globalThis.addEventListener?.('online', this.#online);
  }

  get state() {
    return this.#state;
  }

  /** Follow a workspace; `since` resumes after an event id this page stored earlier. */
  workspace(orgId, workspaceId, { since } = {}) {
    const key = workspaceKey(orgId, workspaceId);
    let workspace = this.#workspaces.get(key);
    if (!workspace) {
      workspace = new Workspace(this, orgId, workspaceId, since);
      this.#workspaces.set(key, workspace);
      if (this.#state === 'open') this.#subscribe(workspace);
    }
    this.connect();
    return workspace;
  }

  /** Start connecting (done by `workspace()` too). */
  connect() {
    if (this.#stopped) throw clientError('CLIENT_CLOSED', 'this client was closed');
    if (this.#state === 'idle') this.#open();
    return this;
  }

  /** Close for good: pending calls reject with CLIENT_CLOSED. */
  close() {
    this.#stopped = true;
    clearTimeout(this.#timer);
    this.#stopHeartbeat();
    globalThis.removeEventListener?.('online', this.#online);
    const socket = this.#socket;
    this.#socket = null;
    if (socket) socket.close(1000, 'client closed');
    const error = clientError('CLIENT_CLOSED', 'the client was closed');
    for (const call of [...this.#pending.values(), ...this.#queue]) call.reject(error);
    this.#pending.clear();
    this.#queue = [];
    this.#setState('closed');
  }

  /** Send one client message; resolves with the reply's data, rejects with a SyncError.
   * Calls made while disconnected are sent once the socket is authenticated again. */
  request(op, fields = {}) {
    return new Promise((resolve, reject) => {
      if (this.#stopped) {
        reject(clientError('CLIENT_CLOSED', 'the client was closed'));
        return;
      }
      const call = { op, fields, resolve, reject, internal: false };
      if (this.#state === 'open') this.#send(call);
      else this.#queue.push(call);
      this.connect();
    });
  }

  async unsubscribe(workspace) {
    const key = workspaceKey(workspace.orgId, workspace.workspaceId);
    if (this.#workspaces.get(key) !== workspace) return;
    if (workspace.joined) await workspace.leave().catch(() => {});
    this.#workspaces.delete(key);
    workspace.subscribed = false;
    // Also when its subscribe is still unanswered: the gateway answers in order.
    if (this.#state === 'open') {
      await this.request('unsubscribe', { org_id: workspace.orgId, workspace_id: workspace.workspaceId })
        .catch(() => {});
    }
  }

  #setState(state) {
    if (this.#state === state) return;
    this.#state = state;
    this.emit('state', state);
  }

  async #open() {
    this.#setState('connecting');
    let token;
    try {
      token = await resolveToken(this.#token);
    } catch (error) {
      this.emit('error', error instanceof SyncError ? error : clientError('NO_TOKEN', String(error)));
      this.#retry(this.#backoff.next());
      return;
    }
    if (this.#stopped) return;
    const socket = new this.#WebSocket(this.#url, SUBPROTOCOL);
    this.#socket = socket;
    socket.onopen = () => {
      this.#openedAt = 0;
      this.#sendRaw(socket, { op: 'auth', ref: this.#nextRef({ op: 'auth', internal: true,
        resolve: (data) => this.#authenticated(socket, data),
        reject: (error) => this.emit('error', error) }), token });
    };
    socket.onmessage = (message) => this.#receive(socket, message.data);
    socket.onclose = (close) => this.#closed(socket, close);
    socket.onerror = () => {}; // a close always follows
  }

  #nextRef(call) {
    this.#ref += 1;
    this.#pending.set(this.#ref, call);
    return this.#ref;
  }

  #send(call) {
    const ref = this.#nextRef(call);
    this.#sendRaw(this.#socket, { op: call.op, ref, ...call.fields });
  }

  #sendRaw(socket, message) {
    if (socket && socket.readyState === 1) socket.send(JSON.stringify(message));
  }

  #authenticated(socket, data) {
    if (socket !== this.#socket) return;
    this.#openedAt = Date.now();
    this.#backoff.reset();
    this.#setState('open');
    this.emit('open', data);
    for (const workspace of this.#workspaces.values()) this.#subscribe(workspace);
    const queued = this.#queue;
    this.#queue = [];
    for (const call of queued) this.#send(call);
    this.#startHeartbeat(socket);
  }

  #subscribe(workspace) {
    const socket = this.#socket;
    const fields = { org_id: workspace.orgId, workspace_id: workspace.workspaceId };
    const since = workspace.lastEventId;
    this.#send({ op: 'subscribe', internal: true,
      fields: since ? { ...fields, since } : fields,
      resolve: (data) => {
        workspace.subscribed = true;
        workspace.emit('subscribed', data);
      },
      reject: (error) => {
        if (this.#stopped) return; // close() rejects what is pending: nothing went wrong
        workspace.emit('error', error);
        this.emit('error', error);
        const key = workspaceKey(workspace.orgId, workspace.workspaceId);
        if (REFUSED_FOR_GOOD.includes(error.status_code)) {
          this.#workspaces.delete(key); // 403, 404, 422: a retry cannot heal it
          return;
        }
        // 503 (backend down, draining), 429, 500: ask again on this socket a little later.
        setTimeout(() => {
          if (socket === this.#socket && this.#workspaces.get(key) === workspace && !workspace.subscribed) {
            this.#subscribe(workspace);
          }
        }, RESUBSCRIBE_MS / 2 + Math.random() * RESUBSCRIBE_MS);
      } });
    // What the page asked for, asserted again on this socket (its session ended with the
    // last one): viewing implies joined.
    const ignore = () => {};
    if (workspace.viewingResource) {
      this.#send({ op: 'viewing', fields: { ...fields, ...workspace.viewingResource }, internal: true,
        resolve: ignore, reject: (error) => workspace.emit('error', error) });
    } else if (workspace.joined) {
      this.#send({ op: 'join', fields, internal: true,
        resolve: ignore, reject: (error) => workspace.emit('error', error) });
    }
  }

  #receive(socket, raw) {
    if (socket !== this.#socket) return;
    let message;
    try {
      message = JSON.parse(raw);
    } catch {
      return;
    }
    switch (message.op) {
      case 'event': {
        const event = message.event ?? {};
        this.#workspaces.get(workspaceKey(event.org_id, event.workspace_id))?.receive(event);
        break;
      }
      case 'reply':
      case 'error':
      case 'pong': {
        const call = this.#pending.get(message.ref);
        if (message.op === 'pong') this.#awaitingPong = false;
        if (!call) {
          if (message.op === 'error') this.emit('error', new SyncError(message.error ?? {}));
          break;
        }
        this.#pending.delete(message.ref);
        if (message.op === 'error') call.reject(new SyncError(message.error ?? {}));
        else call.resolve(message.data ?? {});
        break;
      }
      default:
        break;
    }
  }

  #closed(socket, close) {
    if (socket !== this.#socket) return;
    this.#socket = null;
    this.#stopHeartbeat();
    // Calls sent on that socket and not answered go again on the next one (publish carries
    // an idempotency key); internal ones (auth, subscribe, re-join) are made afresh.
    const unanswered = [...this.#pending.values()].filter((call) => !call.internal);
    this.#pending.clear();
    this.#queue = [...unanswered, ...this.#queue];
    for (const workspace of this.#workspaces.values()) workspace.subscribed = false;
    if (this.#stopped) return;
    this.#setState('connecting');
    this.emit('disconnect', { code: close.code, reason: close.reason });
    const authenticated = this.#openedAt > 0;
    const stable = authenticated && Date.now() - this.#openedAt >= STABLE_MS;
    this.#openedAt = 0; // the next socket has to earn it again
    // A drain (1012: a node says so once, to a socket it had accepted; a draining node
    // refuses new ones) or a long-lived socket's loss: reconnect at once, with jitter so a
    // node's clients do not all arrive together. Anything else, or a socket that failed
    // early (refused, bad token, 4401 again): back off.
    const quick = stable || (authenticated && close.code === CLOSE_DRAINING);
    const delay = quick ? Math.random() * QUICK_JITTER_MS : this.#backoff.next();
    this.#retry(delay);
  }

  #retry(delay) {
    clearTimeout(this.#timer);
    this.#timer = setTimeout(() => {
      this.#timer = null;
      if (!this.#stopped) this.#open();
    }, delay);
  }

  #reconnectNow() {
    if (this.#timer !== null && !this.#stopped) this.#retry(0);
  }

  #startHeartbeat(socket) {
    this.#stopHeartbeat();
    this.#awaitingPong = false;
    this.#heartbeat = setInterval(() => {
      if (this.#awaitingPong) {
        socket.close(CLOSE_HEARTBEAT, 'ping not answered'); // a half-open socket
        this.#closed(socket, { code: CLOSE_HEARTBEAT, reason: 'ping not answered' });
        return;
      }
      this.#awaitingPong = true;
      this.#send({ op: 'ping', fields: {}, internal: true, resolve: () => {}, reject: () => {} });
    }, this.#heartbeatMs);
  }

  #stopHeartbeat() {
    clearInterval(this.#heartbeat);
    this.#heartbeat = null;
  }
}

const ALWAYS = ['sync.snapshot', 'sync.reset', 'sync.token_expired',
  'presence.joined', 'presence.left', 'presence.viewing', 'message'];

/**
 * One workspace over EventSource (for pages that only read). Events as `Workspace`'s,
 * plus `state` and `error`. EventSource delivers a named event only to listeners of that
 * name: list the published types the page handles in `events` (or call `listen(type)`).
 *
 *   const stream = new EventStream({ url: 'https://sync.example.com', orgId: 'acme',
 *     workspaceId: 'design', token: getToken, events: ['doc.updated'] });
 */
export class EventStream extends WorkspaceFeed {
  #origin;
  #token;
  #backoff;
  #types;
  #timeout;
  #EventSource;
  #fetch;
  #source = null;
  #state = 'idle';
  #stopped = false;
  #timer = null;
  #openedAt = 0;

  constructor({ url, orgId, workspaceId, token, events = [], since, timeout, backoff = {},
    EventSource: Impl = globalThis.EventSource, fetch: fetchImpl = globalThis.fetch?.bind(globalThis) } = {}) {
    super(orgId, workspaceId, since);
    if (!url || !orgId || !workspaceId || !token) {
      throw new TypeError('EventStream needs url, orgId, workspaceId and token');
    }
    this.#origin = httpOrigin(url);
    this.#token = token;
    this.#types = new Set([...ALWAYS, ...events]);
    this.#timeout = timeout;
    this.#backoff = backoff instanceof Backoff ? backoff : new Backoff(backoff);
    this.#EventSource = Impl;
    this.#fetch = fetchImpl;
    this.#open();
  }

  get state() {
    return this.#state;
  }

  /** Also deliver events of this published type (from now on). */
  listen(type) {
    if (this.#types.has(type)) return;
    this.#types.add(type);
    this.#source?.addEventListener(type, this.#onEvent);
  }

  close() {
    this.#stopped = true;
    clearTimeout(this.#timer);
    this.#source?.close();
    this.#source = null;
    this.#setState('closed');
  }

  // The presence calls and publishing, over REST with the same token.
  join() { return this.#rest('POST', '/presence/join'); }

  leave() { return this.#rest('POST', '/presence/leave'); }

  viewing(resourceType, resourceId) {
    const query = new URLSearchParams({ resource_type: resourceType, resource_id: resourceId });
    return this.#rest('POST', `/presence/viewing?${query}`);
  }

  publish(type, data = {}, { idempotencyKey = randomKey() } = {}) {
    return this.#rest('POST', '/events', { type, data }, { 'Idempotency-Key': idempotencyKey });
  }

  #onEvent = (message) => {
    let envelope;
    try {
      envelope = JSON.parse(message.data);
    } catch {
      return;
    }
    this.receive(envelope);
  };

  #setState(state) {
    if (this.#state === state) return;
    this.#state = state;
    this.emit('state', state);
  }

  async #rest(method, path, body, headers = {}) {
    const token = await resolveToken(this.#token);
    const response = await this.#fetch(`${this.#origin}${workspacePath(this.orgId, this.workspaceId)}${path}`, {
      method,
      headers: { Authorization: `Bearer ${token}`, ...(body ? { 'Content-Type': 'application/json' } : {}), ...headers },
      body: body ? JSON.stringify(body) : undefined,
    });
    let answer = {};
    try {
      answer = await response.json();
    } catch {
      // not JSON (a proxy's page): described below
    }
    if (!response.ok) {
      throw new SyncError(answer && typeof answer === 'object' && (answer.error || answer.detail)
        ? answer : { error: 'HTTP_ERROR', message: `HTTP ${response.status}`, details: {}, status_code: response.status });
    }
    return answer;
  }

  async #open() {
    if (this.#stopped) return;
    this.#setState('connecting');
    let ticket;
    try {
      ({ ticket } = await this.#rest('POST', '/tickets'));
    } catch (error) {
      const status = error instanceof SyncError ? error.status_code : 0;
      this.emit('error', error instanceof SyncError ? error : clientError('NETWORK', String(error)));
      if (REFUSED_FOR_GOOD.includes(status)) {
        this.close(); // not something a retry fixes
        return;
      }
      this.#retry(this.#backoff.next());
      return;
    }
    if (this.#stopped) return;
    const query = new URLSearchParams({ ticket });
    if (this.lastEventId) query.set('last_event_id', this.lastEventId);
    if (this.#timeout) query.set('timeout', String(this.#timeout));
    const source = new this.#EventSource(`${this.#origin}${workspacePath(this.orgId, this.workspaceId)}/stream?${query}`);
    this.#source = source;
    for (const type of this.#types) source.addEventListener(type, this.#onEvent);
    source.onopen = () => {
      this.#openedAt = Date.now();
      this.#backoff.reset();
      this.#setState('open');
    };
    // The stream ended (timeout, token expiry, drain, a lost node) or was refused. The
    // browser would reconnect with the same, spent ticket: close it and open a new stream
    // with a fresh ticket, resuming after the last event seen.
    source.onerror = () => {
      if (source !== this.#source) return;
      source.close();
      this.#source = null;
      const stable = this.#openedAt > 0 && Date.now() - this.#openedAt >= STABLE_MS;
      this.#openedAt = 0;
      this.#retry(stable ? Math.random() * QUICK_JITTER_MS : this.#backoff.next());
    };
  }

  #retry(delay) {
    if (this.#stopped) return;
    this.#setState('connecting');
    clearTimeout(this.#timer);
    this.#timer = setTimeout(() => this.#open(), delay);
  }
}
