--[[
  remove_dependency: drop the edge dep -> node of a node not yet released.
  KEYS: meta nodes args results ready timed waiting work reopen,
        request (lua/_request.lua: a re-sent call returns the first reply without running again)
  ARGV[1] node id  ARGV[2] dependency id  ARGV[3] '1' for a dry run
  Returns: {code, report JSON | reason, flow state}
    1 done | -5 refused (finished flow, no such node or edge, node already released)
    -1 no flow | -2 version
  Emits: the node may become ready (scheduled/awaiting) or skipped, cascading.
]]
local ok = flow_ok()
if ok < 0 then return {ok, '', ''} end
local id, dep_id = ARGV[1], ARGV[2]
if flow_finished() then return finished_refusal() end
local refused = busy_refusal()
if refused then return refused end
local rec = load(id)
if not rec then return {-5, 'no node ' .. id, mget('state')} end
if not load(dep_id) then return {-5, 'no node ' .. dep_id, mget('state')} end
if not contains(after_list(rec), dep_id) or contains(rec.removed, dep_id) then
  return {-5, 'node ' .. id .. ' does not depend on ' .. dep_id, mget('state')}
end
if rec.state ~= 'pending' then
  return {-5, 'node ' .. id .. ' is ' .. rec.state ..
    '; a dependency can only be removed before the node is released', mget('state')}
end
local now = now_ts()
push(rec, 'removed', dep_id)
-- a scan of this node under way starts again (engine/scan.lua)
mincr('kgen', 1)
local left = waiting_of(id, rec)
if not TERMINAL[load(dep_id).state] then left = left - 1 end
if wget(id) == nil then
  rec.waiting = left -- format 1.1
else
  wset(id, left)
  -- dep_id's completion (or its next one, after a retry) must not count for this node
  -- again (engine/settle.lua)
  wset(id .. '#' .. dep_id, 1)
  mset('rm_edges', '1')
end
save(id, rec)
if left <= 0 then evaluate_all({id}, now) end
local state = set_flow_state(now)
if ARGV[3] == '1' then return {1, report_json(), state} end
flush()
return {1, report_json(), state}
