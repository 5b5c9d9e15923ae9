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
local prefix, auth = ARGV[1], KEYS[1]
local auth_id = string.match(auth, ':a:(.+)$')
local hold = redis.call('HMGET', auth, 's', 'ex')
if hold[1] == 'CAPTURING' then return 0 end
touch(prefix .. ':capturing', prefix .. ':expiry')
redis.call('ZREM', prefix .. ':capturing', auth_id)
if hold[1] == 'PENDING' and redis.call('ZSCORE', prefix .. ':expiry', auth_id) then
  redis.call('ZADD', prefix .. ':expiry', hold[2], auth_id)
end
return 1
