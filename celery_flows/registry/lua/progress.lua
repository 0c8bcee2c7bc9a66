--[[
  progress: record a milestone reported by a running node.
  KEYS: meta nodes args results ready timed waiting work reopen,
        request (lua/_request.lua: a re-sent call returns the first reply without running again)
  ARGV[1] node id  ARGV[2] attempt  ARGV[3] percent (number or '')  ARGV[4] message
  Returns: 1 recorded | 0 the attempt is not current | -1 no such flow | -4 no such node
]]
local ok = flow_ok()
if ok < 0 then return ok end
local rec = load(ARGV[1])
if not rec then return -4 end
if rec.attempt ~= tonumber(ARGV[2]) then return 0 end
push(rec, 'progress', {pct = tonumber(ARGV[3]), msg = ARGV[4], at = now_ts()}, PROGRESS_MAX)
save(ARGV[1], rec)
flush()
return 1
