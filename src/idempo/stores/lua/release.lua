--[[ idempo release: remove the in-progress record, if the token still holds the lease.

KEYS[1]  the record's hash, "<prefix>{<record key>}"
ARGV[1]  the lease's fencing token, decimal
Returns  1 when removed; 0 when the record is gone, completed or holds another token
]]
local r = redis.call('HMGET', KEYS[1], 'state', 'token')
if r[1] ~= 'in_progress' or r[2] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
