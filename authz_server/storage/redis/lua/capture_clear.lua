-- Takes an authorization out of its slot's capturing zset when no capture holds it. A hold a
-- rebuild put back (PENDING, rs = 1, listed there by the rebuild: awaiting_settlement in
-- lua/_lib.lua) that SQL, read under its quotas' row locks, says has no capture is an ordinary
-- open hold from then on; a listed hold finished since by other means (a void, a dissolution,
-- its bound) only leaves the list. A CAPTURING hold's entry is its claim's: left as it is.
-- KEYS, ARGV and reply: CaptureClear in storage/redis/script_io.py.
-- A PENDING hold gets its own expiry back (expire_due may have moved it to its bound sb); the
-- caller lowers the slot's due index entry to it in the same write.
-- Returns 1 when the authorization is out of the list (or was not in it), 0 when a capture
-- holds it.
-- A PENDING hold one of whose quotas was dissolved while it waited (quota_dissolve.lua leaves
-- such a hold for this settlement) is voided as the dissolution would have: its parts on the
-- other quotas go back, and a later capture is refused RELATIONSHIP_NOT_ACTIVE.
local prefix, auth = ARGV[1], KEYS[1]
local auth_id = string.match(auth, ':a:(.+)$')
local hold = redis.call('HMGET', auth, 's', 'ex', 'f')
if hold[1] == 'CAPTURING' then return 0 end
local dissolved = false
if hold[1] == 'PENDING' then
  for _, part in ipairs(parse_funding(hold[3])) do
    if redis.call('HGET', prefix .. ':q:' .. part[1], 'status') == 'DISSOLVED' then
      dissolved = true
    end
    touch(prefix .. ':qh:' .. part[1])  -- release_parts may write it: before the first write
  end
end
touch(prefix .. ':capturing', prefix .. ':expiry')
redis.call('ZREM', prefix .. ':capturing', auth_id)
if dissolved then
  release_parts(prefix, auth_id, hold[3], nil)
  redis.call('HSET', auth, 's', 'VOIDED', 'vr', 'RELATIONSHIP_NOT_ACTIVE')
  redis.call('ZREM', prefix .. ':expiry', auth_id)
elseif hold[1] == 'PENDING' and redis.call('ZSCORE', prefix .. ':expiry', auth_id) then
  redis.call('ZADD', prefix .. ':expiry', hold[2], auth_id)
end
return 1
