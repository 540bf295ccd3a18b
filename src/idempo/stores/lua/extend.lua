--[[ idempo extend: move the lease expiry to now + lease TTL, if the token holds the lease.

KEYS[1]  the record's hash, "<prefix>{<record key>}"
ARGV[1]  the lease's fencing token, decimal
ARGV[2]  lease TTL, integer milliseconds
ARGV[3]  grace, integer milliseconds the hash is kept past the lease expiry (see begin.lua)
Returns  1 when extended; 0 when the record is gone, completed or holds another token
Clock    the server's (TIME)
]]
local r = redis.call('HMGET', KEYS[1], 'state', 'token')
if r[1] ~= 'in_progress' or r[2] ~= ARGV[1] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = now + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'lease_expires_at', string.format('%.0f', lease),
           'expires_at', string.format('%.0f', lease))
redis.call('PEXPIREAT', KEYS[1], string.format('%.0f', lease + tonumber(ARGV[3])))
return 1
