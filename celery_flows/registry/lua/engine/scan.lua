--[[
  engine/scan.lua: the evaluation of a wide node (more than WIDE dependencies, see
  evaluate.lua) in bounded steps. Reading every dependency's record in the completion
  that made the node's waiting counter reach 0 blocked Redis for as long as the fan-in
  was wide (0.35 s at 20,000); instead each claim reads the next dependencies within the
  script's BUDGET, counts their edge kinds and stores one letter per edge (KIND_LETTER)
  in '<id>|k', which the node's claim reads in place of the dependencies' records. After
  the last one the node is released or skipped as evaluate would have.
  A step that meets a dependency that is not terminal leaves the scan waiting there
  (a retry reopened the dependency, or reopened the node itself without counting what
  it waits for, reopen.lua): the next completion of one of its dependencies goes on
  from there (evaluate.lua begin_scan), so a scan reads each record once. A scan of a
  node no longer pending (cancelled) ends; one whose generation is not the meta's kgen
  (an edge changed kind: retry, ignore_failure, remove_dependency) starts again from
  the first dependency.
  Uses: constants (TERMINAL, REOPEN), ids (list, id_at), cache (load, mget, mset,
  mdel, wraw, wset, wdel, BUDGET), evaluate (edge_kind, decide, KIND_LETTER), settle
  (settle_all).
]]

-- Dependency records one unit of the BUDGET pays for: a full BUDGET reads 100. Read
-- warm, a record costs some 14 us (250 took 3.5 ms); the first step over records
-- written long before can take two to three times that (250 took 10-17 ms, measured
-- with benchmarks/chunk_slowlog.py 10000 map-collect), hence 100.
local SCAN_PER_UNIT = 2

local function end_scan(id)
  wdel(id .. '|scan')
end

-- One step of node id's scan. Returns 'more' while dependencies are left to read,
-- 'skipped' when the node was skipped, else 'done' (released, waiting, or ended).
local function scan_step(id, now)
  local st = wraw(id .. '|scan')
  local rec = load(id)
  if not st or not rec or rec.state ~= 'pending' or string.sub(st, -1) == 'w' then
    if st and string.sub(st, -1) ~= 'w' then end_scan(id) end
    return 'done'
  end
  local pos, gen, n, ok, failed = string.match(st, '^(%d+) (%S+) (%d+) (%d+) (%d+)')
  pos, n, ok, failed = tonumber(pos), tonumber(n), tonumber(ok), tonumber(failed)
  local letters = wraw(id .. '|k') or ''
  if gen ~= (mget('kgen') or '0') then
    pos, gen, n, ok, failed, letters = 1, mget('kgen') or '0', 0, 0, 0, ''
  end
  -- pos: a byte offset into the joined ids (an index into a list, cache.lua id_at)
  local room, got, waits = BUDGET.left * SCAN_PER_UNIT, {}, false
  local removed = {}
  for _, did in ipairs(list(rec.removed)) do removed[did] = true end
  -- a chunked retry's nodes not reopened yet still read terminal (reopen.lua); the
  -- claims reopen them all before any scan step (chores), so this is a guard
  local staged = mget('reopen_set') == '1'
  while #got < room do
    local did, nxt = id_at(rec.after, pos)
    if did == nil then break end
    local kind = 'removed'
    if not removed[did] then
      local dep = load(did)
      if not TERMINAL[dep.state]
          or (staged and redis.call('SISMEMBER', REOPEN, did) == 1) then
        waits = true
        break
      end
      kind = edge_kind(dep)
    end
    pos = nxt
    if kind ~= 'removed' then
      n = n + 1
      if kind == 'ok' then ok = ok + 1 elseif kind == 'failed' then failed = failed + 1 end
    end
    got[#got + 1] = KIND_LETTER[kind]
  end
  BUDGET.left = BUDGET.left - math.ceil(math.max(#got, 1) / SCAN_PER_UNIT)
  wset(id .. '|k', letters .. table.concat(got))
  if waits or id_at(rec.after, pos) ~= nil then
    wset(id .. '|scan', pos .. ' ' .. gen .. ' ' .. n .. ' ' .. ok .. ' ' .. failed ..
      (waits and ' w' or ''))
    return waits and 'done' or 'more'
  end
  end_scan(id)
  return decide(id, rec, now, n, ok, failed) and 'skipped' or 'done'
end

-- The next claim's share of the scans under way (meta scanning=1), within the BUDGET;
-- what a scan skipped is settled (its dependents may be evaluated in turn). Returns
-- true while scans are left.
local function scan_more(now)
  if mget('scanning') ~= '1' then return false end
  local left, skipped = {}, {}
  -- a scan begun while these steps settle (a skip cascading) is taken in the next step
  local ids = wraw('|scans') or ''
  wset('|scans', '')
  for id in string.gmatch(ids, '[^,]+') do
    local outcome = 'more'
    if BUDGET.left > 0 then outcome = scan_step(id, now) end
    if outcome == 'more' then left[#left + 1] = id end
    if outcome == 'skipped' then skipped[#skipped + 1] = id end
  end
  settle_all(skipped, now)
  local added = wraw('|scans') or ''
  if added ~= '' then left[#left + 1] = added end
  if #left == 0 then
    wdel('|scans')
    mdel('scanning')
    return false
  end
  wset('|scans', table.concat(left, ','))
  return true
end
