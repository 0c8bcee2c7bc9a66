--[[
  unhide: make a flow of a committed add_bulk batch visible (readers already treat it
  as visible once its batch is committed; claim.lua releases nothing while hidden).
  KEYS: meta nodes args results ready timed waiting
  ARGV[1]  batch id
  then     (optional, on a single Redis) d, then d messages of the flow's roots for the
           broker on this same Redis (engine/publish.lua push_messages), pushed for
           roots in the outbox at that attempt and acknowledged here; then the flow id
           and a dirty token
  GKEYS (with root messages): [1] the flow index, which the flow joins; [2] the
         dispatch index, which the token joins unless every root in the outbox was
         pushed; [3] the queued-message index; [4..] the broker's keys
  Returns: 1 un-hidden now (with root messages: not all of them pushed, the token
           added: the caller releases the rest) | 2 un-hidden now, and every root in
           its outbox pushed with its message and acknowledged | 0 not hidden | -5
           hidden by another batch | -1 no such flow
]]
if redis.call('EXISTS', META) == 0 then return -1 end
local batch = redis.call('HGET', META, 'hidden')
if not batch then return 0 end
if batch ~= ARGV[1] then return -5 end
redis.call('HDEL', META, 'hidden')
if not ARGV[2] then return 1 end
local now = now_ts()
redis.call('ZADD', GKEYS[1], 'NX', now, ARGV[#ARGV - 1])
-- nothing claims a hidden flow: what its outbox holds is due, each root at most once
local due = redis.call('ZCARD', READY)
local pushed = push_messages(2, function(id) return redis.call('ZSCORE', READY, id) end,
                             now, GKEYS[3])
flush()
if pushed == due then return 2 end
redis.call('ZADD', GKEYS[2], now, ARGV[#ARGV])
return 1
