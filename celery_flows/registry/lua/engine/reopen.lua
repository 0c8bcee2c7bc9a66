--[[
  engine/reopen.lua: terminal nodes back to pending (retry.lua, ignore_failure.lua), and
  the nodes such a change reaches: those skipped as upstream_failed downstream.
  A chunked retry (lua/retry.lua) stages its nodes in the reopen set and reopens them a
  step per claim (reopen_more).
  Uses: constants (RESULTS, REOPEN, TERMINAL), ids (list, deps_list, after_list,
  ids_count, contains), cache (load, save, mget, mdel, mincr, wset, history, later,
  REPORT, BUDGET), flow (set_flow_state), settle (evaluate_all), evaluate (unreleased,
  items_later); WIDE (scripts.py).
]]

-- Put terminal nodes back to pending (retry, ignore_failure): undo their accounting and
-- recount what each waits for. Returns the reopened nodes with nothing left to wait for.
local function reopen(ids, now)
  mincr('fgen', 1)
  -- edges change kind (ignore_failure's too, which comes through here): a wide node's
  -- scan under way starts again (engine/scan.lua)
  mincr('kgen', 1)
  local staged = mget('reopen_set') == '1'
  local set = {}
  for _, id in ipairs(ids) do set[id] = true end
  for _, id in ipairs(ids) do
    local rec = load(id)
    mincr('done', -1)
    if rec.kind == 'map' and rec.state == 'cancelled' and unreleased(id, rec) > 0 then
      -- its items never released come back with it (cancel_all counted them done)
      mincr('done', -unreleased(id, rec))
      items_later(id)
    end
    if rec.counted_fail then
      mincr('nfail', -1)
      rec.counted_fail = false
    end
    if rec.state == 'failed' or rec.state == 'cancelled' then
      history(rec, {attempt = rec.attempt, outcome = 'reopened', at = now})
    end
    rec.state = 'pending'
    rec.skip_reason = cjson.null
    rec.cancel_reason = cjson.null
    rec.error = cjson.null
    clear_attempt(rec)
    save(id, rec)
    REPORT.reopened[#REPORT.reopened + 1] = id
    later(function() redis.call('HDEL', RESULTS, id) end)
  end
  local ready = {}
  for _, id in ipairs(ids) do
    local rec = load(id)
    local waiting = 0
    -- a wide node is not recounted (that reads every dependency's record): its scan
    -- waits at each dependency not terminal yet (engine/scan.lua)
    local deps = ids_count(rec.after) > WIDE and {} or after_list(rec)
    for _, did in ipairs(deps) do
      if not contains(rec.removed, did) and (set[did] or not TERMINAL[load(did).state]
          or (staged and redis.call('SISMEMBER', REOPEN, did) == 1)) then
        waiting = waiting + 1
      end
    end
    rec.waiting = nil
    wset(id, waiting)
    save(id, rec)
    if waiting == 0 then ready[#ready + 1] = id end
  end
  return ready
end

-- Whether a node ended because of its dependencies' failures: skipped as
-- upstream_failed, or a map failed by its items (evaluate.lua decide).
local function failed_upstream(rec)
  if rec.state == 'skipped' then return rec.skip_reason == 'upstream_failed' end
  return rec.state == 'failed' and rec.kind == 'map' and val(rec.k) ~= nil
    and string.sub(val(rec.error) or '', 1, 14) == 'MapItemFailed:'
end

-- Nodes that ended as upstream_failed downstream of `roots`, through such ends.
local function upstream_failed_closure(roots)
  local out, seen, queue = {}, {}, {}
  for _, id in ipairs(roots) do
    queue[#queue + 1] = id
    seen[id] = true
  end
  local qi = 1
  while qi <= #queue do
    local rec = load(queue[qi])
    qi = qi + 1
    for _, cid in ipairs(deps_list(rec)) do
      local child = load(cid)
      if not seen[cid] and failed_upstream(child) then
        seen[cid] = true
        out[#out + 1] = cid
        queue[#queue + 1] = cid
      end
    end
  end
  return out
end

-- A step of a chunked retry (meta reopening=1): up to STEP nodes of the reopen set go
-- back to pending and are evaluated; after the last, the flow's state is its counters'
-- again. Returns true while nodes are left.
local function reopen_more(now)
  if mget('reopening') ~= '1' or BUDGET.left <= 0 then return mget('reopening') == '1' end
  BUDGET.left = BUDGET.left - 20 * STEP
  local ids = redis.call('SPOP', REOPEN, STEP)
  if #ids > 0 then evaluate_all(reopen(ids, now), now) end
  if mget('reopening') == '1' and redis.call('SCARD', REOPEN) == 0 then
    mdel('reopening')
    mdel('reopen_set')
    set_flow_state(now)
  end
  return mget('reopening') == '1'
end
