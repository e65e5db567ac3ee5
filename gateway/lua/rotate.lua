-- rotate.lua: give a workspace log a new epoch (Redis lost some of its entries while the
-- epoch survived), unless another caller already did or the epoch is gone.
--
-- KEYS[1]  epoch key          <prefix>:{<org>:<ws>}:epoch
-- ARGV[1]  the epoch the caller found the loss in
-- ARGV[2]  the new epoch
-- Returns the epoch in force afterwards ("" = none).
local epoch = redis.call('GET', KEYS[1])
if epoch == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return ARGV[2]
end
return epoch or ''
