-- Takes money from an active quota if its available figure suffices (never below zero).
-- KEYS, ARGV and reply ({available or -1, epoch}): QuotaDebit in storage/redis/quota_io.py.
local epoch = redis.call('HGET', KEYS[1], 'e') or 'none'
if redis.call('HGET', KEYS[1], 'status') ~= 'ACTIVE' then
  return {-1, epoch}
end
local available = tonumber(redis.call('HGET', KEYS[1], 'available'))
local amount = tonumber(ARGV[1])
if available < amount then
  return {-1, epoch}
end
redis.call('HINCRBY', KEYS[1], 'v', 1)  -- the money changed (quota_restore.lua)
return {redis.call('HINCRBY', KEYS[1], 'available', -amount), epoch}
