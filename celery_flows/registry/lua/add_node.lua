--[[
  add_node: add a node to a running (or paused) flow.
  KEYS: meta nodes args results ready timed waiting work reopen,
        request (lua/_request.lua: a re-sent call returns the first reply without running again)
  ARGV[1] node id  ARGV[2] record JSON (after filled in; waiting is computed here)
  ARGV[3] args blob ('' = none)  ARGV[4] flows_max_nodes  ARGV[5] '1' for a dry run
  Returns: {code, report JSON | reason, flow state}
    1 done | -5 refused (finished flow, id taken, unknown dependency, the flow holds
    flows_max_nodes nodes already) | -1 no flow
    -2 version
  Emits: the new node -> pending, or straight to scheduled/skipped when its
         dependencies are already terminal.
]]
local ok = flow_ok()
if ok < 0 then return {ok, '', ''} end
local id = ARGV[1]
if flow_finished() then return finished_refusal() end
local refused = busy_refusal()
if refused then return refused end
if load(id) then return {-5, 'node id ' .. id .. ' is already used', mget('state')} end
local max_nodes = tonumber(ARGV[4])
if max_nodes and (tonumber(mget('total')) or 0) >= max_nodes then
  return {-5, 'the flow already holds ' .. mget('total') .. ' nodes, the most ' ..
    'flows_max_nodes=' .. ARGV[4] .. ' allows', mget('state')}
end
local rec = with_defaults(cjson.decode(ARGV[2]))
local waiting = 0
for _, did in ipairs(after_list(rec)) do
  local dep = load(did)
  if not dep then return {-5, 'unknown dependency ' .. did, mget('state')} end
  if not TERMINAL[dep.state] then waiting = waiting + 1 end
end
local now = now_ts()
-- Longest paths (claim.lua's release order) are stored from submit: the new node is a
-- sink, and each dependency's path grows to reach past it. Nodes further upstream keep
-- theirs: an approximation of the order among held nodes, never of what runs.
rec.lp = 1
for _, did in ipairs(after_list(rec)) do
  local dep = load(did)
  deps_add(dep, id)
  if tonumber(val(dep.lp)) and dep.lp < 2 then dep.lp = 2 end
  save(did, dep)
end
rec.waiting = nil
wset(id, waiting)
rec.seq = tonumber(mget('seq')) or 0
mincr('seq', 1)
mincr('total', 1)
save(id, rec)
if ARGV[3] ~= '' then later(function() redis.call('HSET', ARGS, id, ARGV[3]) end) end
if waiting == 0 then evaluate_all({id}, now) end
local state = set_flow_state(now)
if ARGV[5] == '1' then return {1, report_json(), state} end
flush()
return {1, report_json(), state}
