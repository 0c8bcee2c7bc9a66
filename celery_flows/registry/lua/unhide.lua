--[[
  unhide: make a flow of a committed add_bulk batch visible (readers already treat it
  as visible once its batch is committed; claim.lua releases nothing while hidden).
  KEYS: meta nodes args results ready timed waiting
  ARGV[1]  batch id
  Returns: 1 un-hidden now | 0 not hidden | -5 hidden by another batch | -1 no such flow
]]
if redis.call('EXISTS', META) == 0 then return -1 end
local batch = redis.call('HGET', META, 'hidden')
if not batch then return 0 end
if batch ~= ARGV[1] then return -5 end
redis.call('HDEL', META, 'hidden')
return 1
