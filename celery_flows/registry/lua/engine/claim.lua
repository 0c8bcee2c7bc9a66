--[[
  engine/claim.lua: claim_entries, taking outbox entries for publishing (claim.lua, and
  complete.lua, which claims what a completion released in the same step).
  Before it claims, a claim without explicit ids does a bounded share of what large
  transitions left (chores): see its reply's "more".
  An entry's inputs (the kinds of its edges and its dependencies' results) are read
  only for a node that takes them (its record's input), and from at most CLAIM_READS
  dependency records a claim: a wide node (scan.lua) sends the letters its scan stored
  and no results, which the dispatcher then reads in pages (engine/dispatch.py).
  Uses: constants (READY, TIMED, HELD, EXTERNAL_TIMEOUT), ids (val, list, deps_list,
  after_list, ids_count, contains), cache (load, save, mget, flush, compact, wraw,
  BUDGET, REPORT), flow
  (set_flow_state, stopping), evaluate (edge_kind), WIDE (scripts.py), cancel (cancel_chunk), settle
  (fail_node, settle_more), scan (scan_more), reopen (reopen_more), evaluate
  (items_more: a map's items).

  claim_entries(lease, limit, mode, ids_given): the claim reply (see claim.lua's header)
    lease      seconds an unacknowledged claim holds an entry
    limit      the most entries
    mode       '1': report longest paths; 'eager': the eager driver's claim
    ids_given  explicit node ids (a releaser's held nodes), or {} for due entries
]]

-- Dependency records one claim reads for its entries' inputs (about 6 us each); past
-- them the claim takes no further entry (the rest stay due: its reply says "more").
local CLAIM_READS = 2 * WIDE

-- The bounded steps a large transition left to the claims, within the script's BUDGET:
-- fail_fast's chunked cancel (then nothing else), a chunked retry's reopening, the work
-- list's settling, the scans of wide nodes. Returns true while any is left: the caller
-- claims again.
local function chores(now)
  if mget('cancel_cursor') then
    if mget('state') == 'cancelled' then return false end -- cancel_step.lua's
    if BUDGET.left > 0 then
      BUDGET.left = BUDGET.left - 20 * STEP
      cancel_chunk(mget('cancel_cursor'), STEP, now, false)
    end
    return mget('cancel_cursor') ~= nil
  end
  local more = reopen_more(now)
  if settle_more(now) then more = true end
  if items_more(now) then more = true end
  if scan_more(now) then more = true end
  -- the last skips may have finished the flow
  set_flow_state(now)
  return more
end

local function claim_entries(lease, limit, mode, ids_given)
  local st = mget('state')
  local webhook = mget('webhook_pending') or ''
  -- an eager flow belongs to the producer driving it in-process, never to the workers;
  -- a flow of an add_bulk batch not yet committed and un-hidden: nothing of it runs
  if st == 'cancelled' or mget('hidden') or (mget('eager') == '1' and mode ~= 'eager') then
    return {1, 0, '', '', '', webhook, ''}
  end
  -- waiting for its concurrency group (engine/groups.py): nothing released, no timer
  if mget('cwait') == '1' then return {3, 0, '', '', '', webhook, ''} end
  local now = now_ts()
  local more = ''
  if #ids_given == 0 then
    if chores(now) then more = '1' end
    -- written now, so that what the steps released is claimed by this same call
    if #REPORT.released > 0 then flush() end
  end
  if mget('paused') == '1' or stopping() then
    flush()
    return {1, 0, '', '', '', mget('webhook_pending') or '', more}
  end
  -- due timed entries: a held retry or poke goes to the outbox; an external node past
  -- its deadline fails
  local expired = false
  if #ids_given == 0 then
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', TIMED, '-inf', now)) do
      local rec = load(id)
      redis.call('ZREM', TIMED, id)
      if rec and rec.state == 'awaiting' then
        expired = true
        fail_node(id, rec, now, 'TimeoutError: external node ' .. id .. ' was not signalled ' ..
          'within ' .. (tonumber(val(rec.timeout)) or EXTERNAL_TIMEOUT) .. ' s')
      elseif rec and rec.state == 'retrying' then
        redis.call('ZADD', READY, 0, id)
      end
    end
    if expired then
      -- written now, so that what the expiry released is claimed by this same call
      set_flow_state(now)
      flush()
      -- fail_fast stopped it: nothing is claimed, the cancel goes on in steps
      if stopping() then return {1, 0, '', '', '', mget('webhook_pending') or '', '1'} end
    end
  end
  -- claimed by another process, not yet published (held entries are not claims)
  local left = redis.call('ZCOUNT', READY, '(' .. now, '(' .. HELD)
  local ids
  if #ids_given > 0 then
    ids = {}
    for _, id in ipairs(ids_given) do
      if redis.call('ZSCORE', READY, id) then ids[#ids + 1] = id end
    end
  else
    ids = redis.call('ZRANGEBYSCORE', READY, '-inf', now, 'LIMIT', 0, limit)
  end
  local memo = {}
  local function longest(id)
    -- iterative post-order DFS over dependents, memoised within this call
    local stack = {{id, 1}}
    while #stack > 0 do
      local top = stack[#stack]
      local rec = load(top[1])
      local kids = deps_list(rec)
      -- a node with a stored path ends the walk there
      if top[2] == 1 and tonumber(val(rec.lp)) then kids = {} end
      if top[2] <= #kids then
        local kid = kids[top[2]]
        top[2] = top[2] + 1
        if memo[kid] == nil then stack[#stack + 1] = {kid, 1} end
      else
        local best = 0
        for _, kid in ipairs(kids) do
          if memo[kid] and memo[kid] > best then best = memo[kid] end
        end
        memo[top[1]] = tonumber(val(rec.lp)) or (best + 1)
        stack[#stack] = nil
      end
    end
    return memo[id]
  end
  local want_path = mode == '1' or (mget('rate_limit') or '') ~= ''
  local out = {0, left, mget('nonce'), mget('rate_limit') or '', '', '', more}
  local reads = 0
  for _, id in ipairs(ids) do
    local rec = load(id)
    if not rec or (rec.state ~= 'scheduled' and rec.state ~= 'retrying') then
      redis.call('ZREM', READY, id)
    elseif reads >= CLAIM_READS then
      -- this claim read enough records: the entry stays due for the next one
      out[7] = '1'
    else
      redis.call('ZADD', READY, now + lease, id)
      if rec.putback then
        -- released again after a pause: this claim's publish moves it to queued
        rec.putback = nil
        save(id, rec)
      end
      local kinds, results = {}, {}
      if val(rec.xin) then
        -- a map's item: its element, staged when its map expanded
        kinds, results = {'ok'}, {redis.call('HGET', ARGS, rec.xin) or false}
      elseif val(rec.input) == nil then
        -- an immutable signature (.si()) takes no input: nothing to read
      elseif ids_count(rec.after) > WIDE and wraw(id .. '|k') then
        kinds = wraw(id .. '|k')
      else
        local after = after_list(rec)
        reads = reads + #after
        for i, did in ipairs(after) do
          local kind = 'removed'
          if not contains(rec.removed, did) then kind = edge_kind(load(did)) end
          kinds[i] = kind
          results[i] = false
          if kind == 'ok' then results[i] = redis.call('HGET', RESULTS, did) end
        end
      end
      local path = 0
      -- submit stores it (define/records.py longest_paths); the walk is for records
      -- stored by an earlier version, without it
      if want_path or val(rec.rate) then path = tonumber(val(rec.lp)) or longest(id) end
      -- a map's item is called as its map (the signature's arguments stored once)
      out[#out + 1] = {id, cjson.encode(compact(rec)), redis.call('HGET', ARGS, val(rec.of) or id),
                       cjson.encode(kinds), results, path}
    end
  end
  -- the earliest timed entry (external deadline, held retry, sensor poke): a timer
  local nxt = redis.call('ZRANGE', TIMED, 0, 0, 'WITHSCORES')
  if nxt[2] then out[5] = nxt[2] end
  out[6] = mget('webhook_pending') or ''
  flush()  -- putback marks cleared above
  return out
end
