--[[
  fair_head: the member a limiter's releaser tries next (lua/fair/share.lua in front).
  First the limiter's single wait queue, if a version before fair share left one
  (admit.lua re-files what it tries there); then, after giving its turn back to the
  flow parked longest (one a call, once parked for ARGV[1] seconds: its node may have
  gone out or away without this limiter hearing of it), the first member of the front
  unit's front flow.
  KEYS[1] its old single wait queue  KEYS[2..6] its units, flows, turns, queue and
  parked flows  KEYS[7] request key under {sched} (lua/_request.lua), not seen
  ARGV[1] seconds a flow stays parked at most
  Returns: {member, its unit, ''} | {'', '', seconds until a parked flow's turn comes
           back ('' when none is parked)}
]]
local legacy = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
if legacy then return {legacy, '', ''} end
local UNITS, FLOWS, TURNS, QUEUE, PARKED = KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local ttl = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local old = redis.call('ZRANGEBYSCORE', PARKED, '-inf', now - ttl, 'LIMIT', 0, 1)[1]
if old then
  local sp = string.find(old, ' ', 1, true)
  fair_park(UNITS, FLOWS, TURNS, PARKED, string.sub(old, 1, sp - 1), string.sub(old, sp + 1),
            now, false)
  redis.call('ZREM', PARKED, old)
end
-- a flow or unit left without members (never written so, but cheap to mend) is dropped
for _ = 1, 8 do
  local u = redis.call('ZRANGE', UNITS, 0, 0, 'WITHSCORES')
  if not u[1] or tonumber(u[2]) >= OFF then break end
  local f = fair_front_flow(FLOWS, u[1])
  if f then
    local m = fair_head_of(QUEUE, f)
    if m then return {m, u[1], ''} end
    fair_set_flow(FLOWS, TURNS, u[1], f, nil)
  end
  fair_fix_unit(UNITS, FLOWS, u[1])
end
local p = redis.call('ZRANGE', PARKED, 0, 0, 'WITHSCORES')
if p[2] then return {'', '', tostring(math.max(tonumber(p[2]) + ttl - now, 0))} end
return {'', '', ''}
