--[[
  conc_enqueue: a flow of a concurrency group asks for a place (SPEC section 12). Its
  flow is stored already (waiting: meta cwait=1); its first claim (code 3) brings the
  caller here, so a crash before this call is repaired by the sweeper's next claim.
  Idempotent per life (cgen): a call for the life already recorded answers the same.
  All keys share the hash tag {conc} (keys.py):
  KEYS[1] running zset of the key   KEYS[2] line zset of the key
  KEYS[3] life hash of the key      KEYS[4] evict zset   KEYS[5] keys index zset
  KEYS[6] sequence string (line order)
  ARGV[1] flow id  ARGV[2] its life (meta cgen)  ARGV[3] the group's limit
  ARGV[4] on_limit: queue | cancel_newest | cancel_oldest
  ARGV[5] the keys index member, "<group>|<key>"
  Returns: {1, victim flow id | ''} admitted (with cancel_oldest, the flow evicted to
           make room, noted in evict until it is cancelled) |
           {0, position in line (1-based)} waiting | {2, ''} to be cancelled
           (cancel_newest; noted in evict)
]]
local RUN, LINE, GEN, EVICT, INDEX, SEQ = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local fid, gen, limit, on_limit = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local known = redis.call('HGET', GEN, fid)
if known == gen then
  if redis.call('ZSCORE', RUN, fid) then return {1, ''} end
  local rank = redis.call('ZRANK', LINE, fid)
  if rank then return {0, rank + 1} end
end
if redis.call('ZSCORE', EVICT, fid) then return {2, ''} end
-- an earlier life's entry (the flow finished and was reopened): it goes
redis.call('ZREM', RUN, fid)
redis.call('ZREM', LINE, fid)
redis.call('ZADD', INDEX, now, ARGV[5])
if redis.call('ZCARD', RUN) < limit and redis.call('ZCARD', LINE) == 0 then
  redis.call('HSET', GEN, fid, gen)
  redis.call('ZADD', RUN, now, fid)
  return {1, ''}
end
if on_limit == 'cancel_newest' then
  redis.call('HDEL', GEN, fid)
  redis.call('ZADD', EVICT, now, fid)
  return {2, ''}
end
if on_limit == 'cancel_oldest' then
  local victim = redis.call('ZRANGE', RUN, 0, 0)[1]
  if victim then
    redis.call('ZREM', RUN, victim)
    redis.call('HDEL', GEN, victim)
    redis.call('ZADD', EVICT, now, victim)
    redis.call('HSET', GEN, fid, gen)
    redis.call('ZADD', RUN, now, fid)
    return {1, victim}
  end
end
redis.call('HSET', GEN, fid, gen)
redis.call('ZADD', LINE, redis.call('INCR', SEQ), fid)
return {0, redis.call('ZRANK', LINE, fid) + 1}
