-- Marks a quota dissolved so no new hold can be placed on it. The ledger (SQL) already returned
-- the unused money to the holder; here the figures go to zero.
-- KEYS[1] quota hash, KEYS[2] beneficiary's quota index; ARGV[1] relationship id.
redis.call('HSET', KEYS[1], 'status', 'DISSOLVED', 'available', 0, 'held', 0)
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
