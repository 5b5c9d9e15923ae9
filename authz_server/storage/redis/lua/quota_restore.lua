-- Sets a quota from the ledger's unused figure (available + held), keeping its open holds.
-- KEYS, ARGV and reply: QuotaRestoreCall in storage/redis/quota_io.py.
-- The caller holds the relationship's row lock from its read of SQL until this has run, so no
-- money of this quota commits in between. Held is recounted from the open holds themselves.
-- r and a new epoch e tell later credits and give-backs that the figure counts them already
-- (quota_credit.lua). A quota with a capture between its phases is left as it is (BUSY): its
-- SQL write may have committed, and the figure would count the capture twice once its hold is
-- finished. Returns {available, held} (available below zero when the holds exceed unused; held
-- never is), or {-1, -1} when BUSY.
-- The caller read the quota's money version v (ARGV[11]) under the same row lock. A restore
-- that reaches Redis after the lock was let go (its reply timed out, the caller gave up; the
-- command itself was only late) must change nothing once any money of the quota moved since:
-- a capture finished since would be counted back, a dissolved quota made active again. Every
-- script that changes available + held moves v on (and so does this one), so such a late
-- restore finds another v and does nothing: {-2, -2} (MOVED). A late one that finds v as it
-- read it is as right as it was under the lock (credits and captures committed since carry
-- their own marks: r, BUSY).
local unused, prefix = tonumber(ARGV[4]), ARGV[8]
local version = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if version ~= tonumber(ARGV[11]) then return {-2, -2} end
if ARGV[3] ~= 'ACTIVE' then
  -- Dissolved in SQL: as quota_dissolve.lua does, its open holds voided too. Its own Redis step
  -- may have been lost (its process died, its reply timed out and nobody retried): marked
  -- DISSOLVED here with its holds left PENDING, a hold split over it and another quota held that
  -- quota's part for nobody until it expired (a capture of it is refused in SQL), and the
  -- rolling reconcile's dissolutions cursor (runtime/reconcile_dissolved.py) passes quotas no
  -- longer active in Redis by.
  local voiding = holds_of_dissolved(prefix, ARGV[1])
  redis.call('HSET', KEYS[1], 'status', 'DISSOLVED', 'available', 0, 'held', 0,
    'holder', ARGV[2], 'beneficiary', ARGV[6], 'scheme', ARGV[7], 'r', ARGV[9])
  redis.call('HSET', KEYS[1], 'e', ARGV[10], 'v', version + 1)
  redis.call('ZREM', KEYS[2], ARGV[1])
  dissolve_holds(prefix, ARGV[1], voiding)
  return {0, 0}
end
local held = 0
local holds = prefix .. ':qh:' .. ARGV[1]
local finished = {}
for _, auth_id in ipairs(redis.call('SMEMBERS', holds)) do
  local auth = prefix .. ':a:' .. auth_id
  local status = redis.call('HGET', auth, 's')
  if status == 'CAPTURING' then return {-1, -1} end
  if status == 'PENDING' then
    for _, part in ipairs(parse_funding(redis.call('HGET', auth, 'f'))) do
      if part[1] == ARGV[1] then held = held + part[2] end
    end
  else
    finished[#finished + 1] = auth_id
  end
end
for _, auth_id in ipairs(finished) do redis.call('SREM', holds, auth_id) end
-- Held is the holds' sum even above unused (a hold put back on money approved twice,
-- hold_restore.lua): available then falls below zero, nothing more is approved, and each hold's
-- release gives back exactly what it holds. Capping held at unused here would let those
-- releases give back more than the ledger has unused.
redis.call('HSET', KEYS[1], 'status', 'ACTIVE', 'available', unused - held, 'held', held,
  'holder', ARGV[2], 'order', ARGV[5], 'beneficiary', ARGV[6], 'scheme', ARGV[7],
  'r', ARGV[9])
redis.call('HSET', KEYS[1], 'e', ARGV[10], 'v', version + 1)
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
return {unused - held, held}
