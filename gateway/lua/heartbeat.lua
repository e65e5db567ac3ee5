#!lua flags=allow-oom
-- heartbeat.lua: a node says it is alive for another node_timeout.
-- (allow-oom: a node out of memory must still say it is alive (its
-- key exists; the SET replaces it), or its peers reap its users.)
--
-- KEYS[1]  alive key          <prefix>:{node:<id>}:alive     value: the process's incarnation
-- KEYS[2]  reaping key        <prefix>:{node:<id>}:reaping   held while a peer removes its sessions
-- ARGV[1]  incarnation (random per process)
-- ARGV[2]  node_timeout, ms
-- Returns "ok" (alive all along), "lapsed" (the alive key had expired or was lost: the node
-- may have been reaped and must re-assert what it holds), "taken" (another process wrote
-- this node id's key: ids must be unique), or "reaped" (a peer is removing this node's
-- sessions right now: not marked alive; beat again shortly, then re-assert).
if redis.call('EXISTS', KEYS[2]) == 1 then
  return 'reaped'
end
local previous = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if previous == ARGV[1] then
  return 'ok'
end
if not previous then
  return 'lapsed'
end
return 'taken'
