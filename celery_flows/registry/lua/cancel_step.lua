--[[
  cancel_step: one bounded step of a chunked cancel (cancel.lua made the flow cancelled
  and left cancel_cursor in its meta): up to about `chunk` node records move to
  cancelled. Called again until it answers no cursor, by the canceller and, if that
  process died, by the sweeper of a --flows worker (the cancelling index, keys.py).
  fail_fast's chunked cancel goes the same way, a step per claim (engine/claim.lua).
  KEYS: meta nodes args results ready timed waiting work reopen, request (lua/_request.lua)
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
local started, next_cursor = cancel_chunk(cursor, tonumber(ARGV[1]), now_ts(), dry)
if not dry then flush() end
return {1, report_json(), mget('state'), cjson.encode(started), next_cursor}
