--[[
  The request wrapper. scripts.py builds every script, flow and global alike, as

    local REPLY_TTL, STEP, WIDE, REPLAY_ENTRIES, REPLAY_CLAIMED = <scripts.REPLY_TTL>,
      <scripts.CHUNK>, <scripts.WIDE>, <true for claim only>, <true for complete only>
    <the part of this file above the @transition line>
    <for flow scripts, the parts of lua/engine/ they use, in the order of ENGINE_PARTS>
    local function transition() <the script> end
    <the part of this file below the @transition line>

  so that a call redis-py sends again after a connection error (it retries a command,
  and a whole pipeline, with the same arguments) gets the first call's answer instead
  of running the transition a second time: a retry would count twice, a pause would
  report "already paused", a start would look like a duplicate delivery.

  KEYS[#KEYS] is the request key, <prefix>:{<tag>}:req:<request id> (keys.py), under
  the hash tag of the script's other keys so that Redis Cluster keeps one slot. The
  request id is drawn once per logical call in Python, before redis-py's retry loop.
  The transition sees KEYS without it (#KEYS loops included), and GKEYS holds the keys
  passed after it (see below). An empty request id (the
  key ends in ':req:') keeps nothing: dry runs write nothing at all.

  The reply is kept for REPLY_TTL seconds, packed with cmsgpack (which keeps binary
  strings, numbers and false exactly: Redis converts the unpacked value to the same
  reply as the original one). Nothing is kept when the transition raises an error.

  complete (REPLAY_CLAIMED) keeps its own reply and, of the claim it made in the same
  step, the ids of the entries, as claim does:

  claim (REPLAY_ENTRIES): its reply carries node records, arguments and dependency
  results, too big to keep for every call. It keeps the ids of the entries it claimed
  instead, and a replay claims those again by id (ARGV[4..]): the lost reply's entries,
  under a fresh claim lease, less any that stopped being ready meanwhile. A claim that
  got no entries is simply run again.
]]
-- the request key is the last of the script's own keys; the keys after it (GKEYS) are
-- global keys a flow script also writes on a single Redis (never on a cluster, where
-- they live in other slots and the caller sends those writes as separate commands)
local NREQ = #KEYS
while NREQ > 0 and not string.find(KEYS[NREQ], '}:req:', 1, true) do NREQ = NREQ - 1 end
local REQUEST = KEYS[NREQ]
local GKEYS = {unpack(KEYS, NREQ + 1, #KEYS)}
-- the registry's event stream (<prefix>:events, keys.py), passed last of all on a single
-- Redis so that the engine's flush() appends to it (lua/engine/cache.lua); taken off
-- GKEYS so that each script's own GKEYS keep their places
local EVENTS_ALL = GKEYS[#GKEYS]
if EVENTS_ALL and string.sub(EVENTS_ALL, -7) == ':events'
    and not string.find(EVENTS_ALL, '{', 1, true) then
  GKEYS[#GKEYS] = nil
else
  EVENTS_ALL = nil
end
local KEYS = {unpack(KEYS, 1, NREQ - 1)}
local ARGV = ARGV
if type(REQUEST) ~= 'string' or not string.find(REQUEST, ':req:', 1, true) then
  return redis.error_reply('celery-flows: a transition was called without its request ' ..
    'key (the last KEYS entry); call scripts through celery_flows.store only')
end
if string.sub(REQUEST, -5) == ':req:' then REQUEST = nil end
-- @transition
local hit = REQUEST and redis.call('GET', REQUEST)
if REPLAY_CLAIMED then
  -- complete: its sixth field is the claim of what it released (engine/claim.lua), kept
  -- as the ids of the entries claimed and claimed again by id on a replay
  if hit then
    local kept = cmsgpack.unpack(hit)
    if type(kept[6]) == 'table' then
      kept[6] = claim_entries(tonumber(ARGV[9]), tonumber(ARGV[10]), ARGV[11], kept[6])
    end
    return kept
  end
  local reply = transition()
  if REQUEST and type(reply) == 'table' then
    local kept = {unpack(reply, 1, 5)}
    kept[6] = reply[6]
    kept[7] = reply[7] -- a map's lengths (complete.lua code 7)
    if type(reply[6]) == 'table' then
      kept[6] = {}
      for i = 8, #reply[6] do kept[6][#kept[6] + 1] = reply[6][i][1] end
    end
    redis.call('SET', REQUEST, cmsgpack.pack(kept), 'EX', REPLY_TTL)
  end
  return reply
end
if not REPLAY_ENTRIES then
  if hit then return cmsgpack.unpack(hit) end
  local reply = transition()
  if REQUEST then redis.call('SET', REQUEST, cmsgpack.pack(reply), 'EX', REPLY_TTL) end
  return reply
end
if hit then
  local ids = cmsgpack.unpack(hit)
  if #ids > 0 then
    local argv = {ARGV[1], ARGV[2], ARGV[3]}
    for i = 1, #ids do argv[3 + i] = ids[i] end
    ARGV = argv
  end
end
local reply = transition()
if REQUEST and type(reply) == 'table' then
  local ids = {}
  for i = 1, #reply do
    if type(reply[i]) == 'table' then ids[#ids + 1] = reply[i][1] end
  end
  redis.call('SET', REQUEST, cmsgpack.pack(ids), 'EX', REPLY_TTL)
end
return reply
