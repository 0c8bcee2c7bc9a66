--[[
  handoff: a node's body called self.replace(): its worker gives up the lease; the
  worker that starts the replacement takes it (start.lua).
  KEYS: meta nodes args results ready timed waiting work reopen,
        request (lua/_request.lua: a re-sent call returns the first reply without running again)
  ARGV[1] node id  ARGV[2] attempt  ARGV[3] the instance giving the lease up
  Returns: 1 released | 0 not held by that instance (already taken over, or finished)
]]
local rec = load(ARGV[1])
if not rec or rec.attempt ~= tonumber(ARGV[2]) or val(rec.lease) ~= ARGV[3] then return 0 end
rec.lease = cjson.null
save(ARGV[1], rec)
flush()
return 1
