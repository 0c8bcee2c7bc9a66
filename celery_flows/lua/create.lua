--[[
  create: store a whole flow atomically and put its roots in the outbox.
  KEYS: meta nodes args results ready (of the new flow)
  ARGV[1]  meta fields, JSON object of strings
  ARGV[2]  definition digest (idempotent submit)
  ARGV[3]  n, the number of nodes; then n triples: node id, record JSON, args blob ('' = none)
  Returns:  1 created | 0 exists with the same digest | -3 exists with another definition
  Emits:   nodes without dependencies become scheduled (in the outbox) or awaiting.
]]
if redis.call('EXISTS', META) == 1 then
  if redis.call('HGET', META, 'digest') == ARGV[2] then return 0 end
  return -3
end
local now = now_ts()
local fields = cjson.decode(ARGV[1])
for k, v in pairs(fields) do redis.call('HSET', META, k, v) end
local n = tonumber(ARGV[3])
redis.call('HSET', META, 'digest', ARGV[2], 'created_at', now, 'state', 'running',
  'total', n, 'done', 0, 'nfail', 0)
local roots = {}
for i = 0, n - 1 do
  local id, raw, blob = ARGV[4 + 3 * i], ARGV[5 + 3 * i], ARGV[6 + 3 * i]
  redis.call('HSET', NODES, id, raw)
  if blob ~= '' then redis.call('HSET', ARGS, id, blob) end
  roots[#roots + 1] = id
end
for _, id in ipairs(roots) do
  local rec = load(id)
  if rec.waiting == 0 then
    if rec.kind == 'external' then
      rec.state = 'awaiting'
      rec.attempt = 1
      rec.ready_at = now
      save(id, rec)
    else
      make_ready(id, rec, now)
    end
  end
end
return 1
