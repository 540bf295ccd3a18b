--[[ idempo purge: delete the record if it has expired.

Redis deletes completed records itself at their expiry (PEXPIREAT), and
in-progress ones a grace period after their lease; this removes an expired
one sooner, for `purge_expired`.

KEYS[1]  the record's hash, "<prefix>{<record key>}"
Returns  1 when deleted; 0 when absent, still live, or a released record's
         tombstone (release.lua: no record, and it expires by itself)
Clock    the server's (TIME)
]]
local r = redis.call('HMGET', KEYS[1], 'state', 'expires_at')
if not r[1] or r[1] == 'released' then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if tonumber(r[2]) > now then return 0 end
redis.call('DEL', KEYS[1])
return 1
