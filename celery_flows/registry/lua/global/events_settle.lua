--[[
  events_settle: forget a flow's note in the copy queue of Redis Cluster events
  (keys.py <prefix>:{events}:due) once its events are copied, unless a client noted it
  again since the copier read it (a transition begun meanwhile: its events are copied
  in a later round).
  KEYS[1] the due zset   KEYS[2] request key under {events} (lua/_request.lua)
  ARGV[1] flow id        ARGV[2] the note's score when the copier read it
  Returns: 1 forgotten | 0 noted again (kept)
]]
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) > tonumber(ARGV[2]) then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
