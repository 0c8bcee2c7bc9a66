--[[
  engine/evaluate.lua: what a node's dependencies allow once they are all terminal.
  The kind of each edge (ok, failed, skipped, removed, cancelled: a dependency's state
  and failure policies), the trigger rules over those kinds, and the release of a node
  (make_ready: a new attempt in the outbox; an external node awaits its signal) or its
  skip.
  A node of more than WIDE dependencies is not evaluated inline: begin_scan hands it to
  engine/scan.lua, which reads its dependencies in bounded steps, one per claim, and
  then decides as evaluate does.
  Uses: constants (TERMINAL, POLICY_EDGE, EXTERNAL_TIMEOUT), cache (load, save, val,
  list, after_list, ids_count, contains, mget, mset, wraw, wset, ready_add, timed_add,
  timed_rem, REPORT); WIDE (scripts.py, beside STEP).
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

-- The one letter a wide node's scan stores per edge (scan.lua, read by the claim).
local KIND_LETTER = {ok = 'o', failed = 'f', skipped = 's', cancelled = 'c', removed = 'r'}

-- Whether the trigger rule passes over n remaining edges, ok of them ok and failed of
-- them failed.
local function rule_passes(rule, n, ok, failed)
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

-- Counts of a node's remaining (not removed) edges: how many, ok, failed; nil if one is
-- not terminal yet.
local function edge_counts(rec)
  local n, ok, failed = 0, 0, 0
  for _, did in ipairs(after_list(rec)) do
    if not contains(rec.removed, did) then
      local dep = load(did)
      if not TERMINAL[dep.state] then return nil end
      local k = edge_kind(dep)
      if k ~= 'removed' then
        n = n + 1
        if k == 'ok' then ok = ok + 1 elseif k == 'failed' then failed = failed + 1 end
      end
    end
  end
  return n, ok, failed
end

-- A wide node's evaluation goes to the scan (engine/scan.lua): its state in the waiting
-- hash ('<id>|scan': next position, the kinds generation it began under, counts so
-- far, and 'w' while it waits for the dependency at that position; '<id>|k': a letter
-- per edge read so far), its id in the list of scans the claims step through. A scan
-- under way goes on; one that waits goes on from where it stopped (what it read before
-- stays terminal while kgen stays).
local function begin_scan(id)
  local st = wraw(id .. '|scan')
  if st and string.sub(st, -1) ~= 'w' then return end
  if st then
    wset(id .. '|scan', string.sub(st, 1, -3))
  else
    wset(id .. '|scan', '1 ' .. (mget('kgen') or '0') .. ' 0 0 0')
    wset(id .. '|k', '')
  end
  local scans = wraw('|scans') or ''
  wset('|scans', scans == '' and id or (scans .. ',' .. id))
  mset('scanning', '1')
end

-- A pending node whose remaining edges are all terminal, counted (n, ok, failed):
-- release it or skip it. Returns true when it was skipped (it is then terminal and
-- must be settled).
local function decide(id, rec, now, n, ok, failed)
  if rule_passes(rec.rule, n, ok, failed) then
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
  rec.skip_reason = failed > 0 and 'upstream_failed' or 'trigger_rule'
  rec.finished_at = now
  save(id, rec)
  REPORT.skipped[#REPORT.skipped + 1] = id
  return true
end

-- A pending node whose remaining edges may all be terminal: release it or skip it (a
-- wide one later, through its scan). Returns true when it was skipped now.
local function evaluate(id, rec, now)
  if ids_count(rec.after) > WIDE then
    begin_scan(id)
    return false
  end
  local n, ok, failed = edge_counts(rec)
  if n == nil then return false end
  return decide(id, rec, now, n, ok, failed)
end
