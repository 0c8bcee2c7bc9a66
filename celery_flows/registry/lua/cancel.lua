--[[
  cancel: stop the whole flow. Nothing is released after it; every non-terminal node
  becomes cancelled; the flow is cancelled at once.
  KEYS: meta nodes args results ready timed waiting, request (lua/_request.lua: a re-sent call
        returns the first reply without running again)
  ARGV[1] '1' for a dry run (report only, change nothing)
  Returns: {code, report JSON | reason, flow state, task ids of started nodes JSON}
    1 done (or would be) | -5 refused: the flow already finished | -1 no flow | -2 version
  Emits: pending|scheduled|queued|running|retrying|awaiting -> cancelled; flow -> cancelled
]]
local ok = flow_ok()
if ok < 0 then return {ok, '', ''} end
if flow_finished() then return finished_refusal() end
local now = now_ts()
local started = {}
for _, id in ipairs(redis.call('HKEYS', NODES)) do
  local rec = load(id)
  if rec.state == 'running' or rec.state == 'retrying' or rec.state == 'queued' then
    local ids = list(rec.task_ids)
    if #ids > 0 then started[#started + 1] = ids[#ids] end
  end
end
cancel_all(now, 'cancelled')
finish_flow('cancelled', now)
local report = report_json()
if ARGV[1] == '1' then return {1, report, 'cancelled', cjson.encode(started)} end
flush()
return {1, report, 'cancelled', cjson.encode(started)}
