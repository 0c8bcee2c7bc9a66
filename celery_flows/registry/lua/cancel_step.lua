--[[
  cancel_step: one bounded step of a chunked cancel (cancel.lua made the flow cancelled
  and left cancel_cursor in its meta): up to about `chunk` node records move to
  cancelled. Called again until it answers no cursor, by the canceller and, if that
  process died, by the sweeper of a --flows worker (the cancelling index, keys.py).
  KEYS: meta nodes args results ready timed waiting, request (lua/_request.lua)
  ARGV[1] chunk (HSCAN COUNT)  ARGV[2] a dry run's cursor ('0' to begin)
  ARGV[3] '1' for a dry run: reads from ARGV[2] instead of the meta, writes nothing
  Returns: {code, report JSON, flow state, task ids of started nodes JSON, next cursor
            ('' when no node is left)}
    1 a step done (or none left) | -1 no flow | -2 version
]]
local ok = flow_ok()
if ok < 0 then return {ok, '', '', '[]', ''} end
local dry = ARGV[3] == '1'
local cursor = mget('cancel_cursor')
if dry then cursor = ARGV[2] end
if not cursor then return {1, report_json(), mget('state'), '[]', ''} end
local now = now_ts()
local scan = redis.call('HSCAN', NODES, cursor, 'COUNT', tonumber(ARGV[1]))
local started = {}
local kv = scan[2]
for i = 1, #kv, 2 do
  local id = kv[i]
  -- an HSCAN may return an element twice: the cache holds its first decode
  local rec = load(id)
  if not TERMINAL[rec.state] then
    if rec.state == 'running' or rec.state == 'retrying' or rec.state == 'queued' then
      local ids = list(rec.task_ids)
      if #ids > 0 then started[#started + 1] = ids[#ids] end
    end
    -- done already counts it (cancel.lua)
    cancel_one(id, rec, now, 'cancelled')
  end
end
local next_cursor = scan[1]
if dry then
  if next_cursor == '0' then next_cursor = '' end
  return {1, report_json(), 'cancelled', cjson.encode(started), next_cursor}
end
if next_cursor == '0' then
  next_cursor = ''
  MCACHE['cancel_cursor'] = false
  MDIRTY['cancel_cursor'] = true
else
  mset('cancel_cursor', next_cursor)
end
flush()
return {1, report_json(), 'cancelled', cjson.encode(started), next_cursor}
