--[[
  published: acknowledge that claimed nodes were sent to the broker.
  KEYS: meta nodes args results ready timed waiting work reopen,
        request (lua/_request.lua: a re-sent call returns the first reply without running again)
  ARGV[1] k, then k dirty markers to clear (GKEYS[2]), then groups of six: node id,
        attempt, queue name, release time ('' = now; a limited node's release is the
        moment its limiters admitted it), task id, the node's retry count the message
        was sent with (an acknowledgement may come late, acks.py: a node that recorded a
        retry since is not moved back to queued)
  GKEYS (after the request key, only on a single Redis; on a cluster the caller sends
         these writes itself): [1] the queued-message index, which the task ids of nodes
         now queued join (a node its worker already started does not); [2] the dispatch
         index, which the markers leave
  Returns: the number of nodes moved from scheduled to queued.
  Emits:   each node leaves the outbox; scheduled|retrying -> queued (a node whose worker already
           started it stays running).
]]
local now = now_ts()
local moved = 0
local k = tonumber(ARGV[1])
for i = 2 + k, #ARGV, 6 do
  if mark_queued(ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2], ARGV[i + 3], ARGV[i + 4],
                 tonumber(ARGV[i + 5]), now, GKEYS[1]) then
    moved = moved + 1
  end
end
flush()
if GKEYS[2] then
  for i = 2, 1 + k do redis.call('ZREM', GKEYS[2], ARGV[i]) end
end
return moved
