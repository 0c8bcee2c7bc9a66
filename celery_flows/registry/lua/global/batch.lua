--[[
  batch: the record of one add_bulk batch, decided once: committed or aborted, never
  both (see celery_flows/batch.py).
  KEYS[1]  the batch record, hash: state (pending|committed|aborted), created (TIME), flows
  ARGV[1]  'open' | 'commit' | 'abort' | 'expire'
  ARGV[2]  open: JSON list of the batch's flow ids; expire: grace in seconds
  Returns: the state after the call ('' when there is no record). commit and abort
           change only a pending batch; expire aborts a pending batch older than grace.
]]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local op = ARGV[1]
if op == 'open' then
  redis.call('HSET', KEYS[1], 'state', 'pending', 'created', now, 'flows', ARGV[2])
  return 'pending'
end
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return '' end
if state ~= 'pending' then return state end
if op == 'commit' then state = 'committed'
elseif op == 'abort' then state = 'aborted'
elseif op == 'expire' then
  local created = tonumber(redis.call('HGET', KEYS[1], 'created')) or 0
  if now - created > tonumber(ARGV[2]) then state = 'aborted' end
end
redis.call('HSET', KEYS[1], 'state', state)
return state
