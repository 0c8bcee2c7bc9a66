--[[
  engine/flow.lua: the flow record (meta) as a whole: whether a script may act on it
  (its format version, finished or not), and its state as its counters give it.
  A flow that finishes gets finished_at, a due webhook, and at flush its keys expire
  after their retention and its channel hears the new state; a finished flow that runs
  again loses finished_at and its keys persist.
  Uses: constants (META, KEYS), cache (mget, mset, mincr, MCACHE, MDIRTY, later).
  A flow of a concurrency group is waiting while meta cwait=1 (engine/groups.py).
]]

-- 0, or the code of a script that must not touch this flow: -1 no flow, -2 a record
-- format this version does not understand.
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

-- The flow was cancelled, or fail_fast stopped it: a chunked cancel may still be writing
-- its node records (cancel_cursor, lua/cancel.lua), and nothing of it runs any more.
local function stopping()
  return mget('state') == 'cancelled' or mget('cancel_cursor') ~= nil
end

-- The reason a change that needs every node record written must wait (a chunked
-- cancel, retry or settle in progress: the claims finish them), or nil.
local function busy()
  if mget('cancel_cursor') then return 'its nodes are still being cancelled' end
  if mget('reopening') == '1' then return 'a retry of it is still being written' end
  return nil
end

-- The reply of a change refused while busy() says why, or nil.
local function busy_refusal()
  local why = busy()
  if why then return {-5, why .. ' (try again in a moment)', mget('state')} end
  return nil
end

-- The reply of a change refused because the flow already finished.
local function finished_refusal()
  local st = mget('state')
  return {-5, 'the flow already finished as ' .. st, st}
end

-- The flow finishes now as `state` (succeeded, failed or cancelled).
local function finish_flow(state, now)
  mset('state', state)
  mset('finished_at', now)
  if (mget('webhook') or '') ~= '' then mset('webhook_pending', '1') end
  later(function()
    local ttl = tonumber(redis.call('HGET', META, 'retention'))
    for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], ttl) end
    local channel = redis.call('HGET', META, 'channel')
    if channel then redis.call('PUBLISH', channel, state) end
  end)
end

-- The flow's state from its counters (a cancelled flow stays cancelled); returns it.
local function set_flow_state(now)
  local st = mget('state')
  if st == 'cancelled' then return st end
  local total = tonumber(mget('total'))
  local done = tonumber(mget('done'))
  local new
  -- a chunked retry (reopening) counts each node back only as it rewrites it
  if done < total or mget('reopening') == '1' then
    -- a finished flow of a concurrency group that reopens (retry, ignore_failure) waits
    -- for a place again, last in line, as a new life (cgen): lua/conc_start.lua
    if (st == 'succeeded' or st == 'failed') and mget('cgroup') then
      mset('cwait', '1')
      mincr('cgen', 1)
    end
    if mget('paused') == '1' then new = 'paused'
    elseif mget('cwait') == '1' then new = 'waiting'
    else new = 'running' end
  elseif tonumber(mget('nfail')) > 0 then
    new = 'failed'
  else
    new = 'succeeded'
  end
  if new ~= st then
    if new == 'succeeded' or new == 'failed' then
      finish_flow(new, now)
    else
      mset('state', new)
      if st == 'succeeded' or st == 'failed' then
        MCACHE['finished_at'] = false
        MDIRTY['finished_at'] = true
        later(function()
          for i = 1, #KEYS do redis.call('PERSIST', KEYS[i]) end
        end)
      end
    end
  end
  return new
end
