-- Shared functions, prepended to each script that needs them (see scripts.py).
-- Conventions: `prefix` is the slot's key prefix mw:{b:<digest>}; money is integer fen;
-- an authorization hash has fields m (merchant), b (beneficiary), p (purpose), s (status:
-- PENDING, CAPTURING, CAPTURED, VOIDED, EXPIRED, DECLINED), ap (approved fen), cp (captured fen),
-- f (funding "rid=fen;rid=fen"), ex (expires at, ms), cr (created at, ms), ck (capture key).

local function parse_funding(text)
  local parts = {}
  for rid, amount in string.gmatch(text or '', '([^=;]+)=(%d+)') do
    parts[#parts + 1] = {rid, tonumber(amount)}
  end
  return parts
end

-- Gives a hold's money back to its quotas: held -> available (captured part excepted).
-- Quotas no longer active are left alone: dissolution already returned their money.
local function release_parts(prefix, auth_id, funding, captured)
  for _, part in ipairs(parse_funding(funding)) do
    local quota = prefix .. ':q:' .. part[1]
    local taken = (captured and captured[part[1]]) or 0
    if redis.call('HGET', quota, 'status') == 'ACTIVE' then
      redis.call('HINCRBY', quota, 'held', -part[2])
      redis.call('HINCRBY', quota, 'available', part[2] - taken)
    end
    redis.call('SREM', prefix .. ':qh:' .. part[1], auth_id)
  end
end

-- Expires up to `limit` holds of this slot whose time has come; returns how many.
local function expire_due(prefix, now, limit)
  local expiry = prefix .. ':expiry'
  local due = redis.call('ZRANGEBYSCORE', expiry, '-inf', now, 'LIMIT', 0, limit)
  for _, auth_id in ipairs(due) do
    local auth = prefix .. ':a:' .. auth_id
    if redis.call('HGET', auth, 's') == 'PENDING' then
      release_parts(prefix, auth_id, redis.call('HGET', auth, 'f'), nil)
      redis.call('HSET', auth, 's', 'EXPIRED')
    end
    redis.call('ZREM', expiry, auth_id)
  end
  return #due
end
