--[[
  engine/evaluate.lua: what a node's dependencies allow once they are all terminal.
  The kind of each edge (ok, failed, skipped, removed, cancelled: a dependency's state
  and failure policies), the trigger rules over those kinds, and the release of a node
  (make_ready: a new attempt in the outbox; an external node awaits its signal) or its
  skip.
  A node of more than WIDE dependencies is not evaluated inline: begin_scan hands it to
  engine/scan.lua, which reads its dependencies in bounded steps, one per claim, and
  then decides as evaluate does.
  Maps expand here too (expand_map) and release their items (release_items,
  items_more).
  Uses: constants (TERMINAL, POLICY_EDGE, EXTERNAL_TIMEOUT), ids (val, list,
  after_list, ids_count, contains), cache (load, save, mget, mset, mdel, mincr, wget,
  wraw, wset, wdel, history, ready_add, ready_rem, timed_add, timed_rem, BUDGET,
  REPORT); WIDE
  (scripts.py, beside STEP).
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

-- Maps (SPEC section 12). A map waits for its `over` like any node; when it may run,
-- it expands: its k items join the flow (item records are written at their first
-- change, cache.lua item_record), its edges become the k items' (its input the list of
-- their results, as a fan-in's), and it is pending again, read as running, until its
-- items are terminal. Then it fails if an item failed under "fail", else it goes to the
-- outbox, where the dispatcher collects the items' results as its own
-- (engine/dispatch.py). The items are released up to max_active (mact) at once, at
-- most BUDGET's worth a script: the rest a step per claim (items_more, meta
-- mapping: how many maps have items left to release; waiting hash '<map>|rel': items
-- released so far, '|items': maps whose release the budget cut short).
-- EXPANSIONS[map id]: {k, token} or an error text, given to complete.lua by the worker
-- that recorded `over` (the split of a result needs the app's serializer); a map
-- without one goes to the outbox, and the dispatcher expands it (lua/expand.lua).
local EXPANSIONS = {}

-- Map id's items not released yet go out a step per claim (items_more).
local function items_later(id)
  local pending = wraw('|items') or ''
  if not string.find(',' .. pending .. ',', ',' .. id .. ',', 1, true) then
    wset('|items', pending == '' and id or (pending .. ',' .. id))
  end
end

-- How many of an expanded map's items were never released (they read as made from
-- their map: cancelled with it, pending again when a retry reopens it).
local function unreleased(id, rec)
  local rel = tonumber(wraw(id .. '|rel'))
  return rel and math.max((tonumber(rec.k) or 0) - rel, 0) or 0
end

-- Release the next items of map id, within max_active and the BUDGET (none while the
-- map is cancelled). Returns true when the budget cut the release short.
local function release_items(id, now)
  local rel = tonumber(wraw(id .. '|rel'))
  if not rel then return false end
  local m = load(id)
  if m.state == 'cancelled' then return false end
  local k = tonumber(m.k)
  local upto = k
  if val(m.mact) then
    -- items released and not terminal yet: released - (k - those the map waits for)
    local active = rel - (k - (wget(id) or 0))
    upto = math.min(k, rel + tonumber(m.mact) - active)
  end
  local cut = false
  while rel < upto do
    if BUDGET.left <= 0 then
      cut = true
      break
    end
    BUDGET.left = BUDGET.left - 1
    local iid = id .. '[' .. rel .. ']'
    local it = load(iid)
    if it and it.state == 'pending' then make_ready(iid, it, now) end
    rel = rel + 1
  end
  if rel >= k then
    wdel(id .. '|rel')
    mincr('mapping', -1)
    if (tonumber(mget('mapping')) or 0) <= 0 then mdel('mapping') end
  else
    wset(id .. '|rel', rel)
  end
  if cut then items_later(id) end
  return cut
end

-- The next claim's share of the items' releases. Returns true while some are left.
local function items_more(now)
  local ids = wraw('|items')
  if not ids or ids == '' then return false end
  local left = {}
  wset('|items', '')
  for id in string.gmatch(ids, '[^,]+') do
    if BUDGET.left <= 0 or release_items(id, now) then left[#left + 1] = id end
  end
  local added = wraw('|items') or ''
  if added ~= '' then left[#left + 1] = added end
  if #left == 0 then
    wdel('|items')
    return false
  end
  wset('|items', table.concat(left, ','))
  return true
end

-- An expanded map's items are all terminal: it goes to the outbox, where the
-- dispatcher collects their results. No new attempt: it still reads as running.
local function to_collect(id, rec, now)
  rec.state = 'scheduled'
  rec.ready_at = now
  save(id, rec)
  ready_add(id, 0)
  REPORT.released[#REPORT.released + 1] = id
end

-- The map fails (its expansion was refused, or an item failed under "fail").
local function fail_map(id, rec, now, err)
  rec.state = 'failed'
  rec.error = err
  rec.finished_at = now
  if rec.attempt == 0 then rec.attempt = 1 end
  history(rec, {attempt = rec.attempt, outcome = 'failed', at = now, error = err})
  save(id, rec)
  ready_rem(id)
end

-- Expand map id by x ({k, token}, or an error text that fails it). Returns true when
-- the map is terminal (failed) and must be settled.
local function expand_map(id, rec, now, x)
  if type(x) == 'string' then
    fail_map(id, rec, now, x)
    return true
  end
  local k, tok = tonumber(x[1]), x[2]
  local total = tonumber(mget('total')) or 0
  if tonumber(x[3]) and total + k > tonumber(x[3]) then
    fail_map(id, rec, now, 'MapTooLong: map ' .. id .. ' got ' .. k .. ' items; the flow ' ..
      'would hold ' .. (total + k) .. ' nodes, more than flows_max_nodes=' .. x[3])
    return true
  end
  rec.over = after_list(rec)[1]
  rec.after = '#' .. k .. '#' .. id -- the k items (cache.lua ids_range)
  rec.input = '*'
  rec.k = k
  rec.xtok = tok
  rec.state = 'pending'
  rec.ready_at = now
  if rec.attempt == 0 then rec.attempt = 1 end
  rec.removed = {}
  save(id, rec)
  ready_rem(id)
  mincr('total', k)
  wset(id, k)
  if k == 0 then
    to_collect(id, rec, now) -- as []
    return false
  end
  wset(id .. '|rel', 0)
  mincr('mapping', 1)
  release_items(id, now)
  return false
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
  if rec.kind == 'map' and val(rec.k) then
    -- an expanded map whose items are all terminal
    if failed > 0 then
      fail_map(id, rec, now, 'MapItemFailed: ' .. failed .. ' of ' .. rec.k ..
        ' items failed under failure_policy "fail"')
      return true
    end
    to_collect(id, rec, now)
    return false
  end
  if rec.kind == 'map' and EXPANSIONS[id] and rule_passes(rec.rule, n, ok, failed) then
    return expand_map(id, rec, now, EXPANSIONS[id])
  end
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
