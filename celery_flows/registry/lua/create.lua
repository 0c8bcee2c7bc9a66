--[[
  create: store a whole flow atomically and release its roots.
  KEYS: meta nodes args results ready timed waiting (of the new flow), request
        (lua/_request.lua: a re-sent call returns the first reply without running again)
  GKEYS (after the request key, a single Redis only): index, dispatch
  ARGV[1]  meta fields, JSON object of strings; ``total`` (when given) is the whole
           flow's node count, of which this call stores the first piece (create_part.lua
           stores the rest, the flow being hidden meanwhile)
  ARGV[2]  definition digest (idempotent submit)
  ARGV[3]  n, the number of nodes; then n triples: node id, record JSON (compact: fields
           at their default omitted, see lua/engine/cache.lua), args blob ('' = none)
  then     m, then m pairs: args-hash field, blob (contexts: "ctx#", "ctx#<sub-flow id>")
           Blobs are user data (the app's serializer): copied, never decoded here.
  then     (optional, with GKEYS only) d, then d root messages the caller built for
           the broker on this same Redis (engine/publish.lua push_messages), pushed
           only for a root this call released at that attempt, whose node is then
           acknowledged here
  then     with GKEYS: the flow id, the dirty token (scores: TIME)
  GKEYS[3] (with root messages) the queued-message index; GKEYS[4..] the broker's keys
  Returns:  1 created | 2 created, and every root it released was pushed with its
           message and acknowledged (the dirty marker is cleared) | 0 exists with the
           same digest | -3 exists with another definition
  Emits:   nodes without dependencies become scheduled (outbox), awaiting, or skipped;
           a root pushed with its message goes on to queued.
]]
-- the index and the dispatch set, given on a single Redis only (on a cluster they are
-- of other slots and transitions.py writes them beside the script)
local INDEX, DISPATCH = GKEYS[1], GKEYS[2]
local now = now_ts()
if DISPATCH then
  redis.call('ZADD', INDEX, 'NX', now, ARGV[#ARGV - 1])
  redis.call('ZADD', DISPATCH, now, ARGV[#ARGV])
end
if redis.call('EXISTS', META) == 1 then
  if redis.call('HGET', META, 'digest') == ARGV[2] then return 0 end
  return -3
end
local meta = cjson.decode(ARGV[1])
local n = tonumber(ARGV[3])
local total = tonumber(meta.total) or n
for k, v in pairs(meta) do mset(k, v) end
mset('digest', ARGV[2])
mset('created_at', now)
mset('state', 'running')
mset('total', total)
mset('done', 0)
mset('nfail', 0)
mset('seq', total)
store_piece(3, now)
set_flow_state(now)
local at = 5 + 3 * n + 2 * (tonumber(ARGV[4 + 3 * n]) or 0)
if not DISPATCH or at >= #ARGV - 1 then
  flush()
  return 1
end
-- the roots' messages: pushed for what this call released, each acknowledged at once
local released = {}
for _, id in ipairs(REPORT.released) do released[id] = true end
local pushed = push_messages(at, function(id)
  if not released[id] then return false end
  released[id] = nil
  return true
end, now, GKEYS[3])
flush()
if pushed == 0 or next(released) ~= nil then return 1 end
redis.call('ZREM', DISPATCH, ARGV[#ARGV])
return 2
