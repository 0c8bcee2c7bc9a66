--[[
  create: store a whole flow atomically and release its roots.
  KEYS: meta nodes args results ready timed waiting (of the new flow), request (lua/_request.lua:
        a re-sent call returns the first reply without running again)
  ARGV[1]  meta fields, JSON object of strings
  ARGV[2]  definition digest (idempotent submit)
  ARGV[3]  n, the number of nodes; then n triples: node id, record JSON, args blob ('' = none)
  then     m, then m pairs: args-hash field, blob (contexts: "ctx#", "ctx#<sub-flow id>")
           Blobs are user data (the app's serializer): copied, never decoded here.
  Returns:  1 created | 0 exists with the same digest | -3 exists with another definition
  Emits:   nodes without dependencies become scheduled (outbox), awaiting, or skipped.
]]
if redis.call('EXISTS', META) == 1 then
  if redis.call('HGET', META, 'digest') == ARGV[2] then return 0 end
  return -3
end
local now = now_ts()
for k, v in pairs(cjson.decode(ARGV[1])) do mset(k, v) end
local n = tonumber(ARGV[3])
mset('digest', ARGV[2])
mset('created_at', now)
mset('state', 'running')
mset('total', n)
mset('done', 0)
mset('nfail', 0)
mset('seq', n)
local roots = {}
for i = 0, n - 1 do
  local id, raw, blob = ARGV[4 + 3 * i], ARGV[5 + 3 * i], ARGV[6 + 3 * i]
  local rec = cjson.decode(raw)
  local waiting = rec.waiting
  rec.waiting = nil -- counted in the waiting hash (keys.py)
  save(id, rec)
  if blob ~= '' then redis.call('HSET', ARGS, id, blob) end
  if waiting == 0 then roots[#roots + 1] = id else wset(id, waiting) end
end
local m = tonumber(ARGV[4 + 3 * n]) or 0
for j = 0, m - 1 do
  redis.call('HSET', ARGS, ARGV[5 + 3 * n + 2 * j], ARGV[6 + 3 * n + 2 * j])
end
evaluate_all(roots, now)
set_flow_state(now)
flush()
return 1
