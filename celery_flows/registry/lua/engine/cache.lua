--[[
  engine/cache.lua: the write-back cache, and the small helpers everything else uses.
  Reads load node records and meta fields once per script (load, mget); writes
  (save, mset, mincr, wset, ready_add/ready_rem, timed_add/timed_rem, later) reach
  Redis only in flush(). wget/wset are the fan-in counters (the waiting hash, keys.py). A transition called with dry_run skips flush() and returns REPORT
  (report_json): what it would have released, skipped, cancelled and reopened.
  Uses: constants (META, NODES, READY, TIMED, WAITING, HISTORY_MAX).
]]
local CACHE, DIRTY, DIRTY_ORDER = {}, {}, {}
local MCACHE, MDIRTY = {}, {}
local WCACHE, WDIRTY = {}, {}
local READY_OPS = {}
local LATER = {}
local REPORT = {released = {}, skipped = {}, cancelled = {}, reopened = {}}

-- What one script may still do of a large transition, in edges settled (a node record
-- rewritten by a chunked step costs 20): settle.lua leaves the rest in the work list
-- for the next claim, so that no call blocks Redis for long whatever the flow's size.
local BUDGET = {left = 20 * STEP}

-- The Redis clock, in seconds.
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

-- Append x to the list in rec[field] (made when absent); keep its last `max` entries
-- when max is given.
local function push(rec, field, x, max)
  local t = list(rec[field])
  t[#t + 1] = x
  if max then
    while #t > max do table.remove(t, 1) end
  end
  rec[field] = t
end

-- A record is stored without the fields at their default (define/records.py compact,
-- SCALAR_DEFAULTS): put them back, so that every transition sees the whole record
-- (and writes it whole once it changes it).
local RECORD_DEFAULTS = {
  kind = 'task', policy = 'fail', rule = 'all_success', state = 'pending', attempt = 0,
  retries = 0, recoveries = 0, ignored = false,
}
local RECORD_NULLS = {'task', 'input', 'queue', 'priority', 'rate', 'epol', 'max_rec',
  'timeout', 'poke', 'ctx', 'skip_reason', 'error', 'queued_at', 'started_at',
  'finished_at', 'worker'}
local RECORD_LISTS = {'after', 'deps_of', 'removed', 'task_ids', 'starts', 'progress',
  'history'}

local function with_defaults(rec)
  for k, v in pairs(RECORD_DEFAULTS) do
    if rec[k] == nil then rec[k] = v end
  end
  for _, k in ipairs(RECORD_NULLS) do
    if rec[k] == nil then rec[k] = cjson.null end
  end
  for _, k in ipairs(RECORD_LISTS) do
    if rec[k] == nil then rec[k] = {} end
  end
  if rec.fpol == nil then rec.fpol = rec.policy end
  return rec
end

local function load(id)
  local rec = CACHE[id]
  if rec == nil then
    local raw = redis.call('HGET', NODES, id)
    rec = raw and with_defaults(cjson.decode(raw)) or false
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

-- The meta field goes (at flush).
local function mdel(field)
  MCACHE[field] = false
  MDIRTY[field] = true
end

local function mincr(field, n)
  mset(field, (tonumber(mget(field)) or 0) + n)
end

-- A field of the waiting hash as a number; nil when absent.
local function wget(field)
  local v = WCACHE[field]
  if v == nil then
    v = tonumber(redis.call('HGET', WAITING, field)) or false
    WCACHE[field] = v
  end
  return v or nil
end

local function wset(field, n)
  WCACHE[field] = n
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

local function flush()
  local args = {}
  for _, id in ipairs(DIRTY_ORDER) do
    args[#args + 1] = id
    args[#args + 1] = cjson.encode(CACHE[id])
  end
  hset_all(NODES, args)
  local sets, dels = {}, {}
  for field, _ in pairs(MDIRTY) do
    if MCACHE[field] == false then
      dels[#dels + 1] = field
    else
      sets[#sets + 1] = field
      sets[#sets + 1] = MCACHE[field]
    end
  end
  hset_all(META, sets)
  for i = 1, #dels, WRITE_BATCH do
    redis.call('HDEL', META, unpack(dels, i, math.min(i + WRITE_BATCH - 1, #dels)))
  end
  local wargs = {}
  for field, _ in pairs(WDIRTY) do
    wargs[#wargs + 1] = field
    wargs[#wargs + 1] = WCACHE[field]
  end
  hset_all(WAITING, wargs)
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
