--[[ idempo get: return the live record (read only).

KEYS[1]  the record's hash, "<prefix>{<record key>}"
Returns  nil when absent or expired, else
         {now_ms, state, fingerprint, token, lease_expires_at, created_at,
          expires_at, status, headers, body}
Clock    the server's (TIME)
]]
local r = redis.call('HMGET', KEYS[1], 'state', 'fingerprint', 'token', 'lease_expires_at',
                     'created_at', 'expires_at', 'status', 'headers', 'body')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if not r[1] or tonumber(r[6]) <= now then return nil end
return {now, r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9]}
