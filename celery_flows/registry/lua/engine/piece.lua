--[[
  engine/piece.lua: store_piece, writing nodes of a flow being created (create.lua, and
  create_part.lua for the further pieces of a large one) and releasing its roots.
  Uses: ids (ids_count), cache (wset, hset_all, mget, mset), settle (evaluate_all).

  store_piece(at, now): ARGV[at] is n, then n triples: node id, record JSON (compact:
  fields at their default left out, see cache.lua), args blob ('' = none); then m, then
  m pairs: args-hash field, blob. Records and blobs are stored as given (user data is
  never decoded); evaluate_all loads the roots back whole.
]]
local function store_piece(at, now)
  local n = tonumber(ARGV[at])
  local roots, recs, blobs = {}, {}, {}
  for i = 0, n - 1 do
    local id, raw, blob = ARGV[at + 1 + 3 * i], ARGV[at + 2 + 3 * i], ARGV[at + 3 + 3 * i]
    recs[#recs + 1] = id
    recs[#recs + 1] = raw
    if blob ~= '' then
      blobs[#blobs + 1] = id
      blobs[#blobs + 1] = blob
    end
    -- nothing is removed yet: a node waits for each of its dependencies, counted in
    -- the waiting hash (keys.py), not in its record
    local waiting = ids_count(cjson.decode(raw).after)
    if waiting == 0 then roots[#roots + 1] = id else wset(id, waiting) end
  end
  local m = tonumber(ARGV[at + 1 + 3 * n]) or 0
  for j = 0, m - 1 do
    blobs[#blobs + 1] = ARGV[at + 2 + 3 * n + 2 * j]
    blobs[#blobs + 1] = ARGV[at + 3 + 3 * n + 2 * j]
  end
  hset_all(NODES, recs)
  hset_all(ARGS, blobs)
  if mget('cwait') == '1' then
    -- waiting for its concurrency group: the roots stay pending until conc_start.lua
    local kept = mget('croots')
    if kept and kept ~= '' and #roots > 0 then kept = kept .. ',' .. table.concat(roots, ',')
    elseif #roots > 0 then kept = table.concat(roots, ',') end
    if kept then mset('croots', kept) end
  else
    evaluate_all(roots, now)
  end
end
