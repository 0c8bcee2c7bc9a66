--[[
  ignore_failure: a node that failed under "fail" now counts as "ignore"; the nodes
  skipped as upstream_failed because of it are evaluated again. May reopen a failed flow.
  KEYS: meta nodes args results ready timed waiting work reopen,
        request (lua/_request.lua: a re-sent call returns the first reply without running again)
  ARGV[1] node id  ARGV[2] '1' for a dry run
  Returns: {code, report JSON | reason, flow state}
    1 done | -5 refused (cancelled flow, node not failed under "fail") (or no such node)
    -1 no flow | -2 version
  Emits: reopened dependents -> scheduled or skipped again; flow state refreshed.
]]
local ok = flow_ok()
if ok < 0 then return {ok, '', ''} end
local id = ARGV[1]
local st = mget('state')
if st == 'cancelled' then return {-5, 'the flow was cancelled', st} end
local refused = busy_refusal()
if refused then return refused end
local rec = load(id)
if not rec then return {-5, 'no node ' .. id, st} end
if not (rec.state == 'failed' and rec.counted_fail) then
  return {-5, 'node ' .. id .. ' is ' .. rec.state .. ', not failed under "fail"', st}
end
local now = now_ts()
rec.ignored = true
rec.counted_fail = false
mincr('nfail', -1)
save(id, rec)
evaluate_all(reopen(upstream_failed_closure({id}), now), now)
local state = set_flow_state(now)
if ARGV[2] == '1' then return {1, report_json(), state} end
flush()
return {1, report_json(), state}
