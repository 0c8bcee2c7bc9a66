--[[
  requeue: the message of a queued node never reached a worker (a broker lost it, e.g.
  a worker killed between BRPOP and noting it unacked): put the node back in the outbox,
  same attempt, so it is published again. A late copy of the old message is then a
  duplicate of the same attempt, and the attempt guard runs the body once.
  KEYS: meta nodes args results ready timed waiting work reopen,
        request (lua/_request.lua: a re-sent call returns the first reply without running again)
  ARGV[1] node id  ARGV[2] attempt
  Returns: 1 requeued | 0 the node moved on (started, finished, another attempt)
]]
local rec = load(ARGV[1])
if not rec or rec.attempt ~= tonumber(ARGV[2]) or rec.state ~= 'queued' or val(rec.lease)
    or stopping() then
  return 0
end
local now = now_ts()
rec.state = 'scheduled'
history(rec, {attempt = rec.attempt, outcome = 'requeued', at = now})
save(ARGV[1], rec)
ready_add(ARGV[1], 0)
flush()
return 1
