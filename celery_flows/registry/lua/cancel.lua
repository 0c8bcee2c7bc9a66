--[[
  cancel: stop the whole flow. Nothing is released after it; every non-terminal node
  becomes cancelled; the flow is cancelled at once.
  KEYS: meta nodes args results ready timed waiting work reopen,
        request (lua/_request.lua: a re-sent call returns the first reply without running again)
  ARGV[1] chunk: a flow of more nodes than this is cancelled in steps (0: never)
  ARGV[2] '1' for a dry run (report only, change nothing)
  Returns: {code, report JSON | reason, flow state, task ids of started nodes JSON,
            '1' when the nodes are left to cancel_step.lua, else ''}
    1 done (or would be) | -5 refused: the flow already finished | -1 no flow | -2 version
  Emits: pending|scheduled|queued|running|retrying|awaiting -> cancelled; flow -> cancelled
  A chunked cancel makes the flow cancelled here, in one small step: claim.lua,
  start.lua, recover.lua and complete.lua then leave its nodes alone, changes are
  refused, and readers (registry/reads.py) show its unfinished nodes as cancelled; the
  meta field cancel_cursor (an HSCAN cursor of the nodes hash) stays until
  cancel_step.lua has written every record.
]]
local ok = flow_ok()
if ok < 0 then return {ok, '', ''} end
if flow_finished() then return finished_refusal() end
local now = now_ts()
local chunk = tonumber(ARGV[1]) or 0
if chunk > 0 and (tonumber(mget('total')) or 0) > chunk then
  if ARGV[2] == '1' then return {1, report_json(), 'cancelled', '[]', '1'} end
  -- every unfinished node counts as done already: it will be cancelled, nothing else
  begin_chunked_cancel('cancelled')
  drop_work()
  finish_flow('cancelled', now)
  flush()
  return {1, report_json(), 'cancelled', '[]', '1'}
end
local started = {}
for _, id in ipairs(redis.call('HKEYS', NODES)) do
  local rec = load(id)
  if rec.state == 'running' or rec.state == 'retrying' or rec.state == 'queued' then
    local ids = list(rec.task_ids)
    if #ids > 0 then started[#started + 1] = ids[#ids] end
  end
end
cancel_all(now, 'cancelled')
drop_work()
finish_flow('cancelled', now)
local report = report_json()
if ARGV[2] == '1' then return {1, report, 'cancelled', cjson.encode(started), ''} end
flush()
return {1, report, 'cancelled', cjson.encode(started), ''}
