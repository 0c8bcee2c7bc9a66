--[[
  pause / resume: a paused flow releases nothing (ready nodes wait as scheduled);
  running nodes finish and are recorded. Resume lets the outbox go again.
  KEYS: meta nodes args results ready timed waiting work reopen,
        request (lua/_request.lua: a re-sent call returns the first reply without running again)
  ARGV[1] 'pause' | 'resume'   ARGV[2] '1' for a dry run
  Returns: {code, report JSON | reason, flow state}
    1 done | -5 refused (finished, already paused, not paused) | -1 no flow | -2 version
  Emits: flow running <-> paused; on resume the outbox entries are reported released.
]]
local ok = flow_ok()
if ok < 0 then return {ok, '', ''} end
if flow_finished() then return finished_refusal() end
local now = now_ts()
if ARGV[1] == 'pause' then
  if mget('paused') == '1' then return {-5, 'the flow is already paused', mget('state')} end
  mset('paused', '1')
else
  if mget('paused') ~= '1' then return {-5, 'the flow is not paused', mget('state')} end
  mset('paused', '0')
  for _, id in ipairs(redis.call('ZRANGE', READY, 0, -1)) do
    REPORT.released[#REPORT.released + 1] = id
    -- held nodes lost their place in the limiters' queues while paused: re-admit them
    local rec = load(id)
    if rec and val(rec.held) then
      rec.held = cjson.null
      save(id, rec)
      ready_add(id, 0)
    end
  end
end
local state = set_flow_state(now)
if ARGV[2] == '1' then return {1, report_json(), state} end
flush()
return {1, report_json(), state}
