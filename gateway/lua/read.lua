-- read.lua: where a workspace log stands, and optionally a page of the entries after an id,
-- read atomically. Creates nothing for a workspace that has no log.
--
-- KEYS[1]  epoch key          <prefix>:{<org>:<ws>}:epoch
-- KEYS[2]  log stream         <prefix>:{<org>:<ws>}:log
-- KEYS[3]  high-water mark    <prefix>:{<org>:<ws>}:hw       the last id a node appended
-- ARGV[1]  read the entries after this entry id ("" = read none)
-- ARGV[2]  read at most this many entries
-- ARGV[3]  an entry id the caller read from this log: report whether the log still holds
--          it ("" = none)
-- ARGV[4]  epoch to create when the log exists but has none (written by a plain XADD);
--          "" = create none
-- ARGV[5]  retention by count (history_max_len): report the newest entry beyond it, which
--          approximate trimming (MAXLEN ~) may still keep ("" = do not)
-- Returns {epoch ("" = none), last-generated-id, max-deleted-entry-id, first entry id,
-- holds, entries-added, length, entries, beyond, high-water mark ("0-0" = none)} (ids "0-0" when the stream does not exist
-- or is empty; holds 1 when the stream has an entry with id ARGV[3], else 0; entries as
-- XRANGE returns them; beyond: the id of the newest entry older than the last ARGV[5], "0-0"
-- if none or more than 1000 of them).
local epoch = redis.call('GET', KEYS[1])
local last, deleted, first = '0-0', '0-0', '0-0'
local length, added = 0, 0
if redis.call('EXISTS', KEYS[2]) == 1 then
  if not epoch and ARGV[4] ~= '' then
    epoch = ARGV[4]
    redis.call('SET', KEYS[1], epoch)
  elseif epoch and redis.call('PTTL', KEYS[1]) > 0 then
    -- An epoch made by a read before the log existed lasts as long as the log from now
    -- on (a log written only by plain XADDs never gets a gateway append to do it). Only
    -- then is a read a write: reads go on against a read-only (demoted) server.
    redis.call('PERSIST', KEYS[1])
  end
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
if ARGV[1] ~= '' and length > 0 then
  entries = redis.call('XRANGE', KEYS[2], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
end
local holds = 0
if ARGV[3] ~= '' and length > 0 and #redis.call('XRANGE', KEYS[2], ARGV[3], ARGV[3]) > 0 then
  holds = 1
end
local beyond = '0-0'
if ARGV[5] ~= '' and length > tonumber(ARGV[5]) and length - tonumber(ARGV[5]) <= 1000 then
  local head = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', length - tonumber(ARGV[5]))
  beyond = head[#head][1]
end
return {epoch or '', last, deleted, first, holds, added, length, entries, beyond,
        redis.call('GET', KEYS[3]) or '0-0'}
