-- presence.lua: compare-and-set one user's presence record and append the events of the
-- transition, as one atomic step. The transition itself is computed by the caller
-- (gateway/presence.py, pure); this script only refuses to apply it if the record or the
-- epoch changed since the caller read them. (_log.lua comes first.)
--
-- KEYS[1]  epoch key          <prefix>:{<org>:<ws>}:epoch
-- KEYS[2]  records hash       <prefix>:{<org>:<ws>}:presence    user id -> record JSON
-- KEYS[3]  log stream         <prefix>:{<org>:<ws>}:log
-- KEYS[4]  expiry zset        <prefix>:{<org>:<ws>}:expiry      user id -> next expiry (s)
-- KEYS[5]  notify channel     <prefix>:{<org>:<ws>}:notify      (sharded pub/sub: SPUBLISH)
-- KEYS[6]  high-water mark    <prefix>:{<org>:<ws>}:hw          the last id a node appended
-- KEYS[7..] bound sets        <prefix>:{<org>:<ws>}:bound:<node> users bound to that node
-- ARGV[1]  expected epoch ("" = none yet)
-- ARGV[2]  epoch to create when there is none
-- ARGV[3]  user id
-- ARGV[4]  expected record JSON, byte for byte ("" = no record)
-- ARGV[5]  new record JSON ("" = delete the record)
-- ARGV[6]  new next expiry in seconds ("" = none)
-- ARGV[7]  now on Redis's clock, ms     ARGV[8] XADD MAXLEN ~      ARGV[9] XTRIM MINID ~
-- ARGV[10] n: how many bound sets follow in KEYS[7..6+n]
-- ARGV[11..10+n] "+" (add the user to KEYS[6+i]) or "-" (remove the user from it)
-- ARGV[11+n..] the events, 8 values each, as in append.lua
-- Returns {"ok", epoch, id, ...} or {"conflict"}.
local epoch = redis.call('GET', KEYS[1])
if (epoch or '') ~= ARGV[1] then
  return {'conflict'}
end
local current = redis.call('HGET', KEYS[2], ARGV[3])
if (current or '') ~= ARGV[4] then
  return {'conflict'}
end
if not epoch then
  epoch = ARGV[2]
  redis.call('SET', KEYS[1], epoch)
else
  redis.call('PERSIST', KEYS[1])  -- made by a read of a workspace that had no log
end
if ARGV[5] == '' then
  redis.call('HDEL', KEYS[2], ARGV[3])
else
  redis.call('HSET', KEYS[2], ARGV[3], ARGV[5])
end
if ARGV[6] == '' then
  redis.call('ZREM', KEYS[4], ARGV[3])
else
  redis.call('ZADD', KEYS[4], ARGV[6], ARGV[3])
end
local n = tonumber(ARGV[10])
for i = 1, n do
  if ARGV[10 + i] == '+' then
    redis.call('SADD', KEYS[6 + i], ARGV[3])
  else
    redis.call('SREM', KEYS[6 + i], ARGV[3])
  end
end
local result = {'ok', epoch}
local appended = {}
local previous, added
if #ARGV >= 11 + n then
  previous, added = log_position(KEYS[3])
end
for i = 11 + n, #ARGV, 8 do
  local fields = {unpack(ARGV, i, i + 7)}
  local id = append_entry(KEYS[3], ARGV[8], ARGV[7], fields)
  result[#result + 1] = id
  appended[#appended + 1] = {id, fields}
end
if #appended > 0 then
  redis.call('XTRIM', KEYS[3], 'MINID', '~', ARGV[9])
  redis.call('SET', KEYS[6], appended[#appended][1])
  notify(KEYS[5], epoch, previous, added + #appended, appended)
end
return result
