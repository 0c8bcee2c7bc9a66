--[[
  retry: run again the nodes that failed under "fail" (and those fail_fast cancelled),
  with the nodes skipped as upstream_failed because of them, as new attempts.
  Everything else, succeeded nodes included, is untouched.
  KEYS: meta nodes args results ready timed waiting work reopen,
        request (lua/_request.lua: a re-sent call returns the first reply without
        running again)
  ARGV[1] '' : the whole retry in this script (a flow of at most STEP nodes)
          'commit': a chunked retry (a larger flow). Its caller staged the nodes to
          reopen in the reopen set while reading the records (engine/chunks.py; hidden
          until now); this makes them pending to every reader at once (meta
          reopening=1), and the claims reopen them a step at a time (engine/reopen.lua
          reopen_more), counting each back as they go.
  ARGV[2] for 'commit': the meta's fgen when the staging began (any node that failed,
          was skipped, cancelled or reopened since makes the staging stale)
  ARGV[3] '1' for a dry run (only without 'commit')
  Returns: {code, report JSON | reason, flow state}
    1 done | 2 'commit': the staging is stale (or empty), nothing was changed: stage
    again | -5 refused (cancelled, or no failure under "fail", or busy) | -1 no flow |
    -2 version
  Emits: those nodes -> pending (reopened), then scheduled/skipped as their edges allow;
         a failed flow -> running.
]]
local ok = flow_ok()
if ok < 0 then return {ok, '', ''} end
local st = mget('state')
if st == 'cancelled' then return {-5, 'a cancelled flow cannot be retried', st} end
local refused = busy_refusal()
if refused then return refused end
local now = now_ts()
if ARGV[1] == 'commit' then
  if (mget('fgen') or '') ~= ARGV[2] or redis.call('SCARD', REOPEN) == 0 then
    return {2, 'stale', st}
  end
  redis.call('PERSIST', REOPEN)
  mset('reopen_set', '1')
  mset('reopening', '1')
  mincr('fgen', 1)
  local state = set_flow_state(now)
  flush()
  return {1, report_json(), state}
end
local roots = {}
for _, id in ipairs(redis.call('HKEYS', NODES)) do
  local rec = load(id)
  if (rec.state == 'failed' and rec.counted_fail)
      or (rec.state == 'cancelled' and rec.cancel_reason == 'fail_fast') then
    roots[#roots + 1] = id
    -- a map that failed at its expansion runs again from its input (SPEC section 12)
    if rec.kind == 'map' and not val(rec.k) and rec.state == 'failed' then
      local over = after_list(rec)[1]
      if over and load(over) and TERMINAL[load(over).state] then roots[#roots + 1] = over end
    end
  end
end
if #roots == 0 then
  return {-5, 'nothing to retry: no node failed under failure_policy "fail"', st}
end
local ids = {}
for _, id in ipairs(roots) do ids[#ids + 1] = id end
for _, id in ipairs(upstream_failed_closure(roots)) do ids[#ids + 1] = id end
evaluate_all(reopen(ids, now), now)
local state = set_flow_state(now)
if ARGV[3] == '1' then return {1, report_json(), state} end
flush()
return {1, report_json(), state}
