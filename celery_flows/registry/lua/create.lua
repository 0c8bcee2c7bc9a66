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
  then     with GKEYS: the flow id, the dirty token (scores: TIME)
  Returns:  1 created | 0 exists with the same digest | -3 exists with another definition
  Emits:   nodes without dependencies become scheduled (outbox), awaiting, or skipped.
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
local roots, recs, blobs = {}, {}, {}
for i = 0, n - 1 do
  local id, raw, blob = ARGV[4 + 3 * i], ARGV[5 + 3 * i], ARGV[6 + 3 * i]
  -- stored as given; evaluate_all loads the roots back whole (cache.lua load)
  recs[#recs + 1] = id
  recs[#recs + 1] = raw
  if blob ~= '' then
    blobs[#blobs + 1] = id
    blobs[#blobs + 1] = blob
  end
  -- nothing is removed yet: a node waits for each of its dependencies, counted in the
  -- waiting hash (keys.py), not in its record
  local waiting = #list(cjson.decode(raw).after)
  if waiting == 0 then roots[#roots + 1] = id else wset(id, waiting) end
end
local m = tonumber(ARGV[4 + 3 * n]) or 0
for j = 0, m - 1 do
  blobs[#blobs + 1] = ARGV[5 + 3 * n + 2 * j]
  blobs[#blobs + 1] = ARGV[6 + 3 * n + 2 * j]
end
hset_all(NODES, recs)
hset_all(ARGS, blobs)
evaluate_all(roots, now)
set_flow_state(now)
flush()
return 1
