-- Prepended to every script (scripts.py): the slot must belong to the generation the caller
-- decides in (its last argument, added by the connection: storage/redis/generation.py). A slot
-- whose marker is missing (Redis restarted empty, FLUSHALL, a slot never used) or another
-- generation's (a rebuild ran) is refused before anything is read or written, so no decision is
-- ever made on data Redis lost.
do
  local marker_key = string.match(KEYS[1], '^(mw:{b:%x+})') .. ':g'
  local marker = redis.call('GET', marker_key)
  if marker ~= ARGV[#ARGV] then
    if not marker then return redis.error_reply('MWUNMARKED ' .. marker_key) end
    return redis.error_reply('MWSTALE ' .. marker_key .. ' ' .. marker)
  end
end
