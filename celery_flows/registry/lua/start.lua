--[[
  start: the attempt guard, run by the worker right before a node's body.
  KEYS: meta nodes args results ready timed waiting work reopen,
        request (lua/_request.lua: a re-sent call returns the first reply without running again)
  ARGV[1] node id  ARGV[2] attempt  ARGV[3] start key "<retries>:<replace nesting>"
  ARGV[4] task id  ARGV[5] worker hostname  ARGV[6] worker instance (lease holder)
  GKEYS (after the request key, only on a single Redis; on a cluster the caller sends
         these writes itself): [1] the queued-message index, which the task id leaves;
         [2] the worker instance's lease set, which it joins (at the Redis time) when the
         body may run: the lease the worker took when it received the message, taken
         here in the same step for a message it did not lease yet
  Returns: {code, flow context blob, node context overlay blob ('' = none)}
    (blobs of the args hash, copied as stored; a flow of format 1.0 gives JSON instead)
    1 run the body | 0 duplicate delivery of a start already made | 2 stale attempt
    3 node terminal, flow cancelled, or an eager flow (run only by its driver)
    4 the flow is paused: not started, put back
    5 the task id's nonce is not this flow's: a message of an earlier flow with this id
    -1 no such flow | -2 version | -4 no such node
  Emits: scheduled|queued|retrying|running -> running; while the flow is paused a first
         start (no replacement) puts the node back: -> scheduled (retrying for a Celery
         retry) in the outbox, same attempt, marked putback so that a late published
         acknowledgement of the refused message leaves it there; resume releases it.
]]
local function start()
  local ok = flow_ok()
  if ok < 0 then return {ok} end
  -- the id of an expired flow may be reused; its leftover messages carry the old nonce
  if string.match(ARGV[4], '~([^~]*)$') ~= mget('nonce') then return {5} end
  -- an eager flow's nodes run only in the process that drives it (eager.py)
  if mget('eager') == '1' and ARGV[5] ~= 'eager' then return {3} end
  local id, attempt, key = ARGV[1], tonumber(ARGV[2]), ARGV[3]
  local rec = load(id)
  if not rec then return {-4} end
  if stopping() or TERMINAL[rec.state] then return {3} end
  if rec.attempt ~= attempt then return {2} end
  if rec.state == 'pending' or rec.state == 'awaiting' then return {2} end
  if contains(rec.starts, key) then return {0} end
  local now = now_ts()
  local retries, nesting = string.match(key, '^(%d+):(%d+)$')
  -- a message of an earlier retry or sensor poke: that start was made (its key may
  -- have been dropped to keep rec.starts small) or superseded. Not for a replacement
  -- (self.replace()), whose message counts its retries afresh.
  if tonumber(nesting) == 0 and (tonumber(retries) or 0) < (tonumber(val(rec.retries)) or 0) then
    return {0}
  end
  if mget('paused') == '1' and tonumber(nesting) == 0 then
    -- a message released just before pause() arrived after it: nothing starts while paused
    rec.state = (tonumber(retries) or 0) > 0 and 'retrying' or 'scheduled'
    rec.putback = true
    rec.queued_at = cjson.null
    history(rec, {attempt = attempt, outcome = 'requeued', at = now,
                  reason = 'the flow was paused before it started'})
    save(id, rec)
    ready_add(id, 0)
    flush()
    return {4}
  end
  push(rec, 'starts', key)
  rec.state = 'running'
  if val(rec.started_at) == nil then rec.started_at = now end
  if val(rec.queued_at) == nil then rec.queued_at = now end
  rec.worker = ARGV[5]
  rec.lease = ARGV[6]
  if not contains(rec.task_ids, ARGV[4]) then push(rec, 'task_ids', ARGV[4]) end
  save(id, rec)
  ready_rem(id)
  flush()
  -- user data is never decoded here (cjson would change it): the blobs go back as stored
  local overlay = ''
  if type(rec.ctx) == 'string' then
    overlay = redis.call('HGET', ARGS, rec.ctx) or ''
  elseif type(rec.ctx) == 'table' then
    overlay = cjson.encode(rec.ctx)  -- a record of format 1.0
  end
  return {1, redis.call('HGET', ARGS, 'ctx#') or mget('context') or '', overlay}
end

local reply = start()
if GKEYS[1] then redis.call('ZREM', GKEYS[1], ARGV[4]) end
if GKEYS[2] and reply[1] == 1 then redis.call('ZADD', GKEYS[2], now_ts(), ARGV[4]) end
return reply
