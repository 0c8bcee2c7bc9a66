--[[
  engine/settle.lua: what follows when nodes become terminal. settle_all counts them
  (done, nfail; fail_fast cancels the rest) and evaluates every dependent whose last
  remaining edge this was, cascading skips, within the script's BUDGET (the rest goes
  to the work list, which the next claims settle: settle_more); evaluate_all does the
  same for pending nodes that wait for nothing; fail_node fails a node from inside a
  transition.
  Uses: constants (WORK, REOPEN, TERMINAL), ids (val, list, contains), cache (load,
  save, mget, mset, mdel, mincr, wget, wset, history, ready_rem, timed_rem, BUDGET),
  flow (stopping),
  evaluate (evaluate, release_items), cancel (cancel_all, begin_chunked_cancel).
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
  -- an item of a map with max_active ended: the map's next item may go
  if mget('mapping') and wraw(cid .. '|rel') then release_items(cid, now) end
  if left - 1 > 0 then return false end
  local child = load(cid)
  return child and child.state == 'pending' and evaluate(cid, child, now)
end

-- How many dependencies a pending node still waits for (waiting hash, or its record in
-- format 1.1).
local function waiting_of(id, rec)
  return wget(id) or tonumber(val(rec.waiting)) or 0
end

-- The work list goes: nothing is left to settle (a cancel or fail_fast stopped the
-- flow; every unfinished node is cancelled).
local function drop_work()
  if mget('settling') == '1' then
    redis.call('DEL', WORK)
    mdel('settling')
  end
end

-- fail_fast: every node not yet terminal is cancelled, in this script for a small flow,
-- else a bounded step per claim (engine/cancel.lua begin_chunked_cancel); what was left
-- to settle goes (every dependent is cancelled).
local function cancel_rest(now, reason)
  drop_work()
  mincr('fgen', 1)
  if (tonumber(mget('total')) or 0) > STEP then
    begin_chunked_cancel(reason)
  else
    cancel_all(now, reason)
  end
end

-- A node just became terminal: count it (done, nfail) as it happens, so the counters are
-- exact while its dependents are still being settled. Returns true when fail_fast then
-- stopped the flow (nothing more to settle).
local function account(id, rec, now)
  mincr('done', 1)
  if rec.state ~= 'succeeded' then mincr('fgen', 1) end
  if fails_flow(rec) and not rec.counted_fail then
    mincr('nfail', 1)
    rec.counted_fail = true
    save(id, rec)
    if mget('fail_fast') == '1' and not stopping() then
      cancel_rest(now, 'fail_fast')
      return true
    end
  end
  return false
end

-- Settle the edges of terminal nodes: queue holds {node id, next edge} pairs; each edge
-- costs one unit of the script's BUDGET, and what the budget does not cover goes to the
-- front of the work list (meta settling=1) for the next claim (settle_more). Dependents
-- skipped on the way are counted and queued in turn.
local function propagate(queue, now)
  local qi = 1
  while qi <= #queue do
    local id, k = queue[qi][1], queue[qi][2]
    -- dependents joined in one string (compact records): k is a byte offset
    local kids = load(id).deps_of
    while true do
      local cid, nxt = id_at(kids, k)
      if cid == nil then break end
      if BUDGET.left <= 0 then
        for j = #queue, qi + 1, -1 do
          redis.call('LPUSH', WORK, queue[j][2] .. ' ' .. queue[j][1])
        end
        redis.call('LPUSH', WORK, k .. ' ' .. id)
        mset('settling', '1')
        return
      end
      BUDGET.left = BUDGET.left - 1
      k = nxt
      if edge_done(cid, id, now) then
        if account(cid, load(cid), now) then return end
        queue[#queue + 1] = {cid, 1}
      end
    end
    qi = qi + 1
  end
end

-- Nodes just became terminal: account for them and settle every dependent whose last
-- remaining edge this was. Iterative: skips cascade through a work list, not recursion.
local function settle_all(ids, now)
  local queue, stopped = {}, false
  for _, id in ipairs(ids) do
    if account(id, load(id), now) then stopped = true end
    queue[#queue + 1] = {id, 1}
  end
  if not stopped then propagate(queue, now) end
end

-- The next claim's share of the work list: entries of nodes no longer terminal (a
-- retry reopened them) or still to be reopened are dropped, their counters recomputed
-- by the retry. Returns true while work is left.
local function settle_more(now)
  if mget('settling') ~= '1' or BUDGET.left <= 0 then return mget('settling') == '1' end
  local raw = redis.call('LRANGE', WORK, 0, STEP - 1)
  redis.call('LTRIM', WORK, #raw, -1)
  local queue = {}
  for _, item in ipairs(raw) do
    local k, id = string.match(item, '^(%d+) (.*)$')
    local rec = load(id)
    if rec and TERMINAL[rec.state] and not (mget('reopen_set') == '1'
        and redis.call('SISMEMBER', REOPEN, id) == 1) then
      queue[#queue + 1] = {id, tonumber(k)}
    end
  end
  propagate(queue, now)
  if mget('settling') == '1' and redis.call('LLEN', WORK) == 0 then mdel('settling') end
  return mget('settling') == '1'
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
