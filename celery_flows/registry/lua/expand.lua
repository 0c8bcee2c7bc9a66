--[[
  expand: a map that went to the outbox unexpanded (it became ready without its
  expansion at hand: a retry, an ignore_failure, a completion whose settling went on in
  a later step) is expanded by the dispatcher that claimed it, which split its input
  (engine/dispatch.py). As complete.lua does when it has the expansion: the k items
  join the flow, or the map fails with the error.
  KEYS: meta nodes args results ready timed waiting work reopen events hooks,
        request (lua/_request.lua)
  ARGV[1] map id  ARGV[2] attempt  ARGV[3] JSON [k, token] (the items' elements staged
          in the args hash under '@<token>:<i>') or an error text
  Returns: {code, flow state}
    1 expanded (or failed) | 0 not this attempt, or no longer waiting to expand: nothing
    changed | -1 no such flow | -2 version | -4 no such node
  Emits: the map -> running (its items pending, the first ones scheduled) or failed.
]]
local ok = flow_ok()
if ok < 0 then return {ok, ''} end
local id, attempt = ARGV[1], tonumber(ARGV[2])
local rec = load(id)
if not rec then return {-4, ''} end
if rec.kind ~= 'map' or val(rec.k) or rec.state ~= 'scheduled' or rec.attempt ~= attempt
    or stopping() then
  return {0, mget('state')}
end
local now = now_ts()
local x = ARGV[3]
if string.sub(x, 1, 1) == '[' then x = cjson.decode(x) end
if expand_map(id, rec, now, x) then settle(id, now) end
local state = set_flow_state(now)
flush()
return {1, state}
