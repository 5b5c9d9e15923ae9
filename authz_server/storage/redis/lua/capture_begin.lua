-- First phase of a capture: claims a pending hold (status CAPTURING) so that neither expiry nor
-- a void can take it while the capture is written to SQL.
-- KEYS, ARGV and reply: CaptureBegin in storage/redis/script_io.py. The outcome is OK,
-- REPLAY (captured with this key), IN_PROGRESS (a claim of it, this key's or another's, is
-- being written; or a put-back hold past its expiry whose capture claimed in the Redis that
-- was lost may still commit), STALLED (that claim too old, or a put-back hold past its expiry
-- still awaiting its settlement), NOT_FOUND, ALREADY_CAPTURED, ALREADY_VOIDED,
-- AUTHORIZATION_EXPIRED, AUTHORIZATION_DECLINED, CAPTURE_EXCEEDS_APPROVED or
-- RELATIONSHIP_NOT_ACTIVE (voided because a relationship funding it was dissolved).
local prefix, now = ARGV[1], tonumber(ARGV[2])
expire_due(prefix, now, 16)
local auth = KEYS[1]
local auth_id = string.match(auth, ':a:(.+)$')
if redis.call('HGET', auth, 'm') ~= ARGV[3] then return {'NOT_FOUND'} end
local f = redis.call('HMGET', auth, 's', 'ap', 'ex', 'ck', 'f', 'b', 'p', 'cp', 'cr')
local status, approved, expires, key = f[1], tonumber(f[2]), tonumber(f[3]), f[4]
local function reply(outcome, amount)
  return {outcome, tostring(approved), tostring(amount), f[5], f[6], f[7], f[9] or '0',
          f[3] or '0'}
end
if status == 'CAPTURED' then
  if key == ARGV[4] then return reply('REPLAY', tonumber(f[8])) end
  return reply('ALREADY_CAPTURED', 0)
end
if status == 'CAPTURING' then
  -- Still running, or its process lost the thread: past ARGV[6] ms it counts as stalled.
  -- Whatever the key: another key's claim may still fail (a Void marked SQL first), so that
  -- till is not told ALREADY_CAPTURED for a hold that may end uncaptured; it retries.
  local started = tonumber(redis.call('HGET', auth, 'cs') or '0')
  if now - started > tonumber(ARGV[6]) then return reply('STALLED', 0) end
  return reply('IN_PROGRESS', 0)
end
if status == 'VOIDED' then
  local why = redis.call('HGET', auth, 'vr')
  -- NOT_WRITTEN: a one-step payment SQL never had (capture_finish.lua).
  if not why or why == '' or why == 'NOT_WRITTEN' then why = 'ALREADY_VOIDED' end
  return reply(why, 0)
end
if status == 'EXPIRED' then return reply('AUTHORIZATION_EXPIRED', 0) end
if status ~= 'PENDING' then return reply('AUTHORIZATION_DECLINED', 0) end
if now >= expires then
  -- A hold a rebuild put back whose capture may have committed (awaiting_settlement): not
  -- released here either. STALLED: the caller settles it as SQL says, then asks again; but
  -- IN_PROGRESS while a capture claimed in the Redis that was lost may still commit (ARGV[7]
  -- ms, lost_claim_may_commit): settled as not captured then, it could commit after this
  -- capture was answered AUTHORIZATION_EXPIRED.
  local put_back = redis.call('HMGET', auth, 's', 'rs', 'sb')
  if awaiting_settlement(prefix, auth_id, put_back, now) then
    if lost_claim_may_commit(prefix, auth_id, now, tonumber(ARGV[7])) then
      return reply('IN_PROGRESS', 0)
    end
    return reply('STALLED', 0)
  end
  release_parts(prefix, auth_id, f[5], nil)
  redis.call('HSET', auth, 's', 'EXPIRED')
  redis.call('ZREM', prefix .. ':expiry', auth_id)
  return reply('AUTHORIZATION_EXPIRED', 0)
end
local amount = tonumber(ARGV[5])
if amount == 0 then amount = approved end
if amount > approved then return reply('CAPTURE_EXCEEDS_APPROVED', 0) end
touch(prefix .. ':expiry', prefix .. ':capturing')
-- cs: when this claim began, as sent (a string): the claim's token for capture_finish.lua.
redis.call('HSET', auth, 's', 'CAPTURING', 'ck', ARGV[4], 'cp', amount, 'cs', ARGV[2])
redis.call('ZREM', prefix .. ':expiry', auth_id)
redis.call('ZADD', prefix .. ':capturing', now, auth_id)
return reply('OK', amount)
