--[[
  claim: take outbox entries for publishing.
  KEYS: meta nodes args results ready timed waiting work reopen,
        request (lua/_request.lua: it keeps the
        ids of the entries claimed; a re-sent call claims them again by id, as ARGV[4..])
  ARGV[1]  claim lease, seconds: an unacknowledged claim may be taken again after it
  ARGV[2]  maximum number of entries
  ARGV[3]  '1': report each entry's longest path to a sink (needed to order held nodes);
           'eager': the eager driver's claim (eager.py), the only one an eager flow takes
  ARGV[4..] explicit node ids (a releaser taking held nodes): claimed whatever their
            outbox score, if still in the outbox; otherwise only due entries are claimed
  Returns: {code, left, nonce, flow rate limit, next due, webhook pending, more, entry...}
    code   0 ok | 1 flow paused, cancelled, stopped by fail_fast, hidden (add_bulk), or
           an eager flow and not its driver: nothing claimed | 3 waiting for its
           concurrency group: nothing claimed | -1 no such flow | -2 version
    left   outbox entries claimed by another process and not yet published (counted
           before this claim; held entries are not counted)
    nonce  the flow's nonce (part of every task id)
    next due   the earliest future time something in the outbox becomes due (an
           external node's deadline, a held retry or sensor poke; '' if none): the caller
           sets a timer for it
    webhook pending  '1' when a finished flow's webhook is not delivered yet
    more   '1' when bounded steps of a large transition are left (a chunked retry or
           fail_fast cancel, dependents still to settle): the caller claims again, and
           keeps its dirty marker until it is ''
    entry  {node id, record JSON, args blob|nil, dependency edge kinds JSON, {result|nil...},
            longest path in nodes to a sink (0 when not asked)}
  Emits: claimed entries get score now + lease; entries no longer ready leave the outbox;
         an external node past its deadline fails (TimeoutError), cascading.
]]
local ok = flow_ok()
if ok < 0 then return {ok, 0, '', '', '', '', ''} end
return claim_entries(tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], {unpack(ARGV, 4)})
