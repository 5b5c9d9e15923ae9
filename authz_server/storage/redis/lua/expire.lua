-- The sweeper's script: expires due holds of one slot, so money returns without traffic.
-- KEYS, ARGV and reply ({how many expired, how many were due}): Expire in
-- storage/redis/script_io.py.
local expired, taken = expire_due(ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]))
return {expired, taken}
