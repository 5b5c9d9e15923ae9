-- Second phase, after SQL answered: CAPTURED (the captured parts leave the quotas, the rest of
-- the hold returns), VOIDED (SQL refused: the whole hold returns), or PENDING (SQL failed for
-- a passing reason: the hold is put back as it was, so the merchant can retry).
-- KEYS, ARGV and reply: CaptureFinish in storage/redis/script_io.py.
-- Finishes nothing when the hold is no longer in that claim: a sweeper that read SQL for an
-- old claim must not finish a newer one (a till's retry that settled and claimed it again),
-- whose own write SQL may be committing. Returns 1 when it finished the claim, else 0.
-- A hold put back from SQL by a rebuild (rs = 1) lost its claim with Redis: a capture that was
-- being written then finishes it as CAPTURED or VOIDED from PENDING (SQL's answer is the
-- truth; the rebuild read SQL before that capture committed).
local prefix, auth = ARGV[1], KEYS[1]
local auth_id = string.match(auth, ':a:(.+)$')
local state = redis.call('HMGET', auth, 's', 'cs', 'rs')
touch(prefix .. ':capturing', prefix .. ':expiry')
local restored = state[1] == 'PENDING' and state[3] == '1' and ARGV[2] ~= 'PENDING'
if state[1] ~= 'CAPTURING' and not restored then
  redis.call('ZREM', prefix .. ':capturing', auth_id)
  return 0
end
if not restored and ARGV[5] and ARGV[5] ~= '' and state[2] ~= ARGV[5] then return 0 end
-- The quotas release_parts writes below, touched before this script's first write.
if ARGV[2] ~= 'PENDING' then
  for _, part in ipairs(parse_funding(redis.call('HGET', auth, 'f'))) do
    touch(prefix .. ':q:' .. part[1], prefix .. ':qh:' .. part[1])
  end
end
redis.call('ZREM', prefix .. ':capturing', auth_id)
redis.call('ZREM', prefix .. ':expiry', auth_id)
if ARGV[2] == 'PENDING' then
  redis.call('HSET', auth, 's', 'PENDING', 'ck', '', 'cp', 0)
  redis.call('ZADD', prefix .. ':expiry', redis.call('HGET', auth, 'ex'), auth_id)
  return 1
end
local captured = {}
local total = 0
if ARGV[2] == 'CAPTURED' then
  for _, part in ipairs(parse_funding(ARGV[3])) do
    captured[part[1]] = part[2]
    total = total + part[2]
  end
end
release_parts(prefix, auth_id, redis.call('HGET', auth, 'f'), captured)
redis.call('HSET', auth, 's', ARGV[2], 'cp', total)
if ARGV[2] == 'VOIDED' and ARGV[4] and ARGV[4] ~= '' then redis.call('HSET', auth, 'vr', ARGV[4]) end
return 1
