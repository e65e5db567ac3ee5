-- append.lua: append a batch of published events to a workspace log (creating its epoch if
-- the log is new) and notify the nodes that follow it (_log.lua comes first). A node sends
-- the publishes that wait for one workspace together (group commit), each with or without
-- its own idempotency key.
--
-- KEYS[1]  epoch key          <prefix>:{<org>:<ws>}:epoch
-- KEYS[2]  log stream         <prefix>:{<org>:<ws>}:log
-- KEYS[3]  notify channel     <prefix>:{<org>:<ws>}:notify   (sharded pub/sub: SPUBLISH)
-- KEYS[4]  high-water mark    <prefix>:{<org>:<ws>}:hw       the last id a node appended
-- KEYS[5..] idempotency keys  <prefix>:{<org>:<ws>}:published:<key>   (distinct)
-- ARGV[1]  epoch to create when the workspace has none
-- ARGV[2]  now on Redis's clock (as the node measured it), ms (entry ids are <ms>-<seq>;
--          never below the stream's top id)
-- ARGV[3]  retention by count: XADD MAXLEN ~ ARGV[3]
-- ARGV[4]  retention by age: XTRIM MINID ~ ARGV[4]
-- ARGV[5]  ms an idempotency key remembers its append
-- ARGV[6..] the events, 9 values each: the index in KEYS of the event's idempotency key
--          (0: none), then its field/value pairs
--          "type" <type> "actor" <JSON object> "data" <JSON object> "node" <node id>
-- Returns {epoch, result, ...}: one result per event, its entry id, or "=" followed by what
-- the append that first used its idempotency key stored, when that was within its time
-- (then this event is not appended).
-- The first write is the first XADD, so that a Redis out of memory (noeviction) refuses
-- the whole script rather than a write after a write.
local results, appended, batch = {}, {}, {}
for i = 6, #ARGV, 9 do
  local key = tonumber(ARGV[i])
  local earlier = key > 0 and redis.call('GET', KEYS[key])
  if earlier then
    results[#results + 1] = '=' .. earlier
  else
    results[#results + 1] = false
    batch[#batch + 1] = {#results, key, {unpack(ARGV, i + 1, i + 8)}}
  end
end
local epoch = redis.call('GET', KEYS[1])
if #batch == 0 then
  return {epoch or '', unpack(results)}
end
local previous, added = log_position(KEYS[2])
for _, item in ipairs(batch) do
  local id = append_entry(KEYS[2], ARGV[3], ARGV[2], item[3])
  results[item[1]] = id
  appended[#appended + 1] = {id, item[3]}
end
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[1], epoch)
else
  redis.call('PERSIST', KEYS[1])  -- made by a read of a workspace that had no log
end
redis.call('XTRIM', KEYS[2], 'MINID', '~', ARGV[4])
local last = appended[#appended][1]
redis.call('SET', KEYS[4], last)
notify(KEYS[3], epoch, previous, added + #appended, appended)
for _, item in ipairs(batch) do
  if item[2] > 0 then
    -- The envelope's parts, for a retry: {epoch, id, type, actor, data} as JSON.
    local fields = item[3]
    redis.call('SET', KEYS[item[2]], cjson.encode({epoch, results[item[1]], fields[2], fields[4],
                                                   fields[6]}), 'PX', ARGV[5])
  end
end
return {epoch, unpack(results)}
