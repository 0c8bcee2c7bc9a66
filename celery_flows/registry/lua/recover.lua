--[[
  recover: an attempt's worker was lost; run the node again as a new attempt, or fail
  it with WorkerLostError once its recoveries are used up.
  KEYS: meta nodes args results ready timed waiting work reopen,
        request (lua/_request.lua: a re-sent call returns the first reply without running again)
  ARGV[1] node id  ARGV[2] attempt  ARGV[3] default max recoveries  ARGV[4] error text
  ARGV[5] the lost worker instance: a node another instance started is not its to recover
  Returns: {code, released, flow state}
    2 re-released as a new attempt | 1 failed (recoveries exhausted)
    0 not current (stale, finished, or not yet started) | -1 no flow | -2 version | -4 no node
]]
local ok = flow_ok()
if ok < 0 then return {ok, 0, ''} end
local id, attempt = ARGV[1], tonumber(ARGV[2])
local rec = load(id)
if not rec then return {-4, 0, ''} end
local st = mget('state')
if stopping() or rec.attempt ~= attempt or TERMINAL[rec.state]
    or rec.state == 'pending' or rec.state == 'awaiting' or rec.state == 'scheduled' then
  return {0, 0, st}
end
if ARGV[5] ~= '' and val(rec.lease) and rec.lease ~= ARGV[5] then return {0, 0, st} end
local now = now_ts()
rec.recoveries = (rec.recoveries or 0) + 1
history(rec, {attempt = attempt, outcome = 'lost', at = now, error = ARGV[4]})
local max_rec = val(rec.max_rec) or tonumber(ARGV[3])
if rec.recoveries > max_rec then
  rec.state = 'failed'
  rec.finished_at = now
  rec.error = 'WorkerLostError: ' .. ARGV[4] .. ' (recovered ' .. (rec.recoveries - 1) ..
    ' times, max_recoveries=' .. max_rec .. ')'
  save(id, rec)
  settle(id, now)
  local state = set_flow_state(now)
  flush()
  return {1, #REPORT.released, state}
end
make_ready(id, rec, now)
flush()
return {2, 1, st}
