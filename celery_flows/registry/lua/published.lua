--[[
  published: acknowledge that claimed nodes were sent to the broker.
  KEYS: meta nodes args results ready timed waiting, request (lua/_request.lua: a re-sent call
        returns the first reply without running again)
  ARGV: groups of five: node id, attempt, queue name, release time ('' = now; a
        limited node's release is the moment its limiters admitted it), task id
  Returns: the number of nodes moved from scheduled to queued.
  Emits:   each node leaves the outbox; scheduled|retrying -> queued (a node whose worker already
           started it stays running).
]]
local now = now_ts()
local moved = 0
for i = 1, #ARGV, 5 do
  local id, attempt, queue = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  local released = tonumber(ARGV[i + 3]) or now
  local rec = load(id)
  if rec and rec.attempt == attempt then
    -- putback: start.lua refused this message while paused; the node waits for resume
    if (rec.state == 'scheduled' or rec.state == 'retrying') and not rec.putback then
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
  end
end
flush()
return moved
