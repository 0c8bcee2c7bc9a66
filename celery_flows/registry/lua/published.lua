--[[
  published: acknowledge that claimed nodes were sent to the broker.
  KEYS: meta nodes args results ready timed waiting work reopen,
        request (lua/_request.lua: a re-sent call returns the first reply without running again)
  ARGV[1] k, then k dirty markers to clear (GKEYS[2]), then groups of six: node id,
        attempt, queue name, release time ('' = now; a limited node's release is the
        moment its limiters admitted it), task id, the node's retry count the message
        was sent with (an acknowledgement may come late, acks.py: a node that recorded a
        retry since is not moved back to queued)
  GKEYS (after the request key, only on a single Redis; on a cluster the caller sends
         these writes itself): [1] the queued-message index, which the task ids of nodes
         now queued join (a node its worker already started does not); [2] the dispatch
         index, which the markers leave
  Returns: the number of nodes moved from scheduled to queued.
  Emits:   each node leaves the outbox; scheduled|retrying -> queued (a node whose worker already
           started it stays running).
]]
local now = now_ts()
local moved = 0
local k = tonumber(ARGV[1])
for i = 2 + k, #ARGV, 6 do
  local id, attempt, queue = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  local released = tonumber(ARGV[i + 3]) or now
  local rec = load(id)
  if rec and rec.attempt == attempt then
    -- putback: start.lua refused this message while paused; the node waits for resume
    if (rec.state == 'scheduled' or rec.state == 'retrying') and not rec.putback
        and (tonumber(val(rec.retries)) or 0) == tonumber(ARGV[i + 5]) then
      rec.state = 'queued'
      moved = moved + 1
    end
    rec.held = cjson.null
    if val(rec.queued_at) == nil or ARGV[i + 3] ~= '' then rec.queued_at = released end
    if val(rec.released_at) == nil and ARGV[i + 3] ~= '' then
      -- cjson keeps 14 significant digits (0.1 ms); a limited node's exact release time
      rec.released_at = ARGV[i + 3]
    end
    rec.queue = queue
    if not contains(rec.task_ids, ARGV[i + 4]) then push(rec, 'task_ids', ARGV[i + 4]) end
    save(id, rec)
    if rec.state ~= 'scheduled' and rec.state ~= 'retrying' then ready_rem(id) end
    if GKEYS[1] and rec.state == 'queued' then
      redis.call('ZADD', GKEYS[1], now, ARGV[i + 4])
    end
  end
end
flush()
if GKEYS[2] then
  for i = 2, 1 + k do redis.call('ZREM', GKEYS[2], ARGV[i]) end
end
return moved
