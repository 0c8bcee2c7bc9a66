--[[
  events_copied: the --flows worker copying a flow's events into the registry's stream
  on Redis Cluster (worker/eventcopy.py) has copied them up to ARGV[1].
  KEYS: the flow's keys (meta ... events hooks), request (lua/_request.lua)
  ARGV[1] the id (in the flow's stream) of the last event copied
  Returns: 1 nothing is left to copy (ev_due cleared: the engine's flush() sets it again
           with the next event, lua/engine/cache.lua) | 0 newer events wait
  Writes no event. A flow that expired meanwhile has nothing left (1), and no meta is
  made for it.
]]
if redis.call('EXISTS', META) == 0 then return 1 end
redis.call('HSET', META, 'ev_copied', ARGV[1])
local last = redis.call('XREVRANGE', EVENTS, '+', '-', 'COUNT', 1)
if #last == 0 or last[1][1] == ARGV[1] then
  redis.call('HDEL', META, 'ev_due')
  return 1
end
return 0
