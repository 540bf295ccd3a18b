--[[ idempo purge: delete the record if it has expired.

Redis deletes completed records itself at their expiry (PEXPIREAT), and
in-progress ones a grace period after their lease; this removes an expired
one sooner, for `purge_expired`.

KEYS[1]  the record's hash, "<prefix>{<record key>}"
ARGV[1]  grace, integer milliseconds: an in-progress record is kept this long
         past its lease expiry, as its PEXPIREAT keeps it (begin.lua)
Returns  1 when deleted; 0 when absent, still live, an in-progress record
         within its grace, or a released record's tombstone (release.lua: no
         record, and it expires by itself)
Clock    the server's (TIME)
]]
local r = redis.call('HMGET', KEYS[1], 'state', 'expires_at')
if not r[1] or r[1] == 'released' then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local deletable_at = tonumber(r[2])
if r[1] == 'in_progress' then deletable_at = deletable_at + tonumber(ARGV[1]) end
if deletable_at > now then return 0 end
redis.call('DEL', KEYS[1])
return 1
