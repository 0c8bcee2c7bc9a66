--[[
  fair/share.lua: the round-robin wait queues of one limiter (SPEC sections 7 and 12),
  put in front of the global scripts that use them (scripts.py FAIR_SCRIPTS). All
  their keys are {sched} keys (keys.py), one slot on Redis Cluster.

  Per limiter L, three levels, each O(log n) to read and to change:
    units  zset  share unit -> turn ("k|<group>|<key>" for a concurrency key, "f|<flow>"
                 for a flow without one): the lowest turn is served next
    flows  zset  (one per unit) flow id -> turn within the unit
    queue  zset  (one per flow) its members, all scores 0, in §7's order (ids.py)
  A served unit or flow takes the turn after the last one (fair_tail): round-robin.
  A flow whose node the rotation picked but another limiter refused is parked here:
  its turn is kept with OFF added (so it sorts after every active flow and is skipped
  in O(1)), and the parked zset notes since when. A unit whose flows are all parked is
  sunk the same way. A parked flow's node passes this limiter's order at any time (it
  kept its turn); unparking takes OFF off again, so it is served next.
]]
local OFF = 1e12

-- the turn after the last one given in z, parked turns included
local function fair_tail(z)
  local act = redis.call('ZREVRANGEBYSCORE', z, '(1000000000000', '-inf', 'WITHSCORES',
                         'LIMIT', 0, 1)
  local top = redis.call('ZREVRANGE', z, 0, 0, 'WITHSCORES')
  local last = tonumber(act[2]) or 0
  local t = tonumber(top[2])
  if t and t >= OFF and t - OFF > last then last = t - OFF end
  return last + 1
end

-- whether anything at this limiter is served by its rotation (not only parked flows)
local function fair_active(units)
  local u = redis.call('ZRANGE', units, 0, 0, 'WITHSCORES')
  return u[1] ~= nil and tonumber(u[2]) < OFF
end

-- a unit is active (its own turn) while one of its flows is, sunk by OFF while all are
-- parked, and gone with its last flow
local function fair_fix_unit(units, flows, unit)
  local f = redis.call('ZRANGE', flows, 0, 0, 'WITHSCORES')
  local us = tonumber(redis.call('ZSCORE', units, unit))
  if not f[1] then
    if us then redis.call('ZREM', units, unit) end
    return
  end
  local parked = tonumber(f[2]) >= OFF
  if not us then
    us = fair_tail(units)
    if parked then us = us + OFF end
    redis.call('ZADD', units, us, unit)
  elseif parked and us < OFF then
    redis.call('ZADD', units, us + OFF, unit)
  elseif not parked and us >= OFF then
    redis.call('ZADD', units, us - OFF, unit)
  end
end

-- where a flow stands at a limiter: 'absent' (nothing of it waits there), 'front' (its
-- turn), 'parked' (its turn, kept while another limiter holds its node) or 'behind'
local function fair_turn(units, flows, unit, flow)
  local fs = tonumber(redis.call('ZSCORE', flows, flow))
  if not fs then return 'absent' end
  if fs >= OFF then return 'parked' end
  if redis.call('ZRANGE', units, 0, 0)[1] ~= unit then return 'behind' end
  if redis.call('ZRANGE', flows, 0, 0)[1] ~= flow then return 'behind' end
  return 'front'
end

-- park (on) or unpark a flow at a limiter, keeping its turn
local function fair_park(units, flows, parked, unit, flow, now, on)
  local fs = tonumber(redis.call('ZSCORE', flows, flow))
  if not fs then return end
  if on and fs < OFF then
    redis.call('ZADD', flows, fs + OFF, flow)
    redis.call('ZADD', parked, now, unit .. ' ' .. flow)
  elseif not on and fs >= OFF then
    redis.call('ZADD', flows, fs - OFF, flow)
    redis.call('ZREM', parked, unit .. ' ' .. flow)
  end
  fair_fix_unit(units, flows, unit)
end

-- a member waits at a limiter: a new flow or unit takes the last turn
local function fair_enqueue(waits, counts, lim, units, flows, queue, unit, flow, member)
  if redis.call('ZADD', queue, 0, member) == 1 then
    redis.call('HINCRBY', counts, lim, 1)
  end
  if not redis.call('ZSCORE', flows, flow) then
    redis.call('ZADD', flows, fair_tail(flows), flow)
  end
  fair_fix_unit(units, flows, unit)
  redis.call('SADD', waits, lim)
end

-- a member leaves a limiter's queues. served: it was released, so its flow and its
-- unit take the last turns (its flow goes away with its last member); else (a stale
-- member dropped) the flow keeps its turn
local function fair_leave(counts, lim, units, flows, queue, parked, unit, flow, member,
                          served)
  if redis.call('ZREM', queue, member) == 1 then
    if redis.call('HINCRBY', counts, lim, -1) <= 0 then redis.call('HDEL', counts, lim) end
  end
  if not redis.call('ZSCORE', flows, flow) then return end
  if redis.call('EXISTS', queue) == 0 then
    redis.call('ZREM', flows, flow)
    redis.call('ZREM', parked, unit .. ' ' .. flow)
  elseif served then
    redis.call('ZREM', parked, unit .. ' ' .. flow)
    redis.call('ZADD', flows, fair_tail(flows), flow)
  end
  if served and redis.call('ZSCORE', units, unit) then
    redis.call('ZADD', units, fair_tail(units), unit)
  end
  fair_fix_unit(units, flows, unit)
end
