--[[
  conc_admit: free the places of the given flows, then admit the earliest flows of the
  line while the key has places (SPEC section 12). The caller (engine/groups.py) then
  starts each admitted flow (lua/conc_start.lua); a crash before that leaves it in the
  running set with its flow still waiting, which the reconciler starts.
  All keys share the hash tag {conc} (keys.py):
  KEYS[1] running zset of the key   KEYS[2] line zset of the key
  KEYS[3] life hash of the key      KEYS[4] keys index zset
  ARGV[1] the group's limit   ARGV[2] the keys index member, "<group>|<key>"
  ARGV[3..] pairs: flow id, life: freed (from the running set or the line) only if that
            life is still the one recorded
  Returns: {flow id, life, flow id, life, ...} the flows admitted now
]]
local RUN, LINE, GEN, INDEX = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local limit = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for i = 3, #ARGV - 1, 2 do
  local fid = ARGV[i]
  if redis.call('HGET', GEN, fid) == ARGV[i + 1] then
    redis.call('ZREM', RUN, fid)
    redis.call('ZREM', LINE, fid)
    redis.call('HDEL', GEN, fid)
  end
end
local out = {}
while redis.call('ZCARD', RUN) < limit do
  local head = redis.call('ZRANGE', LINE, 0, 0)[1]
  if not head then break end
  redis.call('ZREM', LINE, head)
  redis.call('ZADD', RUN, now, head)
  out[#out + 1] = head
  out[#out + 1] = redis.call('HGET', GEN, head) or ''
end
if redis.call('ZCARD', RUN) == 0 and redis.call('ZCARD', LINE) == 0 then
  redis.call('ZREM', INDEX, ARGV[2])
  redis.call('DEL', GEN)
end
return out
