--[[
  fair_head: the member a limiter's releaser tries next (lua/fair/share.lua in front).
  First the limiter's wait queue of format 1.3, if a registry of that format left one
  (admit.lua re-files what it tries there); then, after giving its turn back to the
  flow parked longest (one a call, once parked for ARGV[3] seconds: its node may have
  gone out or away without this limiter hearing of it), the front unit's front flow's
  first member. A flow's or unit's keys are built here from ARGV[1]: all are {sched}
  keys of one slot (keys.py).
  KEYS[1] the limiter's 1.3 wait queue  KEYS[2] its units  KEYS[3] its parked flows
  KEYS[4] request key under {sched} (lua/_request.lua), not seen by the script
  ARGV[1] the limiter's key prefix ("<prefix>:{sched}:", keys.py)  ARGV[2] limiter id
  ARGV[3] seconds a flow stays parked at most
  Returns: {member, its unit, ''} | {'', '', seconds until a parked flow's turn comes
           back ('' when none is parked)}
]]
local legacy = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
if legacy then return {legacy, '', ''} end
local base, lim, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local function flows_key(u) return base .. 'fl:' .. lim .. '|' .. u end
local function queue_key(f) return base .. 'mq:' .. lim .. '|' .. f end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local old = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now - ttl, 'LIMIT', 0, 1)[1]
if old then
  local sp = string.find(old, ' ', 1, true)
  local u, f = string.sub(old, 1, sp - 1), string.sub(old, sp + 1)
  fair_park(KEYS[2], flows_key(u), KEYS[3], u, f, now, false)
  redis.call('ZREM', KEYS[3], old)
end
-- a flow or unit left without members (never written so, but cheap to mend) is dropped
for _ = 1, 8 do
  local u = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  if not u[1] or tonumber(u[2]) >= OFF then break end
  local fk = flows_key(u[1])
  local f = redis.call('ZRANGE', fk, 0, 0)[1]
  if f then
    local m = redis.call('ZRANGE', queue_key(f), 0, 0)[1]
    if m then return {m, u[1], ''} end
    redis.call('ZREM', fk, f)
  end
  fair_fix_unit(KEYS[2], fk, u[1])
end
local p = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
if p[2] then return {'', '', tostring(math.max(tonumber(p[2]) + ttl - now, 0))} end
return {'', '', ''}
