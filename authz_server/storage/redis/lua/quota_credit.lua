-- Adds money to an active quota. KEYS[1] quota hash; ARGV[1] amount_fen.
-- Returns the new available figure, or -1 when the quota is missing or not active: the caller
-- then restores it from the ledger, which already counts the money.
if redis.call('HGET', KEYS[1], 'status') ~= 'ACTIVE' then
  return -1
end
return redis.call('HINCRBY', KEYS[1], 'available', ARGV[1])
