--[[
  engine/settle.lua: what follows when nodes become terminal. settle_all counts them
  (done, nfail; fail_fast cancels the rest) and evaluates every dependent whose last
  remaining edge this was, cascading skips; evaluate_all does the same for pending
  nodes that wait for nothing; fail_node fails a node from inside a transition.
  Uses: cache (load, save, val, list, contains, mget, mincr, wget, wset, history,
  ready_rem, timed_rem), evaluate (evaluate), cancel (cancel_all).
]]

-- Whether a failure of this node makes the flow fail (a failure under "fail").
local function fails_flow(rec)
  return rec.state == 'failed' and not rec.ignored and rec.policy == 'fail'
    and (val(rec.fpol) or 'fail') == 'fail'
end

-- The edge did -> cid became terminal: one dependency fewer for cid to wait for, counted
-- in the waiting hash without reading cid's record (O(1) per edge, a fan-in of W costs
-- O(W), not O(W^2)); the record is read once the counter reaches 0, and evaluate then
-- checks every edge, so a counter that ran low (a flow of format 1.1, a dependent no
-- longer pending) costs time, never a wrong release. Returns true when cid was skipped.
local function edge_done(cid, did, now)
  local left = wget(cid)
  if left == nil then
    -- format 1.1: the counter is in the record
    local child = load(cid)
    if not (child and child.state == 'pending' and child.waiting
            and not contains(child.removed, did)) then
      return child and child.state == 'pending' and child.waiting == nil
        and evaluate(cid, child, now)
    end
    child.waiting = child.waiting - 1
    save(cid, child)
    return child.waiting <= 0 and evaluate(cid, child, now)
  end
  if mget('rm_edges') == '1' and wget(cid .. '#' .. did) then return false end
  wset(cid, left - 1)
  if left - 1 > 0 then return false end
  local child = load(cid)
  return child and child.state == 'pending' and evaluate(cid, child, now)
end

-- How many dependencies a pending node still waits for (waiting hash, or its record in
-- format 1.1).
local function waiting_of(id, rec)
  return wget(id) or tonumber(val(rec.waiting)) or 0
end

-- Nodes just became terminal: account for them and settle every dependent whose last
-- remaining edge this was. Iterative: skips cascade through a work list, not recursion.
local function settle_all(ids, now)
  local queue, qi, stopped = {}, 1, false
  for _, id in ipairs(ids) do queue[#queue + 1] = id end
  while qi <= #queue do
    local id = queue[qi]
    qi = qi + 1
    local rec = load(id)
    mincr('done', 1)
    if fails_flow(rec) and not rec.counted_fail then
      mincr('nfail', 1)
      rec.counted_fail = true
      save(id, rec)
      if mget('fail_fast') == '1' and not stopped then
        stopped = true
        cancel_all(now, 'fail_fast')
      end
    end
    if not stopped then
      for _, cid in ipairs(list(rec.deps_of)) do
        if edge_done(cid, id, now) then queue[#queue + 1] = cid end
      end
    end
  end
end

local function settle(id, now) settle_all({id}, now) end

-- Evaluate pending nodes with nothing left to wait for, settling the ones skipped.
local function evaluate_all(ids, now)
  local skipped = {}
  for _, id in ipairs(ids) do
    local rec = load(id)
    if rec.state == 'pending' and evaluate(id, rec, now) then skipped[#skipped + 1] = id end
  end
  settle_all(skipped, now)
end

-- Fail a running/awaiting node from inside a transition (timeouts).
local function fail_node(id, rec, now, err)
  rec.state = 'failed'
  rec.error = err
  rec.finished_at = now
  history(rec, {attempt = rec.attempt, outcome = 'failed', at = now, error = err})
  save(id, rec)
  ready_rem(id)
  timed_rem(id)
  settle(id, now)
end
