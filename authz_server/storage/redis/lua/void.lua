-- Voids a pending hold: its money returns to the quotas at once. Voiding a voided one is a
-- harmless repeat. KEYS, ARGV and reply: Void in storage/redis/script_io.py.
-- Returns OK, NOT_FOUND, ALREADY_CAPTURED, CAPTURE_IN_PROGRESS (its capture is being written
-- and may still fail: the hold would then be pending again; or, for a hold a rebuild put back,
-- past its expiry, a capture claimed in the Redis that was lost may still commit),
-- AUTHORIZATION_EXPIRED or AUTHORIZATION_DECLINED.
local prefix, now = ARGV[1], tonumber(ARGV[2])
expire_due(prefix, now, 16)
local auth = KEYS[1]
local auth_id = string.match(auth, ':a:(.+)$')
-- One read of the hold: its merchant, status, put-back marks (rs, sb), expiry and funding.
local hold = redis.call('HMGET', auth, 'm', 's', 'rs', 'sb', 'ex', 'f')
if hold[1] ~= ARGV[3] then return 'NOT_FOUND' end
local status = hold[2]
if status == 'VOIDED' then return 'OK' end
if status == 'CAPTURED' then return 'ALREADY_CAPTURED' end
if status == 'CAPTURING' then return 'CAPTURE_IN_PROGRESS' end
if status == 'EXPIRED' then return 'AUTHORIZATION_EXPIRED' end
if status ~= 'PENDING' then return 'AUTHORIZATION_DECLINED' end
-- A hold a rebuild put back, past its expiry while it awaits its settlement (expire_due left
-- it): expired, as SQL said to the caller; its money waits for that settlement, then expiry.
-- But while a capture claimed before its expiry in the Redis that was lost may still commit
-- (ARGV[4] ms, lost_claim_may_commit), CAPTURE_IN_PROGRESS: SQL's "expired, no capture" may
-- yet become captured, as a CAPTURING hold's would (the caller retries).
local put_back = {hold[2], hold[3], hold[4]}  -- awaiting_settlement's s, rs, sb
if now >= tonumber(hold[5]) and awaiting_settlement(prefix, auth_id, put_back, now) then
  if lost_claim_may_commit(prefix, auth_id, now, tonumber(ARGV[4])) then
    return 'CAPTURE_IN_PROGRESS'
  end
  return 'AUTHORIZATION_EXPIRED'
end
touch(prefix .. ':expiry')
release_parts(prefix, auth_id, hold[6], nil)
redis.call('HSET', auth, 's', 'VOIDED')
redis.call('ZREM', prefix .. ':expiry', auth_id)
return 'OK'
