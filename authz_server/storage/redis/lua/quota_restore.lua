-- Sets a quota from the ledger's unused figure (available + held), keeping open holds.
-- KEYS[1] quota hash, KEYS[2] beneficiary's quota index.
-- ARGV: relationship id, holder id, 'ACTIVE' or 'DISSOLVED', unused_fen, funding order.
-- Returns {available, held}.
local unused = tonumber(ARGV[4])
if ARGV[3] ~= 'ACTIVE' then
  redis.call('HSET', KEYS[1], 'status', 'DISSOLVED', 'available', 0, 'held', 0, 'holder', ARGV[2])
  redis.call('ZREM', KEYS[2], ARGV[1])
  return {0, 0}
end
local held = tonumber(redis.call('HGET', KEYS[1], 'held') or '0')
if held > unused then
  held = unused
end
redis.call('HSET', KEYS[1], 'status', 'ACTIVE', 'available', unused - held, 'held', held,
  'holder', ARGV[2], 'order', ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
return {unused - held, held}
