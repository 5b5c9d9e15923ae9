-- Shared functions, prepended to each script that needs them (see scripts.py).
-- Conventions: `prefix` is the slot's key prefix mw:{b:<digest>}; money is integer fen;
-- an authorization hash has fields m (merchant), b (beneficiary), p (purpose), s (status:
-- PENDING, CAPTURING, CAPTURED, VOIDED, EXPIRED, DECLINED), ap (approved fen), cp (captured fen),
-- f (funding "rid=fen;rid=fen"), ex (expires at, ms), cr (created at, ms), ck (capture key),
-- ik (the Authorize's idempotency key; absent on holds a rebuild put back, and on those placed
-- before it was kept), rt (when a retry last replayed it, ms; absent until one did); a hold a
-- rebuild put back also rs = 1 and sb (until when its expiry waits for the sweeper's
-- settlement, ms: awaiting_settlement).

-- Redis Cluster: in a slot being migrated (resharding), Redis refuses a script's access to a
-- key it did not declare in KEYS and does not hold (it may have moved) with an error, and what
-- the script wrote before stays written. So a script reads (touches) every undeclared key it
-- may write before its first write: refused, it has written nothing, and the call can be
-- answered UNAVAILABLE and retried. Outside a migration EXISTS of a missing key costs nothing.
local function touch(...)
  redis.call('EXISTS', ...)
end

local function parse_funding(text)
  local parts = {}
  for rid, amount in string.gmatch(text or '', '([^=;]+)=(%d+)') do
    parts[#parts + 1] = {rid, tonumber(amount)}
  end
  return parts
end

-- Gives a hold's money back to its quotas: held -> available (captured part excepted: it
-- leaves the quota, so the quota's money version v moves on, see quota_restore.lua).
-- Quotas no longer active are left alone: dissolution already returned their money.
local function release_parts(prefix, auth_id, funding, captured)
  local parts = parse_funding(funding)
  for _, part in ipairs(parts) do touch(prefix .. ':q:' .. part[1], prefix .. ':qh:' .. part[1]) end
  for _, part in ipairs(parts) do
    local quota = prefix .. ':q:' .. part[1]
    local taken = (captured and captured[part[1]]) or 0
    if redis.call('HGET', quota, 'status') == 'ACTIVE' then
      redis.call('HINCRBY', quota, 'held', -part[2])
      redis.call('HINCRBY', quota, 'available', part[2] - taken)
      if taken > 0 then redis.call('HINCRBY', quota, 'v', 1) end
    end
    redis.call('SREM', prefix .. ':qh:' .. part[1], auth_id)
  end
end

-- The open holds of a quota being dissolved (quota_dissolve.lua; quota_restore.lua when SQL
-- says the quota is no longer active: a dissolve whose Redis step was lost), to be voided once
-- the quota is marked DISSOLVED (dissolve_holds). A hold a rebuild put back that still waits
-- for the sweeper's settlement (rs = 1 and listed in the slot's capturing zset: see
-- awaiting_settlement) is left PENDING: its capture may have committed in SQL, and voided here
-- its parts on the other quotas would go back to them though spent. The settlement finishes it
-- as SQL says (captured; or, a funding quota dissolved, voided as here: capture_clear.lua).
-- Every key the voids write is read first (touch): in a slot being migrated a script is refused
-- on a key missing there, and refused half-way it would leave the quota dissolved with its holds
-- neither voided nor released.
local function holds_of_dissolved(prefix, rid)
  local holds = prefix .. ':qh:' .. rid
  touch(prefix .. ':capturing', prefix .. ':expiry', holds)
  local voiding = {}
  for _, auth_id in ipairs(redis.call('SMEMBERS', holds)) do
    local hold = redis.call('HMGET', prefix .. ':a:' .. auth_id, 's', 'rs', 'f')
    local waiting = hold[2] == '1'
      and redis.call('ZSCORE', prefix .. ':capturing', auth_id) ~= false
    if hold[1] == 'PENDING' and not waiting then
      voiding[#voiding + 1] = {auth_id, hold[3]}
      for _, part in ipairs(parse_funding(hold[3])) do
        touch(prefix .. ':q:' .. part[1], prefix .. ':qh:' .. part[1])
      end
    end
  end
  return voiding
end

-- Voids holds_of_dissolved's holds, the quota already DISSOLVED (release_parts skips it: their
-- parts on the beneficiary's other quotas go back to those), each remembering why (vr: a later
-- capture is refused RELATIONSHIP_NOT_ACTIVE), and drops the quota's hold set.
local function dissolve_holds(prefix, rid, voiding)
  for _, hold in ipairs(voiding) do
    release_parts(prefix, hold[1], hold[2], nil)
    redis.call('HSET', prefix .. ':a:' .. hold[1], 's', 'VOIDED', 'vr', 'RELATIONSHIP_NOT_ACTIVE')
    redis.call('ZREM', prefix .. ':expiry', hold[1])
  end
  redis.call('DEL', prefix .. ':qh:' .. rid)
end

-- Whether a hold a rebuild put back still waits for the sweeper to settle it as SQL says
-- (`hold`: its fields s, rs, sb as HMGET reads them). Its capture may have been claimed in the
-- Redis that was lost and have committed in SQL since, its process dead before finishing the
-- hold: released at its expiry, the captured money would go back to the quota (Redis
-- overstating it). The rebuild lists such a hold in the slot's capturing zset; the sweeper
-- takes it out once settled (service/capture_recovery.settle_capture: CAPTURED, or
-- lua/capture_clear.lua when SQL has no capture). It waits at most until its bound sb (ms): a
-- hold the sweeper could not settle by then is released as before, rather than held forever.
local function awaiting_settlement(prefix, auth_id, hold, now)
  return hold[1] == 'PENDING' and hold[2] == '1' and hold[3] ~= false
    and now < tonumber(hold[3])
    and redis.call('ZSCORE', prefix .. ':capturing', auth_id) ~= false
end

-- Whether a capture claimed in the Redis that was lost may still commit in SQL, for a hold
-- awaiting its settlement (awaiting_settlement): such a claim was made before the rebuild put
-- the hold back, and the capture writer writes a claim only within its write deadline
-- (service/ports.CAPTURE_WRITE_DEADLINE_SECONDS, 10 s) of it, by its own server's clock. The
-- hold's score in the capturing zset is when it was put back (or, later, when a claim of it
-- that was finished PENDING began), by the rebuilding server's clock, and `now` is this
-- caller's: so `window` (ms) is the sweeper's bound, STALE_CAPTURE_SECONDS (30 s), the
-- deadline plus room for clocks that differ between servers (as service/lost_authorizations.py
-- and the sweeper allow). With the bare deadline, a server whose clock ran ahead of the
-- rebuilder's settled the hold as not captured, and answered AUTHORIZATION_EXPIRED, while the
-- lost claim could still commit. Until the score plus the window, SQL's "no capture" may
-- still change.
local function lost_claim_may_commit(prefix, auth_id, now, window)
  local listed = redis.call('ZSCORE', prefix .. ':capturing', auth_id)
  return listed ~= false and now < tonumber(listed) + window
end

-- Expires up to `limit` holds of this slot whose time has come. Returns how many expired, and
-- how many it took from the expiry zset (a slot with more due holds has this at `limit`). A
-- put-back hold awaiting its settlement (awaiting_settlement) is not released: it is due again
-- at its bound sb, unless the settlement gives it its own expiry back first (capture_clear).
local function expire_due(prefix, now, limit)
  local expiry = prefix .. ':expiry'
  local due = redis.call('ZRANGEBYSCORE', expiry, '-inf', now, 'LIMIT', 0, limit)
  local expired = 0
  for _, auth_id in ipairs(due) do
    local auth = prefix .. ':a:' .. auth_id
    local hold = redis.call('HMGET', auth, 's', 'rs', 'sb', 'f')
    if awaiting_settlement(prefix, auth_id, hold, now) then
      redis.call('ZADD', expiry, hold[3], auth_id)
    else
      if hold[1] == 'PENDING' then
        release_parts(prefix, auth_id, hold[4], nil)
        redis.call('HSET', auth, 's', 'EXPIRED')
        expired = expired + 1
      end
      redis.call('ZREM', expiry, auth_id)
    end
  end
  return expired, #due
end
