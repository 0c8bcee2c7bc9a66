--[[
  claim: take up to ARGV[2] outbox entries for publishing.
  KEYS: meta nodes args results ready
  ARGV[1]  claim lease, seconds: an unacknowledged claim may be taken again after it
  ARGV[2]  maximum number of entries
  Returns: {code, left, nonce, entry...}
    code 0 ok | 1 flow paused or cancelled, nothing claimed | -1 no such flow | -2 version
    left   outbox entries claimed by another process and not yet published (counted
           before this claim)
    nonce  the flow's nonce (part of every task id)
    entry  {node id, record JSON, args blob|nil, dependency edge kinds JSON, {result|nil...}}
]]
local ok = flow_ok()
if ok < 0 then return {ok, 0, ''} end
local st = redis.call('HGET', META, 'state')
if st == 'cancelled' or redis.call('HGET', META, 'paused') == '1' then return {1, 0, ''} end
local now = now_ts()
local left = redis.call('ZCOUNT', READY, '(' .. now, '+inf')
local ids = redis.call('ZRANGEBYSCORE', READY, '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local out = {0, left, redis.call('HGET', META, 'nonce')}
for _, id in ipairs(ids) do
  local rec = load(id)
  if not rec or rec.state ~= 'scheduled' then
    redis.call('ZREM', READY, id)
  else
    redis.call('ZADD', READY, now + tonumber(ARGV[1]), id)
    local kinds, results = {}, {}
    for i, did in ipairs(list(rec.after)) do
      local kind = 'removed'
      if not contains(rec.removed, did) then kind = edge_kind(load(did)) end
      kinds[i] = kind
      results[i] = false
      if kind == 'ok' then results[i] = redis.call('HGET', RESULTS, did) end
    end
    out[#out + 1] = {id, cjson.encode(rec), redis.call('HGET', ARGS, id),
                     cjson.encode(kinds), results}
  end
end
return out
