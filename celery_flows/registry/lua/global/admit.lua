--[[
  admit: may a node be released now under every limit that applies to it?
  All scheduling keys share the hash tag {sched}, so one script checks them together.
  The wait queues are fair (lua/fair/share.lua, in front of this script): each limiter
  serves its units (concurrency keys, or flows without one) round-robin, then the
  flows of a unit, then a flow's members in §7's order.
  KEYS[1]            waits index (set of limiter ids that have waiting nodes)
  KEYS[2 + 7(i-1) ...] for limiter i (rates first, then the queue cap if any), seven
                     keys: its state (rate: TAT string; cap: slots zset), its single
                     wait queue of before fair share (drained: a member in it is
                     re-filed in the fair queues), its units, flows, turns, queue and parked flows
                     (lua/fair/share.lua)
  KEYS[#KEYS]        request key under {sched} (lua/_request.lua: a re-sent call returns
                     the first reply, so it never takes a second rate slot); the script
                     sees KEYS without it
  ARGV[1] member (order key|flow|node|attempt; a flow's queue sorts members lexically)
  ARGV[2] task id (the slot holder)   ARGV[3] number of rate limiters
  ARGV[4] queue cap (0: none)   ARGV[5] the node's share unit   ARGV[6] its flow id
  ARGV[7..] per limiter: its id; per rate limiter then its interval in seconds (GCRA,
          no burst: releases at least one interval apart)
  Returns: {1, the Redis time of the release} admitted (rates consumed, slot taken,
           the member out of every queue, its flow and unit served: last turn)
           {0, seconds to wait (-1: until a slot frees, 0: not its turn yet),
            limiter id} refused; the member waits in that limiter's queues. Refused by
           one limiter's turn or cap while its turn had come at another, its flow is
           parked there (keeps its turn, the others go meanwhile); refused by a rate
           only (a wait of one interval of it at most), it keeps its turn where it had
           it, parked only at a rate limiter of a shorter interval than the wait, and
           at the refusing limiter a parked flow is unparked: they wait for it.
]]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local member, task_id = ARGV[1], ARGV[2]
local nrates, cap = tonumber(ARGV[3]), tonumber(ARGV[4])
local unit, flow = ARGV[5], ARGV[6]
local WAITS = KEYS[1]
local n = (#KEYS - 1) / 7
local STATE, LEGACY, UNITS, FLOWS, TURNS, QUEUE, PARKED = 1, 2, 3, 4, 5, 6, 7
local function k(i, j) return KEYS[1 + 7 * (i - 1) + j] end
local ids, intervals = {}, {}
local a = 7
for i = 1, n do
  ids[i] = ARGV[a]
  a = a + 1
  if i <= nrates then
    intervals[i] = tonumber(ARGV[a])
    a = a + 1
  end
end

local refused, wait, kind = nil, 0, nil
-- a node that holds its queue slot already (a retry, a sensor's next poke) keeps it:
-- it does not queue behind the nodes waiting for that slot
local holds = cap > 0 and redis.call('ZSCORE', k(n, STATE), task_id)
-- nodes of flows whose turn it is not go first
local turn = {}
for i = 1, n do
  redis.call('ZREM', k(i, LEGACY), member)
  turn[i] = fair_turn(k(i, UNITS), k(i, FLOWS), k(i, TURNS), unit, flow)
  if not refused and not (holds and i == n) then
    local ok
    if turn[i] == 'absent' then
      ok = not fair_active(k(i, UNITS))
    elseif turn[i] == 'behind' then
      ok = false
    else
      local head = fair_head_of(k(i, QUEUE), flow)
      ok = not head or member <= head
    end
    if not ok then refused, kind = i, 'order' end
  end
end
-- a full cap first: while it is full, a rate's wait says nothing of when the node goes
if not refused and cap > 0 then
  if not holds and redis.call('ZCARD', k(n, STATE)) >= cap then
    refused, wait, kind = n, -1, 'cap'
  end
end
local tats = {}
if not refused then
  for i = 1, nrates do
    tats[i] = tonumber(redis.call('GET', k(i, STATE))) or 0
    if tats[i] > now then
      refused, wait, kind = i, tats[i] - now, 'rate'
      break
    end
  end
end
if refused then
  local r = refused
  fair_enqueue(WAITS, ids[r], k(r, UNITS), k(r, FLOWS), k(r, TURNS), k(r, QUEUE), unit,
               flow, member)
  local function park(i, on)
    fair_park(k(i, UNITS), k(i, FLOWS), k(i, TURNS), k(i, PARKED), unit, flow, now, on)
  end
  local function queued(i)
    return turn[i] == 'front' and redis.call('ZSCORE', k(i, QUEUE), flow .. ' ' .. member)
  end
  if kind == 'rate' then
    if turn[r] == 'parked' then park(r, false) end
    -- a rate limiter that would lose more than a slot of its own waiting for this one
    -- serves the others meanwhile; the others (a cap, a faster wait) wait with it
    for i = 1, nrates do
      if i ~= r and wait > intervals[i] and queued(i) then park(i, true) end
    end
  else
    for i = 1, n do
      if i ~= r and queued(i) then park(i, true) end
    end
    if kind == 'cap' and turn[r] == 'parked' then park(r, false) end
  end
  return {0, tostring(wait), ids[r]}
end
for i = 1, nrates do
  local tat = math.max(tats[i], now) + intervals[i]
  redis.call('SET', k(i, STATE), tostring(tat), 'EX', math.ceil(intervals[i]) + 3600)
end
if cap > 0 then redis.call('ZADD', k(n, STATE), now, task_id) end
for i = 1, n do
  if turn[i] ~= 'absent' then
    fair_leave(k(i, UNITS), k(i, FLOWS), k(i, TURNS), k(i, QUEUE), k(i, PARKED), unit,
               flow, member, true)
  end
end
return {1, tostring(now)}
