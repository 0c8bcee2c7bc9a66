--[[
  engine/publish.lua: mark_queued, a node's message is with the broker (published.lua's
  acknowledgement, and create.lua for the roots it pushes itself).
  push_messages: root messages a producer built for the broker on this same Redis
  (engine/direct.py), pushed and acknowledged by the script that makes their nodes
  releasable (create.lua, unhide.lua).
  Uses: ids (val, contains, push), cache (load, save, ready_rem).

  mark_queued(id, attempt, queue, released, task_id, retries, now, index): the node of
  that attempt leaves the outbox; scheduled|retrying -> queued (a node whose worker
  already started it stays running). released: its release time ('' = now; a limited
  node's release is the moment its limiters admitted it); retries: the node's retry
  count the message was sent with (an acknowledgement may come late: a node that
  recorded a retry since is not moved back to queued); index: the queued-message
  index its task id joins while queued (nil: the caller writes it, on a cluster).
  Returns true when the node moved to queued.
]]
local function mark_queued(id, attempt, queue, released, task_id, retries, now, index)
  local rec = load(id)
  if not rec or rec.attempt ~= attempt then return false end
  local moved = false
  -- putback: start.lua refused this message while paused; the node waits for resume
  if (rec.state == 'scheduled' or rec.state == 'retrying') and not rec.putback
      and (tonumber(val(rec.retries)) or 0) == retries then
    rec.state = 'queued'
    moved = true
  end
  rec.held = cjson.null
  if val(rec.queued_at) == nil or released ~= '' then rec.queued_at = tonumber(released) or now end
  if val(rec.released_at) == nil and released ~= '' then
    -- cjson keeps 14 significant digits (0.1 ms); a limited node's exact release time
    rec.released_at = released
  end
  rec.queue = queue
  if not contains(rec.task_ids, task_id) then push(rec, 'task_ids', task_id) end
  save(id, rec)
  if rec.state ~= 'scheduled' and rec.state ~= 'retrying' then ready_rem(id) end
  if index and rec.state == 'queued' then redis.call('ZADD', index, now, task_id) end
  return moved
end

--[[
  push_messages(at, ok, now, index): ARGV[at] is d, then d root messages: node id,
  attempt, queue name, task id, c, then c triples: command (lpush | pexpire | publish),
  index of its key in GKEYS (publish: the channel), value. A message goes to the broker
  when its node is scheduled at that attempt and ok(id) agrees; its node is then
  acknowledged (mark_queued; index: the queued-message index). Returns how many went.
]]
local function push_messages(at, ok, now, index)
  local pushed, j = 0, at + 1
  for _ = 1, tonumber(ARGV[at]) do
    local id, attempt, c = ARGV[j], tonumber(ARGV[j + 1]), tonumber(ARGV[j + 4])
    local rec = load(id)
    if rec and rec.state == 'scheduled' and rec.attempt == attempt and ok(id) then
      for q = j + 5, j + 2 + 3 * c, 3 do
        if ARGV[q] == 'publish' then
          redis.call('PUBLISH', ARGV[q + 1], ARGV[q + 2])
        else
          redis.call(ARGV[q] == 'pexpire' and 'PEXPIRE' or 'LPUSH',
                     GKEYS[tonumber(ARGV[q + 1])], ARGV[q + 2])
        end
      end
      mark_queued(id, attempt, ARGV[j + 2], '', ARGV[j + 3], 0, now, index)
      pushed = pushed + 1
    end
    j = j + 5 + 3 * c
  end
  return pushed
end
