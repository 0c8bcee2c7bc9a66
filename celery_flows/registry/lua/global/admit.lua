--[[
  admit: may a node be released now under every limit that applies to it?
  All scheduling keys share the hash tag {sched}, so one script checks them together.
  KEYS[1]            waits index (set of limiter ids that have waiting nodes)
  KEYS[2i], KEYS[2i+1]  for limiter i (rates first, then the queue cap if any):
                     its state key (rate: TAT string; cap: slots zset) and its wait queue
  KEYS[#KEYS]        request key under {sched} (lua/_request.lua: a re-sent call returns
                     the first reply, so it never takes a second rate slot); the script
                     sees KEYS without it
  ARGV[1] member (order key|flow|node|attempt; wait queues sort members lexically)
  ARGV[2] task id (the slot holder)   ARGV[3] number of rate limiters
  ARGV[4] queue cap (0: none)   ARGV[5..] per limiter: its id; per rate limiter then its
          interval in seconds (GCRA, no burst: releases at least one interval apart)
  Returns: {1, the Redis time of the release} admitted (rates consumed, slot taken,
           wait entries removed)
           {0, seconds to wait (-1: until a slot frees, 0: behind better-ordered nodes),
            limiter id} refused; the member waits in that limiter's queue
]]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local member, task_id = ARGV[1], ARGV[2]
local nrates, cap = tonumber(ARGV[3]), tonumber(ARGV[4])
local n = (#KEYS - 1) / 2
local ids, intervals = {}, {}
local a = 5
for i = 1, n do
  ids[i] = ARGV[a]
  a = a + 1
  if i <= nrates then
    intervals[i] = tonumber(ARGV[a])
    a = a + 1
  end
end

local refused, wait = nil, 0
-- a node that holds its queue slot already (a retry, a sensor's next poke) keeps it:
-- it does not queue behind the nodes waiting for that slot
local holds = cap > 0 and redis.call('ZSCORE', KEYS[2 * n], task_id)
-- nodes already waiting for a limiter in a better order go first
for i = 1, n do
  local head = redis.call('ZRANGE', KEYS[2 * i + 1], 0, 0)[1]
  if holds and i == n then head = nil end
  if head and head ~= member and head < member then
    refused, wait = i, 0
    break
  end
end
local tats = {}
if not refused then
  for i = 1, nrates do
    tats[i] = tonumber(redis.call('GET', KEYS[2 * i])) or 0
    if tats[i] > now then
      refused, wait = i, tats[i] - now
      break
    end
  end
end
if not refused and cap > 0 then
  local slots = KEYS[2 * n]
  if not holds and redis.call('ZCARD', slots) >= cap then
    refused, wait = n, -1
  end
end
if refused then
  redis.call('ZADD', KEYS[2 * refused + 1], 0, member)
  redis.call('SADD', KEYS[1], ids[refused])
  return {0, tostring(wait), ids[refused]}
end
for i = 1, nrates do
  local tat = math.max(tats[i], now) + intervals[i]
  redis.call('SET', KEYS[2 * i], tostring(tat), 'EX', math.ceil(intervals[i]) + 3600)
end
if cap > 0 then redis.call('ZADD', KEYS[2 * n], now, task_id) end
for i = 1, n do
  redis.call('ZREM', KEYS[2 * i + 1], member)
end
return {1, tostring(now)}
