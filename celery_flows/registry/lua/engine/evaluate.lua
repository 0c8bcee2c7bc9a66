--[[
  engine/evaluate.lua: what a node's dependencies allow once they are all terminal.
  The kind of each edge (ok, failed, skipped, removed, cancelled: a dependency's state
  and failure policies), the trigger rules over those kinds, and the release of a node
  (make_ready: a new attempt in the outbox; an external node awaits its signal) or its
  skip.
  Uses: constants (TERMINAL, POLICY_EDGE, EXTERNAL_TIMEOUT), cache (load, save, val,
  list, contains, ready_add, timed_add, timed_rem, REPORT).
]]

-- The kind of the edge dep -> child once dep is terminal: ok | failed | skipped | removed.
-- epol is set only on a sub-flow's final nodes: the sub-flow node's own policy.
local function edge_kind(dep)
  if dep.state == 'succeeded' then return 'ok' end
  local outer = val(dep.epol) or 'fail'
  if dep.state == 'failed' then
    local own = dep.ignored and 'ignore' or dep.policy
    if own ~= 'fail' then return POLICY_EDGE[own] end
    return POLICY_EDGE[outer]
  end
  if dep.state == 'skipped' then
    if dep.skip_reason == 'upstream_failed' then return POLICY_EDGE[outer] end
    return 'skipped'
  end
  return 'cancelled'
end

local function rule_passes(rule, kinds)
  local n, ok, failed = 0, 0, 0
  for _, k in ipairs(kinds) do
    n = n + 1
    if k == 'ok' then ok = ok + 1 elseif k == 'failed' then failed = failed + 1 end
  end
  if rule == 'all_done' then return true end
  if rule == 'one_success' then return ok > 0 end
  if rule == 'one_failed' then return failed > 0 end
  if n == 0 then return true end
  if rule == 'all_failed' then return failed == n end
  if rule == 'none_failed' then return failed == 0 end
  return ok == n -- all_success
end

-- Forget everything that belongs to one attempt (its history stays).
local function clear_attempt(rec)
  rec.starts = {}
  rec.retries = 0
  rec.lease = cjson.null
  rec.queued_at = cjson.null
  rec.released_at = cjson.null
  rec.started_at = cjson.null
  rec.finished_at = cjson.null
  rec.held = cjson.null
  rec.retry_at = cjson.null
end

-- Make a node ready: it goes to the outbox (state scheduled) as a new attempt.
local function make_ready(id, rec, now)
  rec.state = 'scheduled'
  rec.attempt = rec.attempt + 1
  rec.ready_at = now
  clear_attempt(rec)
  if rec.kind == 'sensor' then rec.sensor_since = now end
  save(id, rec)
  ready_add(id, 0)
  timed_rem(id)
  REPORT.released[#REPORT.released + 1] = id
end

-- Edge kinds of a node's remaining (not removed) dependencies; nil if one is not
-- terminal yet.
local function edge_kinds(rec)
  local kinds, any_failed = {}, false
  for _, did in ipairs(list(rec.after)) do
    if not contains(rec.removed, did) then
      local dep = load(did)
      if not TERMINAL[dep.state] then return nil, false end
      local k = edge_kind(dep)
      if k ~= 'removed' then
        kinds[#kinds + 1] = k
        if k == 'failed' then any_failed = true end
      end
    end
  end
  return kinds, any_failed
end

-- A pending node whose remaining edges are all terminal: release it or skip it.
-- Returns true when it was skipped (it is then terminal and must be settled).
local function evaluate(id, rec, now)
  local kinds, any_failed = edge_kinds(rec)
  if kinds == nil then return false end
  if rule_passes(rec.rule, kinds) then
    if rec.kind == 'external' then
      rec.state = 'awaiting'
      rec.attempt = rec.attempt + 1
      rec.ready_at = now
      save(id, rec)
      -- claim.lua fails it if no signal came by its deadline
      timed_add(id, now + (tonumber(val(rec.timeout)) or EXTERNAL_TIMEOUT))
      REPORT.released[#REPORT.released + 1] = id
    else
      make_ready(id, rec, now)
    end
    return false
  end
  rec.state = 'skipped'
  rec.skip_reason = any_failed and 'upstream_failed' or 'trigger_rule'
  rec.finished_at = now
  save(id, rec)
  REPORT.skipped[#REPORT.skipped + 1] = id
  return true
end
