--[[ idempo purge: delete the record if it has expired.

Redis deletes completed records itself at their expiry (PEXPIREAT), and
in-progress ones a grace period after their lease; this removes an expired
one sooner, for `purge_expired`.

KEYS[1]  the record's hash, "<prefix>{<record key>}"
Returns  1 when deleted; 0 when absent or still live
Clock    the server's (TIME)
]]
local e = redis.call('HGET', KEYS[1], 'expires_at')
if not e then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if tonumber(e) > now then return 0 end
redis.call('DEL', KEYS[1])
return 1
