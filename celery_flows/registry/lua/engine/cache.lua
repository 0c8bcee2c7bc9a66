--[[
  engine/cache.lua: the write-back cache, and the small helpers everything else uses.
  Reads load node records and meta fields once per script (load, mget); writes
  (save, mset, mincr, wset, ready_add/ready_rem, timed_add/timed_rem, later) reach
  Redis only in flush(). wget/wset are the fan-in counters (the waiting hash, keys.py). A transition called with dry_run skips flush() and returns REPORT
  (report_json): what it would have released, skipped, cancelled and reopened.
  Events (SPEC section 11): save() notes every change of a node's state, attempt or
  last milestone, mset('state') every change of the flow's state; flush() appends them
  to the flow's stream (EVENTS) and, on a single Redis, to the registry's stream
  (EVENTS_ALL, lua/_request.lua), node events first, under the same stream id in both;
  on Redis Cluster it notes the flow's meta ev_due instead (the registry's stream is
  of another slot: the --flows workers copy into it). A terminal node event of a flow
  whose webhook takes node events is also pushed to its delivery list (HOOKS).
  So every transition script emits its events without naming them.
  Uses: constants (META, NODES, READY, TIMED, WAITING, EVENTS, HOOKS, TERMINAL,
  HISTORY_MAX), ids (val, list, push).
]]
local CACHE, DIRTY, DIRTY_ORDER = {}, {}, {}
local MCACHE, MDIRTY = {}, {}
local WCACHE, WDIRTY = {}, {}
local READY_OPS = {}
local LATER = {}
local REPORT = {released = {}, skipped = {}, cancelled = {}, reopened = {}}
-- events: SEEN[id] is what the last event (or the stored record) said of node id;
-- FLOW_SEEN the flow state as stored (nil: not read yet); PENDING the events to write
local SEEN, PENDING = {}, {}
local FLOW_SEEN

-- What one script may still do of a large transition, in edges settled (a chunked
-- step of STEP node records costs 20 * STEP): settle.lua leaves the rest in the work list
-- for the next claim, so that no call blocks Redis for long whatever the flow's size.
-- Measured with benchmarks/chunk_slowlog.py (redis-server 6.2, no other load): an edge
-- that releases its dependent costs about 90 us of Lua (records read and written back,
-- two stream entries), so 50 edges stay near 5 ms.
local BUDGET = {left = 2 * STEP}

-- The Redis clock, in seconds.
local function now_ts()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end


-- A record is stored without the fields at their default (define/records.py compact,
-- SCALAR_DEFAULTS): every transition reads them as if they were there (with_defaults).
-- (A null field reads cjson.null; a list field not stored reads nil, see below.)
local RECORD_DEFAULTS = {
  kind = 'task', policy = 'fail', rule = 'all_success', state = 'pending', attempt = 0,
  retries = 0, recoveries = 0, ignored = false,
  task = cjson.null, input = cjson.null, queue = cjson.null, priority = cjson.null,
  rate = cjson.null, epol = cjson.null, max_rec = cjson.null, timeout = cjson.null,
  poke = cjson.null, ctx = cjson.null, skip_reason = cjson.null, error = cjson.null,
  queued_at = cjson.null, started_at = cjson.null, finished_at = cjson.null,
  worker = cjson.null,
}
-- The list fields: not stored when empty
local IS_LIST = {after = true, deps_of = true, removed = true, task_ids = true,
  starts = true, progress = true, history = true}

-- The defaults are read through a metatable rather than written into each record: a
-- decoded record grew from its few stored fields to some thirty, a table resized three
-- times (2.4 KB allocated a record, 3-4 us; perf showed glibc's malloc and Lua's
-- collector at 30 % of Redis's time). An absent list reads nil: every reader of one
-- goes through list(), contains() or the ids helpers (ids.lua), which take nil as empty.
-- compact() iterates the stored fields only, so the defaults never reach the store.
local RECORD_META = {__index = RECORD_DEFAULTS}

local function with_defaults(rec)
  setmetatable(rec, RECORD_META)
  if rec.fpol == nil then rec.fpol = rec.policy end
  return rec
end

-- The record as stored: a copy without the fields at their default (the rule of
-- define/records.py compact) and without any other null field (every read of one goes
-- through val, to which absent and null are the same). A record written whole is about
-- 650 bytes, which cjson takes some 20 us to decode; compact, about a third of that.
local function compact(rec)
  local out = {}
  for k, v in pairs(rec) do
    local d = RECORD_DEFAULTS[k]
    if d ~= nil then
      if v ~= d then out[k] = v end -- a null field at its default, null, is left out too
    elseif v == cjson.null then
      -- left out
    elseif IS_LIST[k] then
      if type(v) ~= 'table' or next(v) ~= nil then out[k] = v end
    else
      out[k] = v
    end
  end
  if out.fpol ~= nil and out.fpol == rec.policy then out.fpol = nil end
  return out
end

-- A hash field read once per script: cache[field] holds what was read (false: absent)
-- or written since.
local function cached_hget(cache, key, field)
  local v = cache[field]
  if v == nil then
    v = redis.call('HGET', key, field) or false
    cache[field] = v
  end
  return v or nil
end

-- The meta fields the transitions read most, read together by the first mget of any of
-- them (one HMGET in place of a dozen HGETs: some 20 us of Redis time a completion);
-- the others (name, context, webhook...), which may be long, one by one when asked.
local META_HOT = {'v', 'state', 'nonce', 'hidden', 'eager', 'cwait', 'paused',
  'cancel_cursor', 'webhook_pending', 'webhook_events', 'settling', 'reopening',
  'scanning', 'total', 'done', 'nfail', 'rate_limit', 'id'}
local IS_HOT, META_READ = {}, false
for _, f in ipairs(META_HOT) do IS_HOT[f] = true end

local function mget(field)
  if MCACHE[field] == nil and IS_HOT[field] and not META_READ then
    META_READ = true
    local got = redis.call('HMGET', META, unpack(META_HOT))
    for i, f in ipairs(META_HOT) do
      -- what this script wrote already stays
      if MCACHE[f] == nil then MCACHE[f] = got[i] or false end
    end
  end
  return cached_hget(MCACHE, META, field)
end

local function mset(field, value)
  if field == 'state' and FLOW_SEEN == nil then FLOW_SEEN = mget('state') or false end
  MCACHE[field] = tostring(value)
  MDIRTY[field] = true
end

-- The meta field goes (at flush).
local function mdel(field)
  MCACHE[field] = false
  MDIRTY[field] = true
end

local function mincr(field, n)
  mset(field, (tonumber(mget(field)) or 0) + n)
end

-- What an event says of a node: a new event is due when this changes.
-- The state readers see of a map (SPEC section 12), which is pending while it waits for
-- its items and scheduled while the dispatcher expands or collects it: pending until it
-- expands, then running until it ends.
local function shown_state(rec)
  if rec.kind == 'map' and (rec.state == 'pending' or rec.state == 'scheduled') then
    return val(rec.k) and 'running' or 'pending'
  end
  return rec.state
end

local function node_mark(rec)
  local last = list(rec.progress)
  last = last[#last]
  return tostring(shown_state(rec)) .. '|' .. tostring(rec.attempt) .. '|' ..
    tostring(last and last.at or '')
end

-- Item i of a map is not written when its map expands (evaluate.lua expand_map): until
-- its first write it reads as this, made from its map's record (cancelled with it). Its
-- input is its element, staged in the args hash as '@<token>:<i>' (engine/maps.py).
local function item_record(m, id, i)
  local base = string.match(id, '^(.+)%[%d+%]$')
  local rec = with_defaults({task = m.task, deps_of = base, of = base, item = i, xin = '@' .. m.xtok .. ':' .. i, queue = m.queue, priority = m.priority,
    rate = m.rate, policy = m.policy, fpol = m.fpol, max_rec = m.max_rec, ctx = m.ctx,
    lp = (tonumber(m.lp) or 1) + 1})
  if m.state == 'cancelled' then
    rec.state = 'cancelled'
    rec.cancel_reason = m.cancel_reason
  end
  return rec
end

local function load(id)
  local rec = CACHE[id]
  if rec == nil then
    local raw = redis.call('HGET', NODES, id)
    rec = raw and with_defaults(cjson.decode(raw)) or false
    if not raw and string.byte(id, -1) == 93 then -- ']'
      local base, i = string.match(id, '^(.+)%[(%d+)%]$')
      local m = base and load(base)
      i = tonumber(i)
      if m and m.kind == 'map' and m.k and i < m.k then rec = item_record(m, id, i) end
    end
    CACHE[id] = rec
    if SEEN[id] == nil then SEEN[id] = rec and node_mark(rec) or false end
  end
  return rec or nil
end

local function save(id, rec)
  CACHE[id] = rec
  local mark = node_mark(rec)
  if SEEN[id] ~= mark then
    SEEN[id] = mark
    local progress = list(rec.progress)
    local event = {node = id, name = rec.task, state = shown_state(rec),
      attempt = rec.attempt, error = rec.error,
      progress = progress[#progress] or cjson.null}
    PENDING[#PENDING + 1] = event
    -- node events opted in for the flow's webhook (SPEC section 8): a node that ends
    -- makes the webhook due at once (the claim of this same step reads the flag), and
    -- its event also goes to the flow's delivery list (HOOKS), which is never trimmed:
    -- the stream is, and a slow receiver must still get every one (worker/webhooks.py)
    if TERMINAL[rec.state] and string.find(mget('webhook_events') or '', 'node', 1, true)
        and (mget('webhook') or '') ~= '' then
      event.hook = true
      if mget('webhook_pending') ~= '1' then mset('webhook_pending', '1') end
    end
  end
  if not DIRTY[id] then
    DIRTY[id] = true
    DIRTY_ORDER[#DIRTY_ORDER + 1] = id
  end
end

-- A field of the waiting hash as a number; nil when absent.
local function wget(field)
  return tonumber(cached_hget(WCACHE, WAITING, field))
end

local function wset(field, n)
  WCACHE[field] = n
  WDIRTY[field] = true
end

-- A field of the waiting hash as a string (a wide node's scan, engine/scan.lua: fields
-- '<id>|...', '|' being outside the id alphabet; written with wset); nil when absent.
-- wdel: the field goes.
local function wraw(field) return cached_hget(WCACHE, WAITING, field) end

local function wdel(field)
  WCACHE[field] = false
  WDIRTY[field] = true
end

local function ready_add(id, score) READY_OPS[#READY_OPS + 1] = {'ZADD', READY, id, score} end
local function ready_rem(id) READY_OPS[#READY_OPS + 1] = {'ZREM', READY, id} end
local function timed_add(id, due) READY_OPS[#READY_OPS + 1] = {'ZADD', TIMED, id, due} end
local function timed_rem(id) READY_OPS[#READY_OPS + 1] = {'ZREM', TIMED, id} end
local function later(fn) LATER[#LATER + 1] = fn end

-- Fields per variadic HSET/HDEL: one command instead of one per field (a create sets
-- some twenty meta fields), in batches well inside Lua's unpack limit.
local WRITE_BATCH = 256

local function hset_all(key, args)
  for i = 1, #args, 2 * WRITE_BATCH do
    redis.call('HSET', key, unpack(args, i, math.min(i + 2 * WRITE_BATCH - 1, #args)))
  end
end

-- Write a cached hash's changed fields: set, or deleted where the cache holds false
-- (cached_hget's mark of an absent field).
local function write_fields(key, cache, dirty)
  local sets, dels = {}, {}
  for field, _ in pairs(dirty) do
    if cache[field] == false then
      dels[#dels + 1] = field
    else
      sets[#sets + 1] = field
      sets[#sets + 1] = cache[field]
    end
  end
  hset_all(key, sets)
  for i = 1, #dels, WRITE_BATCH do
    redis.call('HDEL', key, unpack(dels, i, math.min(i + WRITE_BATCH - 1, #dels)))
  end
end

-- Append the noted events (node events first, then the flow's, if its state changed)
-- to the flow's stream and, unless the flow is hidden (add_bulk, lua/create.lua), to
-- the registry's; both trimmed to about EVENTS_MAXLEN entries (scripts.py).
local function write_events()
  local state = MCACHE['state']
  if MDIRTY['state'] and state and state ~= FLOW_SEEN then
    FLOW_SEEN = state
    PENDING[#PENDING + 1] = {node = cjson.null, name = mget('name') or cjson.null,
      state = state, attempt = cjson.null, error = cjson.null, progress = cjson.null}
  end
  if #PENDING == 0 then return end
  local t = redis.call('TIME')
  local time = tonumber(t[1]) + tonumber(t[2]) / 1000000
  local flow = mget('id')
  local hidden = mget('hidden')
  local global = EVENTS_ALL and not hidden
  for _, e in ipairs(PENDING) do
    local hook = e.hook
    e.hook = nil
    e.time = time
    e.flow = flow
    local body = cjson.encode(e)
    local id = '*'
    if global then
      id = redis.call('XADD', EVENTS_ALL, 'MAXLEN', '~', EVENTS_MAXLEN, '*', 'e', body)
    end
    -- the registry's id when there is one; a stream whose ids ran ahead of it (the
    -- registry's stream deleted by hand) gets its own rather than failing the transition
    local ok = redis.pcall('XADD', EVENTS, 'MAXLEN', '~', EVENTS_MAXLEN, id, 'e', body)
    if type(ok) == 'table' and ok.err then
      ok = redis.call('XADD', EVENTS, 'MAXLEN', '~', EVENTS_MAXLEN, '*', 'e', body)
    end
    if hook then redis.call('RPUSH', HOOKS, cjson.encode({id = ok, e = body})) end
  end
  -- on Redis Cluster (no EVENTS_ALL) the --flows workers copy the flow's stream into
  -- the registry's (worker/eventcopy.py): ev_due says there is something to copy, in the
  -- same script as the events, so no crash can lose it (keys.py)
  if not EVENTS_ALL and not hidden and mget('ev_due') ~= '1' then mset('ev_due', '1') end
  PENDING = {}
end

local function flush()
  write_events()
  local args = {}
  for _, id in ipairs(DIRTY_ORDER) do
    args[#args + 1] = id
    args[#args + 1] = cjson.encode(compact(CACHE[id]))
  end
  hset_all(NODES, args)
  write_fields(META, MCACHE, MDIRTY)
  write_fields(WAITING, WCACHE, WDIRTY)
  for _, op in ipairs(READY_OPS) do
    if op[1] == 'ZADD' then
      redis.call('ZADD', op[2], op[4], op[3])
    else
      redis.call('ZREM', op[2], op[3])
    end
  end
  for _, fn in ipairs(LATER) do fn() end
  -- written: a second flush in the same script writes only what changed since
  DIRTY, DIRTY_ORDER, MDIRTY, WDIRTY, READY_OPS, LATER = {}, {}, {}, {}, {}, {}
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
  push(rec, 'history', entry, HISTORY_MAX)
end
