--[[
  published: acknowledge that claimed nodes were sent to the broker.
  KEYS: meta nodes args results ready
  ARGV: triples of node id, attempt, queue name
  Returns: the number of nodes moved from scheduled to queued.
  Emits:   each node leaves the outbox; scheduled|retrying -> queued (a node whose worker already
           started it stays running).
]]
local now = now_ts()
local moved = 0
for i = 1, #ARGV, 3 do
  local id, attempt, queue = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  local rec = load(id)
  if rec and rec.attempt == attempt then
    if rec.state == 'scheduled' or rec.state == 'retrying' then
      rec.state = 'queued'
      moved = moved + 1
    end
    rec.held = cjson.null
    if val(rec.queued_at) == nil then rec.queued_at = now end
    rec.queue = queue
    save(id, rec)
    if rec.state ~= 'scheduled' and rec.state ~= 'retrying' then ready_rem(id) end
  end
end
flush()
return moved
