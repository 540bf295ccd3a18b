--[[ idempo release: give up the in-progress record, if the token still holds the lease.

KEYS[1]  the record's hash, "<prefix>{<record key>}"
ARGV[1]  the lease's fencing token, decimal
ARGV[2]  the call's attempt id, random, the same when redis-py sends the script
         again after a dropped connection
ARGV[3]  integer milliseconds the tombstone is kept: longer than redis-py's
         retry of this script, and than the milliseconds a token can run
         ahead of the clock
Returns  1 when released, or when this very call released it before its reply
         was lost; 0 when the record is gone, completed or holds another token.
         A live marker (completed, status 0) under this token is released too:
         how an operator resolves a held key.
Tombstone  the hash is not deleted but reduced to state 'released' with the
         token, expired since the epoch (expires_at 0, whatever the clock
         does): every script reads it as absent, purge and stats skip it, and
         the next begin's token is still greater than this one (deleting it
         would let a begin in the same millisecond reuse the token, and a
         resent release then remove that newer lease).
]]
local r = redis.call('HMGET', KEYS[1], 'state', 'token', 'attempt', 'status', 'expires_at')
if r[2] ~= ARGV[1] then return 0 end
if r[1] == 'released' and r[3] == ARGV[2] then return 1 end
if r[1] ~= 'in_progress' then
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    if not (r[1] == 'completed' and r[4] == '0' and tonumber(r[5]) > now) then return 0 end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'state', 'released', 'token', r[2], 'attempt', ARGV[2],
           'lease_expires_at', '0', 'created_at', '0', 'expires_at', '0')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
