--[[
  create_part: store one more piece of a large flow that create.lua began hidden (the
  chunked submit of engine/batch.py): each call is bounded, the flow stays hidden (claim
  releases nothing of it, readers do not see it) until its batch is committed.
  Pieces come in reverse topological order, so every dependent of a node is stored
  before the node: a root evaluated here (and any skip it cascades) finds its
  dependents in place.
  KEYS: meta nodes args results ready timed waiting, request (lua/_request.lua)
  ARGV[1]  batch id the flow must still be hidden by
  ARGV[2]  n, then n triples: node id, record JSON, args blob ('' = none)
  then     m, then m pairs: args-hash field, blob
  Returns:  1 stored | -5 the flow is not hidden by this batch (aborted, taken over)
  Emits:   this piece's nodes without dependencies become scheduled, awaiting or skipped
           (nothing is claimed while the flow is hidden).
]]
if redis.call('HGET', META, 'hidden') ~= ARGV[1] then return -5 end
local now = now_ts()
local n = tonumber(ARGV[2])
local roots, recs, blobs = {}, {}, {}
for i = 0, n - 1 do
  local id, raw, blob = ARGV[3 + 3 * i], ARGV[4 + 3 * i], ARGV[5 + 3 * i]
  recs[#recs + 1] = id
  recs[#recs + 1] = raw
  if blob ~= '' then
    blobs[#blobs + 1] = id
    blobs[#blobs + 1] = blob
  end
  local waiting = #list(cjson.decode(raw).after)  -- as in create.lua
  if waiting == 0 then roots[#roots + 1] = id else wset(id, waiting) end
end
local m = tonumber(ARGV[3 + 3 * n]) or 0
for j = 0, m - 1 do
  blobs[#blobs + 1] = ARGV[4 + 3 * n + 2 * j]
  blobs[#blobs + 1] = ARGV[5 + 3 * n + 2 * j]
end
hset_all(NODES, recs)
hset_all(ARGS, blobs)
evaluate_all(roots, now)
set_flow_state(now)
flush()
return 1
