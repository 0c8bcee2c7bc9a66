--[[
  engine/constants.lua: the names and fixed values every other part of the engine and
  every flow transition uses. The engine is the files of lua/engine/, from which
  scripts.py puts in front of each flow transition the top-level definitions it uses,
  in the order of its ENGINE_PARTS and of each file, without comments
  (scripts.engine_for). Each part may use only what the parts before it define (a Lua
  local exists from its definition on), and each header says what it uses.
  Uses: nothing. Nothing in the engine builds a key: fields only.

  Every flow script receives the same eleven keys (see keys.py):
    KEYS[1] meta   KEYS[2] nodes   KEYS[3] args   KEYS[4] results   KEYS[5] ready
    KEYS[6] timed  KEYS[7] waiting KEYS[8] work   KEYS[9] reopen    KEYS[10] events
    KEYS[11] hooks
  (a twelfth, the request key, is taken off by the wrapper of _request.lua, which
  scripts.py puts around the engine and the transition; STEP comes from there too)
]]
local META, NODES, ARGS, RESULTS, READY, TIMED, WAITING, WORK, REOPEN, EVENTS, HOOKS =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10],
  KEYS[11]

-- Node states after which nothing more happens to a node (short of a retry).
local TERMINAL = {succeeded = true, failed = true, skipped = true, cancelled = true}

-- The outbox score of a node held by a limiter (hold.lua): never due, so no claim takes
-- it by time; a releaser claims it by id (claim.lua ARGV[4..]).
local HELD = 1e15

-- Policy to an edge kind: fail -> failed, ignore -> ok, remove -> removed
local POLICY_EDGE = {fail = 'failed', ignore = 'ok', remove = 'removed'}

-- Seconds an external node waits for its signal when its record names no timeout.
local EXTERNAL_TIMEOUT = 3600

-- The most entries a node keeps in its history and in its progress list (oldest go).
local HISTORY_MAX = 20
local PROGRESS_MAX = 10
