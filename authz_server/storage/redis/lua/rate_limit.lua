-- Admits one call of a principal, or says how long to wait: a token bucket (rate per second,
-- burst) and a bound on its calls in flight, in one round trip, shared by every worker and pod.
-- KEYS, ARGV and reply: RateLimit in storage/redis/quota_io.py (the keys: keys.rate_limit).
-- A call in flight is forgotten after its TTL, so a worker that died mid-call frees its slots by
-- itself. Time is Redis's (TIME), so pods with skewed clocks share one bucket fairly.
-- The calls of the principal that ended since its last admission are forgotten first (ARGV[6]
-- says how many ids follow it): freeing a slot costs no command of its own.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local max_in_flight = tonumber(ARGV[3])
local ttl = tonumber(ARGV[5])
local ended = tonumber(ARGV[6] or '0')

if ended > 0 then
  redis.call('ZREM', KEYS[2], unpack(ARGV, 7, 6 + ended))
end

if max_in_flight > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= max_in_flight then
    return {0, 20, 2}
  end
end

local state = redis.call('HMGET', KEYS[1], 't', 'ts')
local tokens = tonumber(state[1])
local since = tonumber(state[2])
-- A refill in this clock's future was written by a clock ahead of it (a failover to a replica
-- whose clock is behind, a clock stepped back): nothing tells how long ago it was, so the bucket
-- starts full, as one Redis lost does (else a bucket left empty would refuse until this clock
-- caught up, its key kept as long).
if tokens == nil or since == nil or since > now then
  tokens = burst
  since = now
end
tokens = math.min(burst, tokens + math.max(0, now - since) * rate / 1000)
if tokens < 1 then
  return {0, math.ceil((1 - tokens) * 1000 / rate), 1}
end
redis.call('HSET', KEYS[1], 't', string.format('%.6f', tokens - 1), 'ts', string.format('%d', now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
if max_in_flight > 0 then
  redis.call('ZADD', KEYS[2], string.format('%d', now + ttl), ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ttl + 1000)
end
return {1, 0, 0}
