--[[
  conc_start: a flow waiting for its concurrency group was given its place (the group's
  line, lua/global/conc_admit.lua or conc_enqueue.lua): it stops waiting and releases
  its roots. Idempotent: a flow already started, or of another life, is left alone.
  KEYS: meta nodes args results ready timed waiting work reopen events hooks,
        request (lua/_request.lua: a re-sent call returns the first reply)
  ARGV[1]  the life (meta cgen) the place was given to
  Returns: {code, flow state}
    1 started now | 0 nothing to do (started already, or cgen is another life) |
    2 the flow is finished (cancelled while it waited): its place is to be freed |
    -1 no flow | -2 version
  Emits: flow waiting -> running (or paused); its roots become scheduled (outbox),
         awaiting or skipped.
]]
local ok = flow_ok()
if ok < 0 then return {ok, ''} end
if flow_finished() then return {2, mget('state')} end
if mget('cwait') ~= '1' or mget('cgen') ~= ARGV[1] then return {0, mget('state')} end
local now = now_ts()
mdel('cwait')
local roots = {}
for id in string.gmatch(mget('croots') or '', '[^,]+') do roots[#roots + 1] = id end
mdel('croots')
evaluate_all(roots, now)
local state = set_flow_state(now)
flush()
return {1, state}
