--[[ idempo complete: store the response, if the token still holds the lease.

KEYS[1]  the record's hash, "<prefix>{<record key>}"
ARGV[1]  the lease's fencing token, decimal
ARGV[2]  record TTL, integer milliseconds
ARGV[3]  the response status
ARGV[4]  the response headers, JSON (idempo._core.records.encode_headers)
ARGV[5]  the response body, bytes
ARGV[6]  the call's attempt id, random, the same when redis-py sends the script
         again after a dropped connection
Returns  1 when stored, or when this very call stored it before its reply was
         lost (the record is completed with this token and this attempt id);
         0 when the record is gone, completed or holds another token (the
         caller raises LeaseLost). A live marker (completed, status 0: held or
         not replayable) under this token is replaced: how an operator
         resolves a held key.
Clock    the server's (TIME). The hash expires (PEXPIREAT) when the record does.
]]
local r = redis.call('HMGET', KEYS[1], 'state', 'token', 'attempt', 'status', 'expires_at')
if r[2] ~= ARGV[1] then return 0 end
if r[1] == 'completed' and r[3] == ARGV[6] then return 1 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if r[1] ~= 'in_progress' and not (r[1] == 'completed' and r[4] == '0' and tonumber(r[5]) > now) then
    return 0
end
local expires = string.format('%.0f', now + tonumber(ARGV[2]))
redis.call('HSET', KEYS[1], 'state', 'completed', 'lease_expires_at', '0', 'expires_at', expires,
           'status', ARGV[3], 'headers', ARGV[4], 'body', ARGV[5], 'attempt', ARGV[6])
redis.call('PEXPIREAT', KEYS[1], expires)
return 1
