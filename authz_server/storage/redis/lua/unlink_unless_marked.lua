-- The rebuild's sweep of one beneficiary slot (storage/redis/rebuild_writer.py
-- delete_hot_state): KEYS[1] the slot's generation mark, KEYS[2..] keys of that slot the sweep
-- found. They are deleted only while the slot is unmarked: the sweep deleted every mark first,
-- so a mark here now is a later rebuild's (this one was taken over) and the keys under it are
-- that rebuild's, of the same names. Returns how many it deleted.
if #KEYS < 2 or redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
return redis.call('UNLINK', unpack(KEYS, 2))
