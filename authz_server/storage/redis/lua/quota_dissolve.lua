-- Marks a quota dissolved so no new hold can be placed on it, and voids its open holds (their
-- parts on the beneficiary's other quotas go back to those). The ledger (SQL) already returned
-- this quota's unused money to the holder; here its figures go to zero. A hold voided here
-- remembers why (vr), so a later capture is refused RELATIONSHIP_NOT_ACTIVE.
-- KEYS, ARGV and reply: QuotaDissolve in storage/redis/quota_io.py.
-- A hold a rebuild put back that still waits for the sweeper's settlement (rs = 1 and listed
-- in the slot's capturing zset: lua/_lib.lua awaiting_settlement) is left PENDING: its capture
-- may have committed in SQL, and voided here its parts on the other quotas would go back to
-- them though spent. The settlement finishes it as SQL says (captured; or, a funding quota
-- dissolved, voided as here: lua/capture_clear.lua); this quota's part is gone with its figures.
-- Every key it reads or writes is read before its first write (lua/_lib.lua touch): in a slot
-- being migrated a script is refused on a key missing there, and refused half-way it would
-- leave the quota dissolved with its holds neither voided nor released.
local prefix = ARGV[2]
local holds = prefix .. ':qh:' .. ARGV[1]
touch(prefix .. ':capturing', prefix .. ':expiry', holds)
local voiding = {}
for _, auth_id in ipairs(redis.call('SMEMBERS', holds)) do
  local hold = redis.call('HMGET', prefix .. ':a:' .. auth_id, 's', 'rs', 'f')
  local waiting = hold[2] == '1'
    and redis.call('ZSCORE', prefix .. ':capturing', auth_id) ~= false
  if hold[1] == 'PENDING' and not waiting then
    voiding[#voiding + 1] = {auth_id, hold[3]}
    for _, part in ipairs(parse_funding(hold[3])) do
      touch(prefix .. ':q:' .. part[1], prefix .. ':qh:' .. part[1])
    end
  end
end
redis.call('HSET', KEYS[1], 'status', 'DISSOLVED', 'available', 0, 'held', 0)
redis.call('HINCRBY', KEYS[1], 'v', 1)  -- the money changed (quota_restore.lua)
redis.call('ZREM', KEYS[2], ARGV[1])
for _, hold in ipairs(voiding) do  -- this quota is DISSOLVED now: release_parts skips it
  release_parts(prefix, hold[1], hold[2], nil)
  redis.call('HSET', prefix .. ':a:' .. hold[1], 's', 'VOIDED', 'vr', 'RELATIONSHIP_NOT_ACTIVE')
  redis.call('ZREM', prefix .. ':expiry', hold[1])
end
redis.call('DEL', holds)
return 1
