-- _log.lua: what every script that appends to a workspace log shares (append.lua and
-- presence.lua start with it; gateway/broker_redis.py puts it in front of them).
--
-- A follower whose position is the log's last id before an append delivers the appended
-- entries straight from the notification and reads nothing (gateway/redis_follow.py), so
-- each append publishes on the workspace's sharded channel, with cmsgpack:
--   {epoch, previous last-generated-id, entries-added after, {{id, {field, value, ...}}, ...}}
-- (the entries exactly as XRANGE gives them). Entries larger than NOTIFY_MAX_BYTES in all are
-- announced by their last id alone, as a plain XADD's SPUBLISH is: followers read them.
local NOTIFY_MAX_BYTES = 16384

-- The stream's last-generated-id and entries-added before this script appends ('0-0', 0:
-- no stream).
local function log_position(log)
  if redis.call('EXISTS', log) == 0 then
    return '0-0', 0
  end
  local info = redis.call('XINFO', 'STREAM', log)
  local last, added = '0-0', 0
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      last = info[i + 1]
    elseif info[i] == 'entries-added' then
      added = info[i + 1]
    end
  end
  return last, added
end

-- Append one entry (a flat field/value list) and return its id. An explicit <ms>-* keeps
-- ids on Redis's clock as the node measured it (docs/redis.md, "Clocks"); Redis refuses it
-- when the stream's top id is newer (an append a moment ago), and then '*' continues after
-- the top, so ids only grow.
local function append_entry(log, maxlen, ms, fields)
  local ok, id = pcall(redis.call, 'XADD', log, 'MAXLEN', '~', maxlen, ms .. '-*', unpack(fields))
  if not ok then
    id = redis.call('XADD', log, 'MAXLEN', '~', maxlen, '*', unpack(fields))
  end
  return id
end

-- Publish what was appended ({{id, fields}, ...}, in order) on the notification channel.
local function notify(channel, epoch, previous, added, appended)
  local size = 0
  for i = 1, #appended do
    for _, value in ipairs(appended[i][2]) do
      size = size + #value
    end
  end
  if size > NOTIFY_MAX_BYTES then
    redis.call('SPUBLISH', channel, appended[#appended][1])
  else
    redis.call('SPUBLISH', channel, cmsgpack.pack({epoch, previous, added, appended}))
  end
end

