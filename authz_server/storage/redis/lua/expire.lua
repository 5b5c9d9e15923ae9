-- The sweeper's script: expires due holds of one slot, so money returns without traffic.
-- KEYS: 1 expiry zset. ARGV: 1 prefix, 2 now ms, 3 limit. Returns how many expired.
return expire_due(ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]))
