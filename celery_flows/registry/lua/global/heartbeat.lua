--[[
  heartbeat: a worker says it is alive, timed by Redis TIME (one clock for the cluster).
  KEYS[1] workers zset (instance -> last heartbeat)   KEYS[2] worker info hash
  KEYS[3] request key under {workers} (lua/_request.lua), not seen by the script
  ARGV[1] instance id   ARGV[2] info JSON
  Returns: the Redis time used, as a string.
]]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return tostring(now)
