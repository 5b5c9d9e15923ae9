-- Authorize in one round trip: expire due holds, check idempotency, choose the funding, place
-- the hold, remember the answer.
-- KEYS, ARGV (by number) and reply: Authorize in storage/redis/script_io.py.
local prefix, now = ARGV[1], tonumber(ARGV[2])
expire_due(prefix, now, 16)

local function answer(kind, record)
  return {kind, record.a, record.d, record.r, tostring(record.ap), record.f, tostring(record.rem),
          record.s, tostring(record.ex), record.t}
end

if redis.call('EXISTS', KEYS[2]) == 1 then
  local stored = redis.call('HGETALL', KEYS[2])
  local record = {}
  for i = 1, #stored, 2 do record[stored[i]] = stored[i + 1] end
  if record.digest ~= ARGV[7] then return {'REUSED'} end
  -- A till asking again is not a till that gave up: the hold's grace before it may be released
  -- as abandoned (runtime/release_abandoned_holds.py) runs from its last ask, rt, should this
  -- replay's journal row not commit either. Read before it is written (touch, _lib.lua).
  local hold = prefix .. ':a:' .. record.a
  if redis.call('HGET', hold, 's') == 'PENDING' then redis.call('HSET', hold, 'rt', now) end
  return answer('REPLAY', record)
end

local auth_id, need = ARGV[3], tonumber(ARGV[8])
local record = {a = auth_id, d = 'DECLINED', r = ARGV[12], ap = 0, f = '', rem = 0,
                s = 'DECLINED', ex = 0, t = ARGV[15]}

-- The quotas that may fund it: the named one, or all the beneficiary's, oldest first. Also
-- looked up when only the items were refused, so that remaining_quota_fen tells the till what is
-- there; not when the merchant may not charge the quota at all.
local candidates = {}
if record.r == '' or record.r == 'ITEM_NOT_ELIGIBLE' then
  local missing = ''
  if ARGV[10] ~= '' then
    local quota = prefix .. ':q:' .. ARGV[10]
    local status = redis.call('HGET', quota, 'status')
    if not status or redis.call('HGET', quota, 'beneficiary') ~= ARGV[5] then
      missing = 'RELATIONSHIP_NOT_FOUND'
    elseif status ~= 'ACTIVE' then
      missing = 'RELATIONSHIP_NOT_ACTIVE'
    else
      candidates = {ARGV[10]}
    end
  else
    candidates = redis.call('ZRANGE', KEYS[3], 0, -1)
    if #candidates == 0 then missing = 'RELATIONSHIP_NOT_FOUND' end
  end
  if record.r == '' then record.r = missing end
end
if record.r == '' and ARGV[14] == '1' then
  local quota = prefix .. ':q:' .. candidates[1]
  if redis.call('HGET', quota, 'scheme') ~= 'RESIDENT' then
    record.r = 'BENEFICIARY_NOT_ELIGIBLE'
  end
end

-- total: what the quotas can fund, each at least 0. A quota's available is below zero while
-- its holds over-commit it (holds put back on money approved twice, hold_restore.lua): it funds
-- nothing, and takes nothing from what the others can.
local available = {}
local total = 0
for i, rid in ipairs(candidates) do
  available[i] = tonumber(redis.call('HGET', prefix .. ':q:' .. rid, 'available'))
  total = total + math.max(0, available[i])
end

if record.r == '' then
  -- Funding order: the first single quota that covers the whole amount; else split across the
  -- quotas in order (oldest relationship first); with allow_partial, what all of them hold.
  local plan = {}
  for i, rid in ipairs(candidates) do
    if available[i] >= need then plan = {{i, need}} break end
  end
  if #plan == 0 then
    local approved = need
    if total < need then
      if ARGV[9] == '1' and total > 0 then approved = total else approved = 0 end
    end
    local left = approved
    for i, _ in ipairs(candidates) do
      if left == 0 then break end
      local take = math.min(left, available[i])
      if take > 0 then plan[#plan + 1] = {i, take} left = left - take end
    end
  end
  if #plan == 0 then
    record.r = 'INSUFFICIENT_QUOTA'
  else
    local pieces = {}
    touch(prefix .. ':capturing')
    for _, step in ipairs(plan) do touch(prefix .. ':qh:' .. candidates[step[1]]) end
    for _, step in ipairs(plan) do
      local rid, amount = candidates[step[1]], step[2]
      local quota = prefix .. ':q:' .. rid
      redis.call('HINCRBY', quota, 'available', -amount)
      redis.call('HINCRBY', quota, 'held', amount)
      redis.call('SADD', prefix .. ':qh:' .. rid, auth_id)
      available[step[1]] = available[step[1]] - amount
      total = total - amount
      record.ap = record.ap + amount
      pieces[#pieces + 1] = rid .. '=' .. amount
    end
    record.f = table.concat(pieces, ';')
    -- Partial when less than the amount asked: short quota, or ineligible lines left out.
    record.d = (record.ap < tonumber(ARGV[16])) and 'PARTIALLY_APPROVED' or 'APPROVED'
    record.s = (ARGV[13] == '1') and 'CAPTURING' or 'PENDING'
    record.ex = tonumber(ARGV[11])
    if record.s == 'PENDING' then redis.call('ZADD', KEYS[4], record.ex, auth_id) end
    -- A one-step payment is a capture from its start: the sweeper settles it as SQL says if
    -- its process never finishes it (it is never PENDING, so expiry would never free it).
    if record.s == 'CAPTURING' then redis.call('ZADD', prefix .. ':capturing', now, auth_id) end
  end
end
record.rem = total

-- The hold: merchant, beneficiary, purpose, status, approved, captured, funding, expires,
-- created, decision, reason, capture key, one-step payment (1/0; such a hold is voided, not put
-- back, when SQL turns out not to have it), ik the Authorize's idempotency key (a hold whose
-- journal row never committed is released under it: runtime/release_abandoned_holds.py).
redis.call('HSET', KEYS[1], 'm', ARGV[4], 'b', ARGV[5], 'p', ARGV[6], 's', record.s,
  'ap', record.ap, 'cp', 0, 'f', record.f, 'ex', record.ex, 'cr', now, 'd', record.d,
  'r', record.r, 'ck', '', 'o', ARGV[13], 'ik', ARGV[17])
-- A one-step payment's claim begins now: cs is its token for capture_finish.lua.
if record.s == 'CAPTURING' then redis.call('HSET', KEYS[1], 'cs', ARGV[2]) end
redis.call('HSET', KEYS[2], 'digest', ARGV[7], 'a', auth_id, 'd', record.d, 'r', record.r,
  'ap', record.ap, 'f', record.f, 'rem', record.rem, 's', record.s, 'ex', record.ex,
  't', record.t, 'cr', now)
return answer('NEW', record)
