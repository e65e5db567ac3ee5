-- append.lua: append published events to a workspace log (creating its epoch if the log is
-- new) and notify the nodes that follow it.
--
-- KEYS[1]  epoch key          <prefix>:{<org>:<ws>}:epoch
-- KEYS[2]  log stream         <prefix>:{<org>:<ws>}:log
-- KEYS[3]  notify channel     <prefix>:{<org>:<ws>}:notify   (sharded pub/sub: SPUBLISH)
-- KEYS[4]  high-water mark    <prefix>:{<org>:<ws>}:hw       the last id a node appended
-- KEYS[5]  idempotency key    <prefix>:{<org>:<ws>}:published:<key>   (when ARGV[5] > 0)
-- ARGV[1]  epoch to create when the workspace has none
-- ARGV[2]  the node's clock, ms (entry ids are <ms>-<seq>; never below the stream's top id)
-- ARGV[3]  retention by count: XADD MAXLEN ~ ARGV[3]
-- ARGV[4]  retention by age: XTRIM MINID ~ ARGV[4]
-- ARGV[5]  ms KEYS[5] remembers this append (0: no idempotency key)
-- ARGV[6..] the entries, 8 values each: field/value pairs
--          "type" <type> "actor" <JSON object> "data" <JSON object> "node" <node id>
-- Returns {epoch, id, ...}: the epoch and one entry id per appended entry; or, when KEYS[5]
-- was seen within its time, {"=", <what that append stored>} and appends nothing.
if ARGV[5] ~= '0' then
  local earlier = redis.call('GET', KEYS[5])
  if earlier then
    return {'=', earlier}
  end
end
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[1], epoch)
else
  redis.call('PERSIST', KEYS[1])  -- made by a read of a workspace that had no log
end
local result = {epoch}
local fields = {}
for i = 6, #ARGV do
  fields[#fields + 1] = ARGV[i]
  if #fields == 8 then
    -- An explicit <ms>-* keeps ids on the nodes' clock; Redis refuses it when the stream's
    -- top id is newer (another node's clock is ahead), and then '*' continues after the top.
    local ok, id = pcall(redis.call, 'XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], ARGV[2] .. '-*',
                         unpack(fields))
    if not ok then
      id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(fields))
    end
    result[#result + 1] = id
    fields = {}
  end
end
redis.call('XTRIM', KEYS[2], 'MINID', '~', ARGV[4])
redis.call('SET', KEYS[4], result[#result])
redis.call('SPUBLISH', KEYS[3], result[#result])
if ARGV[5] ~= '0' then
  -- The envelope's parts, for a retry: {epoch, id, type, actor, data} as JSON.
  redis.call('SET', KEYS[5], cjson.encode({epoch, result[2], ARGV[7], ARGV[9], ARGV[11]}),
             'PX', ARGV[5])
end
return result
