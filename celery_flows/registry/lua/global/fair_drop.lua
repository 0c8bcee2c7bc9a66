--[[
  fair_drop: a member a releaser found stale (its node moved on, its flow is gone)
  leaves the limiter's queues; its flow keeps its turn (lua/fair/share.lua in front).
  KEYS[1] its old single wait queue  KEYS[2..6] its units, flows, turns, queue and
  parked flows  KEYS[7] request key (lua/_request.lua), not seen
  ARGV[1] member  ARGV[2] its unit ('' for one of the old queue)  ARGV[3] flow id
]]
redis.call('ZREM', KEYS[1], ARGV[1])
if ARGV[2] ~= '' then
  fair_leave(KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], ARGV[2], ARGV[3], ARGV[1], false)
end
return 1
