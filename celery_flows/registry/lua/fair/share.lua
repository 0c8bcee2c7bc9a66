--[[
  fair/share.lua: the round-robin wait queues of one limiter (SPEC sections 7 and 12),
  put in front of the global scripts that use them (scripts.py FAIR_SCRIPTS). Their
  keys are {sched} keys (keys.py), one slot on Redis Cluster, every one passed in KEYS:
  a limiter has five, whatever flows wait in it.

    units   zset  share unit -> turn ("k|<cgroup>|<ckey>" for a concurrency key,
                  "f|<flow>" for a flow without one): the lowest turn is served next
    flows   zset  all scores 0, "<unit> <a|p><turn:015> <flow>": the flows of each unit
                  sort by their turn within the unit, active (a) before parked (p)
    turns   hash  "<unit> <flow>" -> "<a|p><turn:015>", the flow's entry in flows
    queue   zset  all scores 0, "<flow> <member>": a flow's members sort together, in
                  §7's order (the member starts with its order key, ids.py)
    parked  zset  "<unit> <flow>" -> since when the flow is parked
  Every step is a ZRANGEBYLEX, ZRANGE or write of O(log n). Neither a space nor "!"
  is in an id or a unit, so "[<x> " .. "(<x>!" is exactly what starts with "<x> ".

  A served unit or flow takes the turn after the last one: round-robin. A flow whose
  node the rotation picked but another limiter refused is parked: it keeps its turn
  (as "p"), sorts after the active flows and is skipped in O(1); a unit whose flows are
  all parked is sunk by OFF in units the same way. A parked flow's node passes this
  limiter's order at any time (its turn was kept); unparked, it is served next.
]]
local OFF = 1e12

local function fair_range(z, prefix, last)
  local cmd = last and 'ZREVRANGEBYLEX' or 'ZRANGEBYLEX'
  local lo, hi = '[' .. prefix, '(' .. string.sub(prefix, 1, -2) ..
    string.char(string.byte(prefix, -1) + 1)
  if last then lo, hi = hi, lo end
  return redis.call(cmd, z, lo, hi, 'LIMIT', 0, 1)[1]
end

-- the last word of an entry ("<unit> <a|p><turn> <flow>" -> flow, turn, state)
local function fair_entry(e)
  local state, turn, flow = string.match(e, ' ([ap])(%d+) (.+)$')
  return flow, tonumber(turn), state
end

-- the unit's flow whose turn it is (active), or nil
local function fair_front_flow(flows, unit)
  local e = fair_range(flows, unit .. ' a')
  return e and fair_entry(e)
end

-- the turn after the last one given in a unit's flows, parked ones included
local function fair_flow_tail(flows, unit)
  local last = 0
  for _, s in ipairs({'a', 'p'}) do
    local e = fair_range(flows, unit .. ' ' .. s, true)
    if e then
      local _, turn = fair_entry(e)
      if turn > last then last = turn end
    end
  end
  return last + 1
end

-- the turn after the last one given in units, sunk ones included
local function fair_unit_tail(units)
  local act = redis.call('ZREVRANGEBYSCORE', units, '(1000000000000', '-inf', 'WITHSCORES',
                         'LIMIT', 0, 1)
  local top = redis.call('ZREVRANGE', units, 0, 0, 'WITHSCORES')
  local last = tonumber(act[2]) or 0
  local t = tonumber(top[2])
  if t and t >= OFF and t - OFF > last then last = t - OFF end
  return last + 1
end

-- a flow's entry: state 'a' or 'p' and its turn; state nil removes it
local function fair_set_flow(flows, turns, unit, flow, state, turn)
  local id = unit .. ' ' .. flow
  local old = redis.call('HGET', turns, id)
  if old then redis.call('ZREM', flows, unit .. ' ' .. old .. ' ' .. flow) end
  if not state then
    redis.call('HDEL', turns, id)
    return
  end
  local v = state .. string.format('%015d', turn)
  redis.call('HSET', turns, id, v)
  redis.call('ZADD', flows, 0, unit .. ' ' .. v .. ' ' .. flow)
end

-- whether anything at this limiter is served by its rotation (not only parked flows)
local function fair_active(units)
  local u = redis.call('ZRANGE', units, 0, 0, 'WITHSCORES')
  return u[1] ~= nil and tonumber(u[2]) < OFF
end

-- a unit is active (its own turn) while one of its flows is, sunk by OFF while all are
-- parked, and gone with its last flow
local function fair_fix_unit(units, flows, unit)
  local us = tonumber(redis.call('ZSCORE', units, unit))
  if not fair_range(flows, unit .. ' ') then
    if us then redis.call('ZREM', units, unit) end
    return
  end
  local parked = fair_front_flow(flows, unit) == nil
  if not us then
    us = fair_unit_tail(units)
    if parked then us = us + OFF end
    redis.call('ZADD', units, us, unit)
  elseif parked and us < OFF then
    redis.call('ZADD', units, us + OFF, unit)
  elseif not parked and us >= OFF then
    redis.call('ZADD', units, us - OFF, unit)
  end
end

-- a flow's first member at this limiter, in §7's order, or nil
local function fair_head_of(queue, flow)
  local e = fair_range(queue, flow .. ' ')
  return e and string.sub(e, #flow + 2)
end

-- where a flow stands at a limiter: 'absent' (nothing of it waits there), 'front' (its
-- turn), 'parked' (its turn, kept while another limiter holds its node) or 'behind'
local function fair_turn(units, flows, turns, unit, flow)
  local v = redis.call('HGET', turns, unit .. ' ' .. flow)
  if not v then return 'absent' end
  if string.sub(v, 1, 1) == 'p' then return 'parked' end
  if redis.call('ZRANGE', units, 0, 0)[1] ~= unit then return 'behind' end
  if fair_front_flow(flows, unit) ~= flow then return 'behind' end
  return 'front'
end

-- park (on) or unpark a flow at a limiter, keeping its turn
local function fair_park(units, flows, turns, parked, unit, flow, now, on)
  local v = redis.call('HGET', turns, unit .. ' ' .. flow)
  if not v then return end
  local turn = tonumber(string.sub(v, 2))
  if on and string.sub(v, 1, 1) == 'a' then
    fair_set_flow(flows, turns, unit, flow, 'p', turn)
    redis.call('ZADD', parked, now, unit .. ' ' .. flow)
  elseif not on and string.sub(v, 1, 1) == 'p' then
    fair_set_flow(flows, turns, unit, flow, 'a', turn)
    redis.call('ZREM', parked, unit .. ' ' .. flow)
  end
  fair_fix_unit(units, flows, unit)
end

-- a member waits at a limiter: a new flow or unit takes the last turn
local function fair_enqueue(waits, lim, units, flows, turns, queue, unit, flow, member)
  redis.call('ZADD', queue, 0, flow .. ' ' .. member)
  if not redis.call('HGET', turns, unit .. ' ' .. flow) then
    fair_set_flow(flows, turns, unit, flow, 'a', fair_flow_tail(flows, unit))
  end
  fair_fix_unit(units, flows, unit)
  redis.call('SADD', waits, lim)
end

-- a member leaves a limiter's queues. served: it was released, so its flow and its
-- unit take the last turns (its flow goes away with its last member); else (a stale
-- member dropped) the flow keeps its turn
local function fair_leave(units, flows, turns, queue, parked, unit, flow, member, served)
  redis.call('ZREM', queue, flow .. ' ' .. member)
  if not redis.call('HGET', turns, unit .. ' ' .. flow) then return end
  if not fair_head_of(queue, flow) then
    fair_set_flow(flows, turns, unit, flow, nil)
    redis.call('ZREM', parked, unit .. ' ' .. flow)
  elseif served then
    redis.call('ZREM', parked, unit .. ' ' .. flow)
    fair_set_flow(flows, turns, unit, flow, 'a', fair_flow_tail(flows, unit))
  end
  if served and redis.call('ZSCORE', units, unit) then
    redis.call('ZADD', units, fair_unit_tail(units), unit)
  end
  fair_fix_unit(units, flows, unit)
end
