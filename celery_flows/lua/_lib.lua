--[[
  Shared functions, prepended by store.py to every transition script of a flow.
  Every flow script receives the same five keys (see keys.py):
    KEYS[1] meta     KEYS[2] nodes    KEYS[3] args    KEYS[4] results    KEYS[5] ready
  Nothing here builds a key: fields only.
]]
local META, NODES, ARGS, RESULTS, READY = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]

local TERMINAL = {succeeded = true, failed = true, skipped = true, cancelled = true}

local function now_ts()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function load(id)
  local raw = redis.call('HGET', NODES, id)
  if not raw then return nil end
  return cjson.decode(raw)
end

local function save(id, rec)
  redis.call('HSET', NODES, id, cjson.encode(rec))
end

local function list(v)
  if v == nil or v == cjson.null then return {} end
  return v
end

local function contains(t, x)
  for _, v in ipairs(list(t)) do if v == x then return true end end
  return false
end

local function history(rec, entry)
  local h = list(rec.history)
  h[#h + 1] = entry
  while #h > 20 do table.remove(h, 1) end
  rec.history = h
end

local function val(x)
  if x == cjson.null then return nil end
  return x
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

local function set_flow_state(now)
  local st = redis.call('HGET', META, 'state')
  if st == 'cancelled' then return st end
  local total = tonumber(redis.call('HGET', META, 'total'))
  local done = tonumber(redis.call('HGET', META, 'done'))
  local new
  if done < total then
    if redis.call('HGET', META, 'paused') == '1' then new = 'paused' else new = 'running' end
  elseif tonumber(redis.call('HGET', META, 'nfail')) > 0 then
    new = 'failed'
  else
    new = 'succeeded'
  end
  if new ~= st then
    redis.call('HSET', META, 'state', new)
    if new == 'succeeded' or new == 'failed' then
      redis.call('HSET', META, 'finished_at', now)
      local ttl = tonumber(redis.call('HGET', META, 'retention'))
      for i = 1, 5 do redis.call('EXPIRE', KEYS[i], ttl) end
      local channel = redis.call('HGET', META, 'channel')
      if channel then redis.call('PUBLISH', channel, new) end
    elseif st == 'succeeded' or st == 'failed' then
      redis.call('HDEL', META, 'finished_at')
      for i = 1, 5 do redis.call('PERSIST', KEYS[i]) end
    end
  end
  return new
end

-- Make a pending node ready: it goes to the outbox (state scheduled).
local function make_ready(id, rec, now)
  rec.state = 'scheduled'
  rec.attempt = rec.attempt + 1
  rec.ready_at = now
  rec.starts = {}
  rec.retries = 0
  save(id, rec)
  redis.call('ZADD', READY, 0, id)
end

-- Mark a node terminal: account for it and settle every dependent whose last
-- remaining edge this was, cascading skips iteratively. Returns nodes made ready.
local function settle(id, rec, now)
  local released = 0
  local queue = {{id, rec}}
  local qi = 1
  while qi <= #queue do
    local nid, nrec = queue[qi][1], queue[qi][2]
    qi = qi + 1
    redis.call('HINCRBY', META, 'done', 1)
    if nrec.state == 'failed' and not nrec.ignored and nrec.policy == 'fail'
        and (nrec.fpol or 'fail') == 'fail' then
      redis.call('HINCRBY', META, 'nfail', 1)
      nrec.counted_fail = true
      save(nid, nrec)
    end
    for _, cid in ipairs(list(nrec.deps_of)) do
      local child = load(cid)
      if child and child.state == 'pending' then
        child.waiting = child.waiting - 1
        if child.waiting <= 0 then
          local kinds, any_failed = {}, false
          for _, did in ipairs(list(child.after)) do
            if not contains(child.removed, did) then
              local dep = (did == nid) and nrec or load(did)
              local k = edge_kind(dep)
              if k ~= 'removed' then
                kinds[#kinds + 1] = k
                if k == 'failed' then any_failed = true end
              end
            end
          end
          if rule_passes(child.rule, kinds) then
            if child.kind == 'external' then
              child.state = 'awaiting'
              child.attempt = child.attempt + 1
              child.ready_at = now
              save(cid, child)
            else
              make_ready(cid, child, now)
              released = released + 1
            end
          else
            child.state = 'skipped'
            child.skip_reason = any_failed and 'upstream_failed' or 'trigger_rule'
            child.finished_at = now
            save(cid, child)
            queue[#queue + 1] = {cid, child}
          end
        else
          save(cid, child)
        end
      end
    end
  end
  return released
end

local function flow_ok()
  local v = redis.call('HGET', META, 'v')
  if not v then return -1 end
  if tonumber(string.match(v, '^(%d+)')) ~= 1 then return -2 end
  return 0
end
