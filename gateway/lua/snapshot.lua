-- snapshot.lua: a workspace's presence records and the log position they are consistent
-- with, read atomically. Creates nothing for a workspace that has no log.
--
-- KEYS[1]  epoch key          <prefix>:{<org>:<ws>}:epoch
-- KEYS[2]  log stream         <prefix>:{<org>:<ws>}:log
-- KEYS[3]  records hash       <prefix>:{<org>:<ws>}:presence
-- ARGV[1]  epoch to create when there is none
-- ARGV[2]  its lifetime, ms, while the workspace has no log: reading an idle workspace leaves
--          nothing lasting behind (the first append makes the epoch permanent)
-- Returns {epoch, last-generated-id ("0-0" = no log), records as HGETALL}.
local epoch = redis.call('GET', KEYS[1])
local last = '0-0'
local exists = redis.call('EXISTS', KEYS[2]) == 1
if not epoch then
  epoch = ARGV[1]
  if exists then
    redis.call('SET', KEYS[1], epoch)
  else
    redis.call('SET', KEYS[1], epoch, 'PX', ARGV[2])
  end
elseif exists then
  redis.call('PERSIST', KEYS[1])  -- the log exists now: so does its epoch, for good
end
if exists then
  local info = redis.call('XINFO', 'STREAM', KEYS[2])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      last = info[i + 1]
    end
  end
end
return {epoch, last, redis.call('HGETALL', KEYS[3])}
