-- Voids a pending hold: its money returns to the quotas at once. Voiding a voided one is a
-- harmless repeat. KEYS, ARGV and reply: Void in storage/redis/script_io.py.
-- Returns OK, NOT_FOUND, ALREADY_CAPTURED, CAPTURE_IN_PROGRESS (its capture is being written
-- and may still fail: the hold would then be pending again), AUTHORIZATION_EXPIRED or
-- AUTHORIZATION_DECLINED.
local prefix, now = ARGV[1], tonumber(ARGV[2])
expire_due(prefix, now, 16)
local auth = KEYS[1]
local auth_id = string.match(auth, ':a:(.+)$')
if redis.call('HGET', auth, 'm') ~= ARGV[3] then return 'NOT_FOUND' end
local status = redis.call('HGET', auth, 's')
if status == 'VOIDED' then return 'OK' end
if status == 'CAPTURED' then return 'ALREADY_CAPTURED' end
if status == 'CAPTURING' then return 'CAPTURE_IN_PROGRESS' end
if status == 'EXPIRED' then return 'AUTHORIZATION_EXPIRED' end
if status ~= 'PENDING' then return 'AUTHORIZATION_DECLINED' end
-- A hold a rebuild put back, past its expiry while it awaits its settlement (expire_due left
-- it): expired, as SQL said to the caller; its money waits for that settlement, then expiry.
local put_back = redis.call('HMGET', auth, 's', 'rs', 'sb', 'ex')
if now >= tonumber(put_back[4]) and awaiting_settlement(prefix, auth_id, put_back, now) then
  return 'AUTHORIZATION_EXPIRED'
end
touch(prefix .. ':expiry')
release_parts(prefix, auth_id, redis.call('HGET', auth, 'f'), nil)
redis.call('HSET', auth, 's', 'VOIDED')
redis.call('ZREM', prefix .. ':expiry', auth_id)
return 'OK'
