-- Takes money from an active quota if its available figure suffices (never below zero).
-- KEYS[1] quota hash; ARGV[1] amount_fen. Returns {the new available figure, or -1 if short,
-- missing or not active; the restore epoch it was taken in, for a give-back (quota_credit)}.
local epoch = redis.call('HGET', KEYS[1], 'e') or 'none'
if redis.call('HGET', KEYS[1], 'status') ~= 'ACTIVE' then
  return {-1, epoch}
end
local available = tonumber(redis.call('HGET', KEYS[1], 'available'))
local amount = tonumber(ARGV[1])
if available < amount then
  return {-1, epoch}
end
return {redis.call('HINCRBY', KEYS[1], 'available', -amount), epoch}
