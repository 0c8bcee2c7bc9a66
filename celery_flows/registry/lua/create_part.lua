--[[
  create_part: store one more piece of a large flow that create.lua began hidden (the
  chunked submit of engine/batch.py): each call is bounded, the flow stays hidden (claim
  releases nothing of it, readers do not see it) until its batch is committed.
  Pieces come in reverse topological order, so every dependent of a node is stored
  before the node: a root evaluated here (and any skip it cascades) finds its
  dependents in place.
  KEYS: meta nodes args results ready timed waiting work reopen, request (lua/_request.lua)
  ARGV[1]  batch id the flow must still be hidden by
  ARGV[2]  n, then n triples: node id, record JSON, args blob ('' = none)
  then     m, then m pairs: args-hash field, blob
  Returns:  1 stored | -5 the flow is not hidden by this batch (aborted, taken over)
  Emits:   this piece's nodes without dependencies become scheduled, awaiting or skipped
           (nothing is claimed while the flow is hidden).
]]
if redis.call('HGET', META, 'hidden') ~= ARGV[1] then return -5 end
local now = now_ts()
store_piece(2, now)
set_flow_state(now)
flush()
return 1
