-- Adds money to an active quota. KEYS, ARGV and reply: QuotaCredit in
-- storage/redis/quota_io.py.
-- A restore (quota_restore.lua) sets the quota from SQL's figure, which already counts every
-- credit entry up to its mark r, and starts a new epoch e: such a credit, or the give-back of a
-- debit taken before it, was counted by the restore and must not be added again.
-- Returns 1 when added; 2 when the money is counted already (nothing done); 0 when the quota
-- is missing or not active: the caller then restores it from the ledger. (Not the new figure:
-- available may be below zero, holds over-committing the quota, and any number can be it.)
if redis.call('HGET', KEYS[1], 'status') ~= 'ACTIVE' then
  return 0
end
if ARGV[2] ~= '' and tonumber(redis.call('HGET', KEYS[1], 'r') or '0') >= tonumber(ARGV[2]) then
  return 2
end
if ARGV[3] ~= '' and (redis.call('HGET', KEYS[1], 'e') or 'none') ~= ARGV[3] then
  return 2
end
redis.call('HINCRBY', KEYS[1], 'v', 1)  -- the money changed (quota_restore.lua)
redis.call('HINCRBY', KEYS[1], 'available', ARGV[1])
return 1
