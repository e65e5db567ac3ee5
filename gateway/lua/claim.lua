#!lua flags=allow-oom
-- claim.lua: claim the right to remove a dead node's sessions (one reaper at a time).
-- (allow-oom: reaping a dead node frees memory: it must run when Redis is full.)
--
-- KEYS[1]  alive key          <prefix>:{node:<id>}:alive
-- KEYS[2]  reaping key        <prefix>:{node:<id>}:reaping
-- ARGV[1]  the claimant (reaper's node id and incarnation)
-- ARGV[2]  claim lifetime, ms (the reaper renews it while it works)
-- ARGV[3]  "force": claim even if the node looks alive (a node reaping its own previous
--          incarnation at start-up); "" otherwise
-- Returns 1 when claimed, 0 when the node is alive or another reaper holds the claim.
if ARGV[3] ~= 'force' and redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
return 0
