--[[
  complete: record an attempt's outcome (first report wins) and release what it unblocks.
  KEYS: meta nodes args results ready timed waiting work reopen,
        request (lua/_request.lua: a re-sent call returns the first reply without running again)
  ARGV[1] node id  ARGV[2] attempt  ARGV[3] outcome: succeeded | failed | retrying
  ARGV[4] serialised result ('' unless succeeded)  ARGV[5] error text ('' if none)
  ARGV[6] '1' for an external node's signal (its state is awaiting), else ''
  ARGV[7] for a retry held in Redis: seconds until it may be released again ('' when
          Celery itself re-sent the message)
  ARGV[8] '0' when a succeeded result is falsy: a sensor then pokes again after its
          poke_interval, or fails once its timeout has passed
  ARGV[9..11] claim lease, most entries, claim mode (claim.lua's ARGV[1..3]): when
          given, what the completion released is claimed in this same step (the reply's
          sixth field); ARGV[12] a dirty marker for the dispatch index and ARGV[13] the
          task id whose lease to drop, both used only with GKEYS (below)
  ARGV[14] '' or, for a node some map expands over, JSON {map id: [k, token] or error
          text}: how each map expands if this completion lets it (EXPANSIONS,
          engine/evaluate.lua); the items' elements are staged in the args hash first
  ARGV[15..16] (optional, a single Redis only) the node's Celery result as the Redis
          result backend stores it, and its expiry in seconds ('' none): written under
          the last of GKEYS and published there when the outcome is recorded or
          reported late (codes 1 and 0), unless a SUCCESS is stored already, as the
          backend does (worker/results.py)
  GKEYS (after the request key, only on a single Redis; on a cluster the caller sends
         these writes itself): [1] the dispatch index: the marker ARGV[12] is added at
         the Redis time when the claim took entries, others' claims are pending or
         bounded steps are left (someone must publish them, or claim again); [2] the recording worker's lease set: ARGV[13]
         leaves it
  Returns: {code, released, flow state, the node's queue, '1' if the marker was added,
            claim reply (claim.lua) or ''}
    1 recorded | 0 late or duplicate report, kept in the node's history only
    7 not recorded: the node succeeded and maps expand over its result; the reply's
      seventh field is JSON {map id: max_length}: call again with ARGV[14]
    6 recorded a sensor's falsy check: it pokes again later as the same attempt and
      keeps its queue slot (SPEC 7: a retrying node keeps its slot)
    -1 no such flow | -2 version | -4 no such node
  Emits: the node -> succeeded|failed|retrying; dependents whose edges are all terminal
         -> scheduled (outbox), awaiting, or skipped (cascading; fail_fast cancels the
         rest); flow state refreshed.
]]
local function record()
  local ok = flow_ok()
  if ok < 0 then return {ok, 0, '', ''} end
  local id, attempt, outcome = ARGV[1], tonumber(ARGV[2]), ARGV[3]
  local rec = load(id)
  if not rec then return {-4, 0, '', ''} end
  local now = now_ts()
  local err = ARGV[5]
  local external = ARGV[6] == '1'
  local open = rec.attempt == attempt and not TERMINAL[rec.state] and rec.state ~= 'pending'
    and not stopping() -- a chunked cancel's nodes (lua/cancel.lua, fail_fast)
  if external then
    open = open and rec.state == 'awaiting'
  else
    open = open and rec.state ~= 'awaiting'
  end
  if not open then
    history(rec, {attempt = attempt, outcome = outcome, at = now, late = true,
                  error = (err ~= '' and err or nil)})
    save(id, rec)
    flush()
    return {0, 0, mget('state'), val(rec.queue) or ''}
  end
  if outcome == 'retrying' then
    rec.state = 'retrying'
    rec.retries = (rec.retries or 0) + 1
    rec.error = err
    local delay = tonumber(ARGV[7] or '')
    if delay then
      rec.retry_at = now + delay
      timed_add(id, now + delay)
    end
    save(id, rec)
    flush()
    return {1, 0, mget('state'), val(rec.queue) or ''}
  end
  if outcome == 'succeeded' and rec.kind == 'sensor' and ARGV[8] == '0' then
    local since = tonumber(val(rec.sensor_since)) or now
    local timeout = tonumber(val(rec.timeout)) or 600
    local poke = tonumber(val(rec.poke)) or 10
    if now + poke - since > timeout then
      outcome, err = 'failed', 'TimeoutError: the sensor condition was not met within ' ..
        timeout .. ' s'
    else
      rec.state = 'retrying'
      rec.retries = (rec.retries or 0) + 1
      rec.retry_at = now + poke
      -- nothing grows per poke: start.lua refuses a start key below rec.retries, so the
      -- keys of earlier pokes need not be kept
      rec.starts = {}
      save(id, rec)
      timed_add(id, now + poke)
      flush()
      return {6, 0, mget('state'), val(rec.queue) or ''}
    end
  end
  if outcome == 'succeeded' and val(rec.maps) then
    if (ARGV[14] or '') == '' then
      local lengths = {}
      for _, mid in ipairs(list(rec.maps)) do
        local m = load(mid)
        if m then lengths[mid] = tonumber(val(m.mlen)) or 1024 end
      end
      return {7, 0, mget('state'), val(rec.queue) or '', '', '', cjson.encode(lengths)}
    end
    for mid, x in pairs(cjson.decode(ARGV[14])) do EXPANSIONS[mid] = x end
  end
  rec.state = outcome
  rec.finished_at = now
  ready_rem(id)
  timed_rem(id)
  if val(rec.started_at) == nil then rec.started_at = now end
  if outcome == 'succeeded' then
    rec.error = cjson.null
    later(function() redis.call('HSET', RESULTS, id, ARGV[4]) end)
  else
    rec.error = err
  end
  history(rec, {attempt = attempt, outcome = outcome, at = now,
                error = (err ~= '' and err or nil)})
  save(id, rec)
  settle(id, now)
  local state = set_flow_state(now)
  flush()
  return {1, #REPORT.released, state, val(rec.queue) or ''}
end

local reply = record()
reply[5], reply[6] = reply[5] or '', reply[6] or ''
if (ARGV[9] or '') ~= '' and reply[1] >= 0 and reply[1] ~= 7 then
  local claim = claim_entries(tonumber(ARGV[9]), tonumber(ARGV[10]), ARGV[11], {})
  reply[6] = claim
  if GKEYS[1] and ((claim[1] == 0 and (#claim > 7 or tonumber(claim[2]) > 0))
      or claim[7] == '1') then
    redis.call('ZADD', GKEYS[1], now_ts(), ARGV[12])
    reply[5] = '1'
  end
end
if (ARGV[15] or '') ~= '' and (reply[1] == 1 or reply[1] == 0) then
  local key = GKEYS[#GKEYS]
  local kept = redis.call('GET', key)
  local ok, doc = pcall(cjson.decode, kept or 'null')
  if not (ok and type(doc) == 'table' and doc.status == 'SUCCESS') then
    if ARGV[16] ~= '' then
      redis.call('SET', key, ARGV[15], 'EX', ARGV[16])
    else
      redis.call('SET', key, ARGV[15])
    end
    redis.call('PUBLISH', key, ARGV[15])
  end
end
-- not before the outcome is recorded: a worker that dies before its second call (code
-- 7) must leave its lease for the recovery
if GKEYS[2] and (ARGV[13] or '') ~= '' and reply[1] ~= 7 then
  redis.call('ZREM', GKEYS[2], ARGV[13])
end
return reply
