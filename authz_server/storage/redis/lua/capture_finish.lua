-- Second phase, after SQL answered: CAPTURED (the captured parts leave the quotas, the rest of
-- the hold returns), VOIDED (SQL refused: the whole hold returns), or PENDING (SQL failed for
-- a passing reason: the hold is put back as it was, so the merchant can retry).
-- KEYS, ARGV and reply: CaptureFinish in storage/redis/script_io.py.
-- Finishes nothing when the hold is no longer in that claim: a sweeper that read SQL for an
-- old claim must not finish a newer one (a till's retry that settled and claimed it again),
-- whose own write SQL may be committing. Returns 1 when it finished the claim, else 0 (or -1
-- and 2, below).
-- A hold put back from SQL by a rebuild (rs = 1) lost its claim with Redis: a capture that was
-- being written then finishes it as CAPTURED or VOIDED from PENDING (SQL's answer is the
-- truth; the rebuild read SQL before that capture committed).
-- Such a hold finished as CAPTURED (still PENDING, or claimed again by a later capture) needs
-- the capture's ledger entries (ARGV[6] = '1', ARGV[7] "rid=entry;..."); without them it
-- returns -1 and does nothing, so the caller reads them from SQL only on this rare path. A
-- quota restore (quota_restore.lua) that read SQL after the capture committed set the quota
-- from an unused figure that counts the capture as spent, and counted this hold's part as held
-- on top: the quota's mark r is at least the capture's entry for it. Released as taken, the
-- part would leave that quota twice. There the part leaves held only: held is recounted from
-- the quota's other holds, exactly (as the restore counts it), and available + held
-- stays (v too: no money moved). A quota whose r is older was set from SQL before the capture
-- committed: there the part is released as taken. (The rebuild that put the hold back read it
-- with the quotas, under the same row locks, before the capture committed: the r it wrote is
-- older. hold_restore.lua may put a hold back later, with r already past the entry: it keeps
-- available + held, so the same comparison holds.) A quota with more than ARGV[8] other holds
-- is not recounted but released as taken: understated, never overstated; the reply is then 2
-- (finished; the caller sets that quota from the ledger).
local prefix, auth = ARGV[1], KEYS[1]
local auth_id = string.match(auth, ':a:(.+)$')
local state = redis.call('HMGET', auth, 's', 'cs', 'rs', 'f')
touch(prefix .. ':capturing', prefix .. ':expiry')
local restored = state[1] == 'PENDING' and state[3] == '1' and ARGV[2] ~= 'PENDING'
-- A hold a rebuild put back stays on the sweeper's list (the capturing zset, lua/_lib.lua
-- awaiting_settlement) until the sweeper settled it as SQL says: a finish that does not finish
-- it (a failed capture putting it back PENDING) does not take it off, nor does one that puts a
-- new claim of it back PENDING (it goes back on the list, scored by that claim): a capture
-- claimed in the Redis that was lost may still commit, its process gone.
if state[1] ~= 'CAPTURING' and not restored then
  if not (state[1] == 'PENDING' and state[3] == '1') then
    redis.call('ZREM', prefix .. ':capturing', auth_id)
  end
  return 0
end
if not restored and ARGV[5] and ARGV[5] ~= '' and state[2] ~= ARGV[5] then return 0 end
-- A hold a rebuild (or hold_restore) put back keeps rs = 1 when a later capture claims it again
-- (a till's retry whose first capture committed): that claim's finish may be the one that
-- comes after such a restore, so it asks for the entries too. A restore never reads a quota
-- while one of its holds is CAPTURING (BUSY), so a new capture in that claim finds r older
-- than its entry and is released as taken.
local put_back = state[3] == '1' and ARGV[2] == 'CAPTURED'
if put_back and ARGV[6] ~= '1' then return -1 end
local funding = parse_funding(state[4])

-- What the other open holds of quota `rid` hold on it; nil when it has more than ARGV[8] other
-- holds (not recounted: the part is released as taken, the quota understated; reply 2).
local function held_by_others(rid)
  local holds = prefix .. ':qh:' .. rid
  if redis.call('SCARD', holds) - redis.call('SISMEMBER', holds, auth_id) > tonumber(ARGV[8]) then
    return nil
  end
  local held = 0
  for _, other in ipairs(redis.call('SMEMBERS', holds)) do
    if other ~= auth_id then
      local hold = redis.call('HMGET', prefix .. ':a:' .. other, 's', 'f')
      if hold[1] == 'PENDING' or hold[1] == 'CAPTURING' then
        for _, part in ipairs(parse_funding(hold[2])) do
          if part[1] == rid then held = held + part[2] end
        end
      end
    end
  end
  return held
end

-- Read before the first write: relationship id -> {held, available} for each quota whose
-- restore counted this capture already.
local recounted, understated = {}, false
if put_back then
  local entries = {}
  for _, entry in ipairs(parse_funding(ARGV[7])) do entries[entry[1]] = entry[2] end
  for _, part in ipairs(funding) do
    local entry = entries[part[1]]
    local quota = redis.call('HMGET', prefix .. ':q:' .. part[1], 'status', 'r', 'available',
      'held')
    if entry and quota[1] == 'ACTIVE' and tonumber(quota[2] or '0') >= entry then
      local held = held_by_others(part[1])
      if held then
        -- Exact, as the restore counts it: holds worth more than the total (another put-back
        -- hold whose capture committed) leave available negative, and each release then gives
        -- back exactly what it held.
        local unused = tonumber(quota[3]) + tonumber(quota[4])
        recounted[part[1]] = {held, unused - held}
      else
        understated = true
      end
    end
  end
end

-- A claim finished PENDING (SQL has no capture of it) on a hold one of whose quotas was
-- dissolved while it was CAPTURING (holds_of_dissolved leaves a claimed hold to its capture):
-- no capture of it can ever be written (SQL refuses RELATIONSHIP_NOT_ACTIVE), so it is voided
-- as the dissolution would have voided it, its parts on the other quotas back at once. Put
-- back PENDING, it held them for nobody until it expired (a day for a medical hold). A hold a
-- rebuild put back (rs = 1) goes back on the sweeper's list instead (below): its settlement
-- voids it so (capture_clear.lua) once a claim lost with Redis can no longer commit.
local void_instead = false
if ARGV[2] == 'PENDING' and state[3] ~= '1' then
  for _, part in ipairs(funding) do
    if redis.call('HGET', prefix .. ':q:' .. part[1], 'status') == 'DISSOLVED' then
      void_instead = true
    end
  end
end
-- The quotas release_parts writes below, touched before this script's first write.
if ARGV[2] ~= 'PENDING' or void_instead then
  for _, part in ipairs(funding) do
    touch(prefix .. ':q:' .. part[1], prefix .. ':qh:' .. part[1])
  end
end
redis.call('ZREM', prefix .. ':capturing', auth_id)
redis.call('ZREM', prefix .. ':expiry', auth_id)
if void_instead then
  release_parts(prefix, auth_id, state[4], nil)
  redis.call('HSET', auth, 's', 'VOIDED', 'vr', 'RELATIONSHIP_NOT_ACTIVE', 'ck', '', 'cp', 0)
  return 1
end
if ARGV[2] == 'PENDING' then
  redis.call('HSET', auth, 's', 'PENDING', 'ck', '', 'cp', 0)
  redis.call('ZADD', prefix .. ':expiry', redis.call('HGET', auth, 'ex'), auth_id)
  if state[3] == '1' then redis.call('ZADD', prefix .. ':capturing', state[2], auth_id) end
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
local released = state[4]
if next(recounted) then
  -- available + held unchanged where recounted: no money of the quota moved (v stays).
  local rest = {}
  for _, part in ipairs(funding) do
    local figures = recounted[part[1]]
    if figures then
      redis.call('HSET', prefix .. ':q:' .. part[1], 'held', figures[1], 'available', figures[2])
      redis.call('SREM', prefix .. ':qh:' .. part[1], auth_id)
    else
      rest[#rest + 1] = part[1] .. '=' .. part[2]
    end
  end
  released = table.concat(rest, ';')
end
release_parts(prefix, auth_id, released, captured)
redis.call('HSET', auth, 's', ARGV[2], 'cp', total)
if ARGV[2] == 'VOIDED' and ARGV[4] and ARGV[4] ~= '' then redis.call('HSET', auth, 'vr', ARGV[4]) end
if understated then return 2 end
return 1
