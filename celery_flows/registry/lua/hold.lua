--[[
  hold: a ready node may not go yet (rate limit or queue cap): it stays scheduled, out of
  the claimable outbox (score HELD, engine/constants.lua), until a --flows worker's
  releaser admits it.
  KEYS: meta nodes args results ready timed waiting work reopen,
        request (lua/_request.lua: a re-sent call returns the first reply without running again)
  ARGV[1] node id  ARGV[2] attempt  ARGV[3] wait-queue member  ARGV[4] limiter id
  ARGV[5] seconds until the limiter may admit (-1: when a slot frees; 0: after others)
  Returns: 1 held | 0 the node moved on (not this attempt, or not scheduled/retrying)
]]
local rec = load(ARGV[1])
if not rec or rec.attempt ~= tonumber(ARGV[2])
    or (rec.state ~= 'scheduled' and rec.state ~= 'retrying') then
  return 0
end
local now = now_ts()
local wait = tonumber(ARGV[5])
rec.held = {by = ARGV[4], member = ARGV[3], since = now,
            ['until'] = (wait and wait > 0) and (now + wait) or cjson.null}
save(ARGV[1], rec)
ready_add(ARGV[1], HELD)
flush()
return 1
