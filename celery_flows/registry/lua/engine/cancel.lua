--[[
  engine/cancel.lua: cancel_all, every node not yet terminal becomes cancelled (the
  cancel transition, lua/cancel.lua, and fail_fast in settle); cancel_one, one node;
  cancel_chunk, one bounded step of a chunked cancel (lua/cancel_step.lua for a cancel,
  the claims for fail_fast: engine/claim.lua).
  A node a chunked retry has not reopened yet (in the reopen set) counts as not terminal:
  it was pending to every reader (engine/reopen.lua), so it is cancelled too.
  Uses: constants (NODES, REOPEN, TERMINAL), ids (list), cache (load, save, mget,
  mset, mdel, mincr, ready_rem, timed_rem, REPORT), evaluate (unreleased).
]]
local function cancel_one(id, rec, now, reason)
  rec.prev_state = rec.state
  rec.state = 'cancelled'
  rec.cancel_reason = reason
  rec.finished_at = now
  save(id, rec)
  ready_rem(id)
  timed_rem(id)
  REPORT.cancelled[#REPORT.cancelled + 1] = id
end

-- Whether a node is still to be cancelled: not terminal, or a chunked retry's node not
-- reopened yet (its record is terminal, but it reads as pending).
local function unfinished(id, rec)
  if not TERMINAL[rec.state] then return true end
  return mget('reopen_set') == '1' and redis.call('SISMEMBER', REOPEN, id) == 1
end

local function cancel_all(now, reason)
  local ids = redis.call('HKEYS', NODES)
  local n = 0
  for _, id in ipairs(ids) do
    local rec = load(id)
    if not TERMINAL[rec.state] then
      -- a map's items never released end with it (they read as cancelled)
      if rec.kind == 'map' then n = n + unreleased(id, rec) end
      cancel_one(id, rec, now, reason)
      n = n + 1
    elseif unfinished(id, rec) then
      -- done counted it already (a retry counts it back when it reopens it)
      cancel_one(id, rec, now, reason)
    end
  end
  mincr('done', n)
  if mget('reopen_set') == '1' then
    redis.call('DEL', REOPEN)
    mdel('reopen_set')
    mdel('reopening')
  end
end

-- A chunked cancel begins: the flow's nodes all count as done already (each will be
-- cancelled), and cancel_chunk writes them from the cursor '0' on.
local function begin_chunked_cancel(reason)
  mset('cancel_cursor', '0')
  mset('cancel_reason', reason)
  mset('done', mget('total'))
  -- a chunked retry's nodes not reopened yet: cancel_chunk cancels them
  mdel('reopening')
end

-- One bounded step of a chunked cancel (up to about `count` node records; `cursor` an
-- HSCAN cursor of the nodes hash): returns the task ids of started nodes and the next
-- cursor ('' when no node is left). Not `dry`: the meta's cursor moves on (and goes,
-- with the reopen set, after the last step).
local function cancel_chunk(cursor, count, now, dry)
  local reason = mget('cancel_reason') or 'cancelled'
  local scan = redis.call('HSCAN', NODES, cursor, 'COUNT', count)
  local started = {}
  local kv = scan[2]
  for i = 1, #kv, 2 do
    local id = kv[i]
    -- an HSCAN may return an element twice: the cache holds its first decode
    local rec = load(id)
    if unfinished(id, rec) then
      if TERMINAL[rec.state] and not dry then redis.call('SREM', REOPEN, id) end
      if rec.state == 'running' or rec.state == 'retrying' or rec.state == 'queued' then
        local ids = list(rec.task_ids)
        if #ids > 0 then started[#started + 1] = ids[#ids] end
      end
      -- done already counts it (begin_chunked_cancel)
      cancel_one(id, rec, now, reason)
    end
  end
  local next_cursor = scan[1]
  if next_cursor == '0' then next_cursor = '' end
  if not dry then
    if next_cursor == '' then
      mdel('cancel_cursor')
      if mget('reopen_set') == '1' then
        redis.call('DEL', REOPEN)
        mdel('reopen_set')
      end
    else
      mset('cancel_cursor', next_cursor)
    end
  end
  return started, next_cursor
end
