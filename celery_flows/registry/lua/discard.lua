--[[
  discard: delete a flow created hidden by an add_bulk batch that was aborted.
  KEYS: meta nodes args results ready timed waiting work reopen events hooks
  ARGV[1]  batch id
  Returns: 1 deleted | 0 not a hidden flow of this batch (left alone)
]]
if redis.call('HGET', META, 'hidden') ~= ARGV[1] then return 0 end
-- UNLINK: a large flow's hashes are freed off the main thread
redis.call('UNLINK', META, NODES, ARGS, RESULTS, READY, TIMED, WAITING, WORK, REOPEN,
  EVENTS, HOOKS)
return 1
