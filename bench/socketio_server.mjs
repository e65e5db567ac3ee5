/**
 * The peer for bench/bench_delivery.py: node socket.io 4.8 over @socket.io/redis-streams-adapter.
 *
 * One process of a cluster: every process shares one redis-server through the adapter, which
 * XADDs each broadcast to one Redis stream (`socket.io`) that every process follows with
 * `XREAD BLOCK` on a connection of its own. socket.io's defaults, plus what the benchmark
 * needs: the adapter, and connection state recovery (socket.io's resume), which appends each
 * event's stream entry id ("<ms>-<seq>") to its packet: `42["event",<envelope>,"<ms>-<seq>"]`.
 * That id is the event's position in the one log, as the floor's and the gateway's ids are.
 *
 * Routes, on one HTTP server:
 *   GET  /socket.io/?EIO=4&transport=websocket&room=R   socket.io; the connection joins room R in
 *        the same tick as its CONNECT ack (`40{...}`), so the ack is its "ready": it misses
 *        nothing broadcast after it
 *   POST /rooms/{room}/events  {"type","data"}  ->  io.to(room).emit("event", <envelope>), the
 *        envelope shaped as the floor's; answers {"id"} once emitted (socket.io's emit returns
 *        before the XADD: it reports no completion)
 *   GET  /readyz  200 once this process's stream reader is blocked in XREAD; says the versions
 *
 *     node bench/socketio_server.mjs --port 8093 --redis-url redis://127.0.0.1:6379/0 \
 *          --node-id sio-0 --modules bench/.node
 *
 * `--modules` is the directory npm installed the packages into (bench_delivery.py does it, with
 * `npm install --no-save --prefix`): nothing is installed beside this file.
 */

import { readFileSync } from "node:fs";
import { createServer } from "node:http";
import { createRequire } from "node:module";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";

const { values: opts } = parseArgs({
  options: {
    host: { type: "string", default: "127.0.0.1" },
    port: { type: "string", default: "8093" },
    "redis-url": { type: "string", default: "redis://127.0.0.1:6379/0" },
    "node-id": { type: "string", default: "sio" },
    modules: { type: "string", default: "bench/.node" },
  },
});

const modules = resolve(opts.modules);
const require = createRequire(join(modules, "resolve-from-here.js"));
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-streams-adapter");
const { createClient } = require("redis");

const ORG = "bench";
const TYPE = /^[a-z][a-z0-9_.-]{0,63}$/;
const ACTOR = { type: "service", id: "bench-publisher" };
const PUBLISH = /^\/rooms\/([^/]+)\/events$/;
const nodeId = opts["node-id"];
const clientName = `bench-${nodeId}`; // the adapter's duplicates carry it: /readyz finds its reader

function version(name) {
  const path = join(modules, "node_modules", name, "package.json");
  return JSON.parse(readFileSync(path, "utf8")).version;
}

const versions = {
  node: process.version,
  "socket.io": version("socket.io"),
  "redis-streams-adapter": version("@socket.io/redis-streams-adapter"),
  redis: version("redis"),
};

let redisDown = false; // logged once per state change, not once per failure
const redis = createClient({ url: opts["redis-url"], name: clientName });
redis.on("error", (err) => {
  if (!redisDown) console.error(`${nodeId}: redis: ${err.message}`);
  redisDown = true;
});
redis.on("ready", () => {
  if (redisDown) console.error(`${nodeId}: redis: connected again`);
  redisDown = false;
});
await redis.connect();

function json(res, status, body) {
  const bytes = Buffer.from(JSON.stringify(body));
  res.writeHead(status, { "Content-Type": "application/json", "Content-Length": bytes.length });
  res.end(bytes);
}

let published = 0;

function envelope(room, type, data) {
  // The floor's envelope field for field; the id is the app's, unique but not an order:
  // the order is the stream entry id socket.io appends to the packet.
  return {
    id: `${nodeId}:${++published}`,
    type,
    org_id: ORG,
    workspace_id: room,
    actor: ACTOR,
    data,
    timestamp: new Date().toISOString().slice(0, -1) + "000",
  };
}

async function readBody(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return Buffer.concat(chunks).toString("utf8");
}

async function publish(req, res, room) {
  let body;
  try {
    body = JSON.parse(await readBody(req));
  } catch {
    return json(res, 422, { error: "body is not JSON" });
  }
  const type = body?.type;
  const data = body?.data ?? {};
  if (typeof type !== "string" || !TYPE.test(type) || typeof data !== "object" || Array.isArray(data)) {
    return json(res, 422, { error: "want {type, data}" });
  }
  const event = envelope(room, type, data);
  io.to(room).emit("event", event);
  return json(res, 200, { id: event.id });
}

async function readyz(res) {
  // Ready once the adapter's reader (a duplicate of `redis`, so named alike) waits in XREAD:
  // from then on no broadcast of another process is missed.
  try {
    const clients = String(await redis.sendCommand(["CLIENT", "LIST"])).split("\n");
    const reading = clients.some((line) => line.includes(` name=${clientName} `) && line.includes(" cmd=xread"));
    return json(res, reading ? 200 : 503, { ready: reading, loop: "node", node: nodeId, versions });
  } catch (err) {
    return json(res, 503, { ready: false, error: err.message });
  }
}

const http = createServer((req, res) => {
  // socket.io answers /socket.io/ itself, before this handler
  const match = req.method === "POST" ? PUBLISH.exec(req.url) : null;
  const done = match ? publish(req, res, decodeURIComponent(match[1]))
    : req.method === "GET" && req.url === "/readyz" ? readyz(res)
      : Promise.resolve(json(res, 404, { error: "not found" }));
  done.catch((err) => json(res, 500, { error: err.message }));
});
http.keepAliveTimeout = 60_000; // outlives the publisher's idle keep-alive: no close/reuse race

const io = new Server(http, {
  adapter: createAdapter(redis),
  connectionStateRecovery: {}, // socket.io's resume: its packets carry their stream entry id
  serveClient: false,
});

io.on("connection", (socket) => {
  const room = socket.handshake.query.room;
  if (typeof room === "string" && room) socket.join(room);
});

function stop() {
  io.close();
  redis.destroy();
  process.exit(0);
}
process.on("SIGTERM", stop);
process.on("SIGINT", stop);

http.listen(Number(opts.port), opts.host);
