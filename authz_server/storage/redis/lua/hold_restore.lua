-- Puts back an approved hold that SQL has and Redis lost (its decision was journaled while a
-- rebuild of the hot state read SQL, or Redis lost it since): the hold is placed again with its
-- own expiry, its money taken from the quotas it was approved on. Nothing when Redis knows the
-- authorization (whatever its state), when it has expired, or when a quota funding it is no
-- longer active (dissolution voided it and returned the money).
-- The money is taken even where available falls below zero: SQL approved it, and the ledger
-- guard at capture (LEDGER_LIMIT_EXCEEDED) is what stands behind an overcommitted quota.
-- KEYS, ARGV and reply: HoldRestore in storage/redis/script_io.py.
-- rs = 1 marks a hold put back from SQL (capture_finish.lua). Returns 1 when the hold was
-- placed, 0 otherwise.
local prefix, now, auth = ARGV[1], tonumber(ARGV[2]), KEYS[1]
local auth_id = string.match(auth, ':a:(.+)$')
if redis.call('EXISTS', auth) == 1 then return 0 end
if now >= tonumber(ARGV[8]) then return 0 end
local parts = parse_funding(ARGV[7])
for _, part in ipairs(parts) do
  if redis.call('HGET', prefix .. ':q:' .. part[1], 'status') ~= 'ACTIVE' then return 0 end
end
for _, part in ipairs(parts) do
  local quota = prefix .. ':q:' .. part[1]
  redis.call('HINCRBY', quota, 'available', -part[2])
  redis.call('HINCRBY', quota, 'held', part[2])
  redis.call('SADD', prefix .. ':qh:' .. part[1], auth_id)
end
redis.call('HSET', auth, 'm', ARGV[3], 'b', ARGV[4], 'p', ARGV[5], 's', 'PENDING',
  'ap', ARGV[6], 'cp', 0, 'f', ARGV[7], 'ex', ARGV[8], 'cr', ARGV[9], 'd', ARGV[10],
  'r', '', 'ck', '', 'o', 0, 'rs', 1)
redis.call('ZADD', prefix .. ':expiry', ARGV[8], auth_id)
return 1
