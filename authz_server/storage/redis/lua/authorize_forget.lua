-- Forgets the decision of a one-step payment that was voided because SQL never had its capture
-- (capture_finish with why NOT_WRITTEN): nothing was paid, so a retry with the same key makes
-- the payment instead of being answered with the void. Any other decision stays.
-- KEYS, ARGV and reply: AuthorizeForget in storage/redis/script_io.py.
-- Returns 1 when the decision was forgotten, 0 when it stands, -1 when the key no longer names
-- this decision (a retry racing this one forgot it, and may have decided anew).
if redis.call('HGET', KEYS[1], 'a') ~= ARGV[1] then return -1 end
local f = redis.call('HMGET', KEYS[2], 's', 'vr', 'o')
if f[1] ~= 'VOIDED' or f[2] ~= 'NOT_WRITTEN' or f[3] ~= '1' then return 0 end
redis.call('DEL', KEYS[1])
return 1
