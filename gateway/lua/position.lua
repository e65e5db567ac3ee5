-- position.lua: where a workspace log stands, and optionally the entries after an id,
-- read atomically.
--
-- KEYS[1]  epoch key          <prefix>:{<org>:<ws>}:epoch
-- KEYS[2]  log stream         <prefix>:{<org>:<ws>}:log
-- ARGV[1]  epoch to create when there is none ("" = do not create one)
-- ARGV[2]  read the entries after this entry id ("" = read none)
-- ARGV[3]  read at most this many entries
-- ARGV[4]  an entry id the caller read from this log: report whether the log still holds
--          it ("" = none)
-- Returns {epoch ("" = none), last-generated-id, max-deleted-entry-id, entries,
-- first entry id, holds, removed (entries ever removed: trimmed or deleted)} (ids "0-0" when the stream does not exist or is empty; entries as
-- XRANGE returns them; holds 1 when the stream has an entry with id ARGV[4], else 0).
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  if ARGV[1] ~= '' then
    epoch = ARGV[1]
    redis.call('SET', KEYS[1], epoch)
  else
    epoch = ''
  end
end
local last, deleted, first = '0-0', '0-0', '0-0'
local length, added = 0, 0
if redis.call('EXISTS', KEYS[2]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[2])
  for i = 1, #info, 2 do
    if info[i] == 'length' then
      length = info[i + 1]
    elseif info[i] == 'entries-added' then
      added = info[i + 1]
    elseif info[i] == 'last-generated-id' then
      last = info[i + 1]
    elseif info[i] == 'max-deleted-entry-id' then
      deleted = info[i + 1]
    elseif info[i] == 'first-entry' and info[i + 1] then
      first = info[i + 1][1]
    end
  end
end
local entries = {}
if ARGV[2] ~= '' then
  entries = redis.call('XRANGE', KEYS[2], '(' .. ARGV[2], '+', 'COUNT', ARGV[3])
end
local holds = 0
if ARGV[4] ~= '' and #redis.call('XRANGE', KEYS[2], ARGV[4], ARGV[4]) > 0 then
  holds = 1
end
return {epoch, last, deleted, entries, first, holds, added - length}
