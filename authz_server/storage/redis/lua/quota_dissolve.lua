-- Marks a quota dissolved so no new hold can be placed on it, and voids its open holds (their
-- parts on the beneficiary's other quotas go back to those). The ledger (SQL) already returned
-- this quota's unused money to the holder; here its figures go to zero. A hold voided here
-- remembers why (vr), so a later capture is refused RELATIONSHIP_NOT_ACTIVE; one a rebuild put
-- back that still waits for its settlement is left to it (lua/_lib.lua holds_of_dissolved).
-- KEYS, ARGV and reply: QuotaDissolve in storage/redis/quota_io.py.
local prefix = ARGV[2]
local voiding = holds_of_dissolved(prefix, ARGV[1])
redis.call('HSET', KEYS[1], 'status', 'DISSOLVED', 'available', 0, 'held', 0)
redis.call('HINCRBY', KEYS[1], 'v', 1)  -- the money changed (quota_restore.lua)
redis.call('ZREM', KEYS[2], ARGV[1])
dissolve_holds(prefix, ARGV[1], voiding)
return 1
