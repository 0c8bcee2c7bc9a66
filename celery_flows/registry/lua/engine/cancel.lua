--[[
  engine/cancel.lua: cancel_all, every node not yet terminal becomes cancelled (the
  cancel transition, lua/cancel.lua, and fail_fast in settle); cancel_one, one node
  (also the bounded steps of a chunked cancel, lua/cancel_step.lua).
  Uses: constants (NODES, TERMINAL), cache (load, save, mincr, ready_rem, timed_rem,
  REPORT).
]]
local function cancel_one(id, rec, now, reason)
  rec.prev_state = rec.state
  rec.state = 'cancelled'
  rec.cancel_reason = reason
  rec.finished_at = now
  save(id, rec)
  ready_rem(id)
  timed_rem(id)
  REPORT.cancelled[#REPORT.cancelled + 1] = id
end

local function cancel_all(now, reason)
  local ids = redis.call('HKEYS', NODES)
  local n = 0
  for _, id in ipairs(ids) do
    local rec = load(id)
    if not TERMINAL[rec.state] then
      cancel_one(id, rec, now, reason)
      n = n + 1
    end
  end
  mincr('done', n)
end
