--[[
  engine/ids.lua: small helpers on values as cjson gives them (val, list) and on the ids
  a record holds: joined by ',' (define/records.py compact), a list (earlier formats),
  or an expanded map's items as a range, '#<k>#<map id>' (evaluate.lua expand_map).
  Uses: nothing (no key, no Redis call).
]]
local function val(x)
  if x == cjson.null then return nil end
  return x
end

local function list(v)
  if v == nil or v == cjson.null then return {} end
  return v
end

-- An expanded map's items as its record stores them, '#<k>#<map id>' (k and the map's
-- id; evaluate.lua expand_map): no list of ids to build or read. nil for other ids.
local function ids_range(d)
  if type(d) == 'string' and string.byte(d, 1) == 35 then
    local k, base = string.match(d, '^#(%d+)#(.*)$')
    return tonumber(k), base
  end
  return nil
end

-- Ids stored as one string joined by ',' (define/records.py compact: a node's
-- dependents and dependencies; a record of an earlier version holds a list) as a list.
local function ids_list(d)
  local k, base = ids_range(d)
  if k then
    local out = {}
    for i = 0, k - 1 do out[i + 1] = base .. '[' .. i .. ']' end
    return out
  end
  if type(d) ~= 'string' then return list(d) end
  local out = {}
  for id in string.gmatch(d, '[^,]+') do out[#out + 1] = id end
  return out
end

local function deps_list(rec) return ids_list(rec.deps_of) end
local function after_list(rec) return ids_list(rec.after) end

-- How many ids, without making the list.
local function ids_count(d)
  local k = ids_range(d)
  if k then return k end
  if type(d) ~= 'string' then return #list(d) end
  if d == '' then return 0 end
  local _, commas = string.gsub(d, ',', ',')
  return commas + 1
end

-- The id at position k of ids stored either way (k: a byte offset into a joined
-- string, else an index) and the position after it; nil past the end. Walking by
-- offset reads a long joined string without splitting it.
local function id_at(d, k)
  local n, base = ids_range(d)
  if n then
    -- a map's items: k is an index
    if k > n then return nil, k end
    return base .. '[' .. (k - 1) .. ']', k + 1
  end
  if type(d) == 'string' then
    if k > #d then return nil, k end
    local stop = string.find(d, ',', k, true) or (#d + 1)
    return string.sub(d, k, stop - 1), stop + 1
  end
  local t = list(d)
  return t[k], k + 1
end

-- Add a dependent, in the form the record holds them.
local function deps_add(rec, id)
  local d = rec.deps_of
  if type(d) == 'string' and d ~= '' then rec.deps_of = d .. ',' .. id
  elseif type(d) == 'string' then rec.deps_of = id
  else
    d = list(d)
    d[#d + 1] = id
    rec.deps_of = d
  end
end

local function contains(t, x)
  for _, v in ipairs(list(t)) do if v == x then return true end end
  return false
end

-- Append x to the list in rec[field] (made when absent); keep its last `max` entries
-- when max is given.
local function push(rec, field, x, max)
  local t = list(rec[field])
  t[#t + 1] = x
  if max then
    while #t > max do table.remove(t, 1) end
  end
  rec[field] = t
end
