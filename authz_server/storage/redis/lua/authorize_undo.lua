-- Undoes a decision authorize.lua just made, when its idempotency key turned out to be claimed
-- already by another request of the same merchant (for another beneficiary): the hold goes back
-- to the quotas and the decision is forgotten, as if the call had been refused at once.
-- KEYS, ARGV and reply: AuthorizeUndo in storage/redis/script_io.py.
local prefix, auth, auth_id = ARGV[1], KEYS[1], ARGV[2]
touch(prefix .. ':expiry', prefix .. ':capturing')
local funding = redis.call('HGET', auth, 'f')
for _, part in ipairs(parse_funding(funding)) do
  touch(prefix .. ':q:' .. part[1], prefix .. ':qh:' .. part[1])
end
if redis.call('HGET', KEYS[2], 'a') == auth_id then redis.call('DEL', KEYS[2]) end
local status = redis.call('HGET', auth, 's')
local released = 0
if status == 'PENDING' or status == 'CAPTURING' then
  release_parts(prefix, auth_id, redis.call('HGET', auth, 'f'), nil)
  redis.call('ZREM', prefix .. ':expiry', auth_id)
  redis.call('ZREM', prefix .. ':capturing', auth_id)
  released = 1
end
redis.call('DEL', auth)
-- 1 when this call gave money back (0: already released, settled, or gone)
return released
