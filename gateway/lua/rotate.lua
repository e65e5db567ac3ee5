-- rotate.lua: give a workspace log a new epoch (Redis lost some of its entries while the
-- epoch survived), unless another caller already did or the epoch is gone; notify the nodes
-- that follow it, so they read the new epoch at once.
--
-- KEYS[1]  epoch key          <prefix>:{<org>:<ws>}:epoch
-- KEYS[2]  notify channel     <prefix>:{<org>:<ws>}:notify
-- KEYS[3]  high-water mark    <prefix>:{<org>:<ws>}:hw       (what showed the loss: dropped)
-- ARGV[1]  the epoch the caller found the loss in
-- ARGV[2]  the new epoch
-- Returns the epoch in force afterwards ("" = none).
local epoch = redis.call('GET', KEYS[1])
if epoch == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  redis.call('DEL', KEYS[3])
  redis.call('SPUBLISH', KEYS[2], 'rotated')
  return ARGV[2]
end
return epoch or ''
