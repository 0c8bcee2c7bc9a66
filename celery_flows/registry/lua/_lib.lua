--[[
  Shared functions, prepended by store.py to every transition script of a flow.
  Every flow script receives the same six keys (see keys.py):
    KEYS[1] meta   KEYS[2] nodes   KEYS[3] args   KEYS[4] results   KEYS[5] ready
    KEYS[6] timed
  (a seventh, the request key, is taken off by the wrapper of _request.lua, which
  store.py puts around this file and the transition)
  Nothing here builds a key: fields only.

  Writes go through a write-back cache (load/save, mget/mset, ready_add/ready_rem,
  later) and reach Redis only in flush(). A transition called with dry_run skips
  flush() and returns REPORT: what it would have released, skipped and cancelled.
]]
local META, NODES, ARGS, RESULTS, READY, TIMED = KEYS[1], KEYS[2], KEYS[3], KEYS[4],
  KEYS[5], KEYS[6]

local TERMINAL = {succeeded = true, failed = true, skipped = true, cancelled = true}

local CACHE, DIRTY, DIRTY_ORDER = {}, {}, {}
local MCACHE, MDIRTY = {}, {}
local READY_OPS = {}
local LATER = {}
local REPORT = {released = {}, skipped = {}, cancelled = {}, reopened = {}}

local function now_ts()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function val(x)
  if x == cjson.null then return nil end
  return x
end

local function list(v)
  if v == nil or v == cjson.null then return {} end
  return v
end

local function contains(t, x)
  for _, v in ipairs(list(t)) do if v == x then return true end end
  return false
end

local function load(id)
  local rec = CACHE[id]
  if rec == nil then
    local raw = redis.call('HGET', NODES, id)
    rec = raw and cjson.decode(raw) or false
    CACHE[id] = rec
  end
  return rec or nil
end

local function save(id, rec)
  CACHE[id] = rec
  if not DIRTY[id] then
    DIRTY[id] = true
    DIRTY_ORDER[#DIRTY_ORDER + 1] = id
  end
end

local function mget(field)
  local v = MCACHE[field]
  if v == nil then
    v = redis.call('HGET', META, field) or false
    MCACHE[field] = v
  end
  return v or nil
end

local function mset(field, value)
  MCACHE[field] = tostring(value)
  MDIRTY[field] = true
end

local function mincr(field, n)
  mset(field, (tonumber(mget(field)) or 0) + n)
end

local function ready_add(id, score) READY_OPS[#READY_OPS + 1] = {'ZADD', READY, id, score} end
local function ready_rem(id) READY_OPS[#READY_OPS + 1] = {'ZREM', READY, id} end
local function timed_add(id, due) READY_OPS[#READY_OPS + 1] = {'ZADD', TIMED, id, due} end
local function timed_rem(id) READY_OPS[#READY_OPS + 1] = {'ZREM', TIMED, id} end
local function later(fn) LATER[#LATER + 1] = fn end

local function flush()
  for _, id in ipairs(DIRTY_ORDER) do
    redis.call('HSET', NODES, id, cjson.encode(CACHE[id]))
  end
  for field, _ in pairs(MDIRTY) do
    if MCACHE[field] == false then
      redis.call('HDEL', META, field)
    else
      redis.call('HSET', META, field, MCACHE[field])
    end
  end
  for _, op in ipairs(READY_OPS) do
    if op[1] == 'ZADD' then
      redis.call('ZADD', op[2], op[4], op[3])
    else
      redis.call('ZREM', op[2], op[3])
    end
  end
  for _, fn in ipairs(LATER) do fn() end
  -- written: a second flush in the same script writes only what changed since
  DIRTY, DIRTY_ORDER, MDIRTY, READY_OPS, LATER = {}, {}, {}, {}, {}
end

local function report_json()
  local r = {}
  for k, v in pairs(REPORT) do
    r[k] = v
    if #v == 0 then r[k] = nil end
  end
  return cjson.encode(r)
end

local function history(rec, entry)
  local h = list(rec.history)
  h[#h + 1] = entry
  while #h > 20 do table.remove(h, 1) end
  rec.history = h
end

-- Policy to an edge kind: fail -> failed, ignore -> ok, remove -> removed
local POLICY_EDGE = {fail = 'failed', ignore = 'ok', remove = 'removed'}

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

-- Whether a failure of this node makes the flow fail (a failure under "fail").
local function fails_flow(rec)
  return rec.state == 'failed' and not rec.ignored and rec.policy == 'fail'
    and (val(rec.fpol) or 'fail') == 'fail'
end

local function set_flow_state(now)
  local st = mget('state')
  if st == 'cancelled' then return st end
  local total = tonumber(mget('total'))
  local done = tonumber(mget('done'))
  local new
  if done < total then
    if mget('paused') == '1' then new = 'paused' else new = 'running' end
  elseif tonumber(mget('nfail')) > 0 then
    new = 'failed'
  else
    new = 'succeeded'
  end
  if new ~= st then
    mset('state', new)
    if new == 'succeeded' or new == 'failed' then
      mset('finished_at', now)
      if (mget('webhook') or '') ~= '' then mset('webhook_pending', '1') end
      later(function()
        local ttl = tonumber(redis.call('HGET', META, 'retention'))
        for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], ttl) end
        local channel = redis.call('HGET', META, 'channel')
        if channel then redis.call('PUBLISH', channel, new) end
      end)
    elseif st == 'succeeded' or st == 'failed' then
      MCACHE['finished_at'] = false
      MDIRTY['finished_at'] = true
      later(function()
        for i = 1, #KEYS do redis.call('PERSIST', KEYS[i]) end
      end)
    end
  end
  return new
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
      timed_add(id, now + (tonumber(val(rec.timeout)) or 3600))
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

local function cancel_all(now, reason)
  local ids = redis.call('HKEYS', NODES)
  local n = 0
  for _, id in ipairs(ids) do
    local rec = load(id)
    if not TERMINAL[rec.state] then
      rec.prev_state = rec.state
      rec.state = 'cancelled'
      rec.cancel_reason = reason
      rec.finished_at = now
      save(id, rec)
      ready_rem(id)
      timed_rem(id)
      REPORT.cancelled[#REPORT.cancelled + 1] = id
      n = n + 1
    end
  end
  mincr('done', n)
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
        local child = load(cid)
        if child and child.state == 'pending' and not contains(child.removed, id) then
          child.waiting = child.waiting - 1
          save(cid, child)
          if child.waiting <= 0 and evaluate(cid, child, now) then
            queue[#queue + 1] = cid
          end
        end
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

-- Put terminal nodes back to pending (retry, ignore_failure): undo their accounting and
-- recount what each waits for. Returns the reopened nodes with nothing left to wait for.
local function reopen(ids, now)
  local set = {}
  for _, id in ipairs(ids) do set[id] = true end
  for _, id in ipairs(ids) do
    local rec = load(id)
    mincr('done', -1)
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
    for _, did in ipairs(list(rec.after)) do
      if not contains(rec.removed, did) and (set[did] or not TERMINAL[load(did).state]) then
        waiting = waiting + 1
      end
    end
    rec.waiting = waiting
    save(id, rec)
    if waiting == 0 then ready[#ready + 1] = id end
  end
  return ready
end

-- Nodes skipped as upstream_failed downstream of `roots`, through such skips.
local function upstream_failed_closure(roots)
  local out, seen, queue = {}, {}, {}
  for _, id in ipairs(roots) do queue[#queue + 1] = id end
  local qi = 1
  while qi <= #queue do
    local rec = load(queue[qi])
    qi = qi + 1
    for _, cid in ipairs(list(rec.deps_of)) do
      local child = load(cid)
      if not seen[cid] and child.state == 'skipped' and child.skip_reason == 'upstream_failed' then
        seen[cid] = true
        out[#out + 1] = cid
        queue[#queue + 1] = cid
      end
    end
  end
  return out
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

local function flow_ok()
  local v = mget('v')
  if not v then return -1 end
  if tonumber(string.match(v, '^(%d+)')) ~= 1 then return -2 end
  return 0
end

local function flow_finished()
  local st = mget('state')
  return st == 'succeeded' or st == 'failed' or st == 'cancelled'
end
