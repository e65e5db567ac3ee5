// The demo page: one workspace, seen over the WebSocket client and over EventSource, both
// from the client module every page can import (no second implementation here). Everything
// received is shown with textContent only: event data is never markup.
import { EventStream, SyncClient } from '../client/mm-sync.js';

const LOG_LIMIT = 500; // entries kept per panel: a long-running page stays small
const LISTENED = ['note.posted', 'doc.updated']; // EventSource needs each published type by name

const $ = (id) => document.getElementById(id);

class Panel {
  constructor(section) {
    this.section = section;
    this.part = (role) => section.querySelector(`[data-role="${role}"]`);
    this.count = 0;
  }

  state(text) {
    this.part('state').textContent = text;
    this.section.dataset.state = text;
  }

  node(text) {
    const part = this.part('node');
    if (part) part.textContent = text ? `node ${text}` : '';
    this.section.dataset.node = text ?? '';
  }

  members(list) {
    const items = list.map((member) => {
      const item = document.createElement('li');
      item.dataset.user = member.user_id;
      const name = member.actor?.name ? `${member.actor.name} (${member.user_id})` : member.user_id;
      const viewing = (member.viewing ?? []).map((v) => `${v.resource_type}/${v.resource_id}`);
      item.dataset.viewing = viewing.join(' ');
      item.textContent = viewing.length ? `${name} · viewing ${viewing.join(', ')}` : name;
      return item;
    });
    this.part('members').replaceChildren(...items);
  }

  event(envelope) {
    const item = document.createElement('li');
    item.dataset.id = envelope.id ?? '';
    item.dataset.type = envelope.type ?? '';
    const actor = envelope.actor?.id ?? '';
    item.textContent = `${envelope.type} · ${actor} · ${JSON.stringify(envelope.data)}`;
    const log = this.part('log');
    log.append(item);
    while (log.childElementCount > LOG_LIMIT) log.firstElementChild.remove();
    this.count += 1;
    this.part('count').textContent = String(this.count);
  }

  clear() {
    this.count = 0;
    this.part('log').replaceChildren();
    this.part('members').replaceChildren();
    this.part('count').textContent = '0';
    this.node('');
  }
}

const panels = { ws: new Panel($('ws')), sse: new Panel($('sse')) };
let client = null;
let workspace = null;
let stream = null;

function show(text, failed = false) {
  $('result').textContent = text;
  $('result').dataset.failed = failed ? 'true' : 'false';
}

function describe(error) {
  return `${error.status_code ?? ''} ${error.error ?? error.name}: ${error.message}`;
}

async function act(label, call) {
  try {
    const note = await call();
    show(typeof note === 'string' ? note : `${label}: ok`);
  } catch (error) {
    show(`${label}: ${describe(error)}`, true);
  }
}

function connect(event) {
  event.preventDefault();
  disconnect();
  const org = $('org').value.trim();
  const id = $('workspace').value.trim();
  const token = $('token').value.trim();
  const url = window.location.origin;

  client = new SyncClient({ url, token: () => $('token').value.trim() || token });
  client.on('state', (state) => panels.ws.state(state));
  client.on('open', (who) => {
    panels.ws.node(who.node_id);
    $('me').textContent = who.user_id;
  });
  client.on('error', (error) => show(`websocket: ${describe(error)}`, true));
  workspace = client.workspace(org, id);
  workspace.on('event', (envelope) => panels.ws.event(envelope));
  workspace.on('presence', (members) => panels.ws.members(members));

  stream = new EventStream({ url, orgId: org, workspaceId: id, events: LISTENED,
    token: () => $('token').value.trim() || token });
  stream.on('state', (state) => panels.sse.state(state));
  stream.on('error', (error) => show(`eventsource: ${describe(error)}`, true));
  stream.on('event', (envelope) => panels.sse.event(envelope));
  stream.on('presence', (members) => panels.sse.members(members));

  $('actions-fields').disabled = false;
  $('disconnect-button').disabled = false;
}

function disconnect() {
  client?.close();
  stream?.close();
  client = workspace = stream = null;
  panels.ws.clear();
  panels.sse.clear();
  $('actions-fields').disabled = true;
  $('disconnect-button').disabled = true;
}

$('connect').addEventListener('submit', connect);
$('disconnect-button').addEventListener('click', disconnect);
$('join').addEventListener('click', () => act('join', () => workspace.join()));
$('leave').addEventListener('click', () => act('leave', () => workspace.leave()));
$('set-viewing').addEventListener('click', () => act('viewing',
  () => workspace.viewing($('resource-type').value.trim(), $('resource-id').value.trim())));
$('publish').addEventListener('click', () => act('publish', async () => {
  let data;
  try {
    data = JSON.parse($('event-data').value || '{}');
  } catch {
    throw new Error('the data is not JSON');
  }
  const type = $('event-type').value.trim();
  stream?.listen(type);
  const envelope = await workspace.publish(type, data);
  return `publish: ${envelope.id}`;
}));

const params = new URLSearchParams(window.location.search);
for (const name of ['org', 'workspace']) {
  if (params.get(name)) $(name).value = params.get(name);
}
