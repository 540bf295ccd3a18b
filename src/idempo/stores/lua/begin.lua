--[[ idempo begin: take the lease on a record, or return the live record there.

KEYS[1]  the record's hash, "<prefix>{<record key>}"
ARGV[1]  the request's fingerprint
ARGV[2]  lease TTL, integer milliseconds
ARGV[3]  grace, integer milliseconds: an in-progress hash is kept this long past
         its lease expiry (PEXPIREAT), so a takeover still sees, and reports, the
         crashed holder's record and its token
ARGV[4]  the call's attempt id, random, the same when redis-py sends the script
         again after a dropped connection
Returns  {1, now_ms, token, takeover}  when the lease was taken (takeover 1 when
                                       an expired in-progress record was replaced)
         {0, now_ms, state, fingerprint, token, lease_expires_at, created_at,
          expires_at, status, headers, body}  for the live record, unchanged
          (status, headers and body are nil while in progress)
Clock    the server's (TIME), integer milliseconds since the epoch. A record is
         live while expires_at > now; an expired record counts as absent even
         before Redis deletes it.
Token    max(previous token + 1, now_ms), as idempo._core.records.next_token.
Again    a live in-progress record holding this call's attempt id is the lease
         this very call took before its reply was lost: it is returned as taken
         (with the takeover flag of that first run), never as someone else's.
         Its fingerprint is not compared: it is this call's own, by construction.
Released a released record's tombstone (release.lua) is expired, so it is
         taken like an absent record, its token continuing the sequence.
]]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local r = redis.call('HMGET', KEYS[1], 'state', 'fingerprint', 'token', 'lease_expires_at',
                     'created_at', 'expires_at', 'status', 'headers', 'body', 'attempt', 'takeover')
if r[1] and tonumber(r[6]) > now then
  if r[1] == 'in_progress' and r[10] == ARGV[4] then
    return {1, now, tonumber(r[3]), tonumber(r[11])}
  end
  return {0, now, r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9]}
end
local token = math.max((tonumber(r[3]) or 0) + 1, now)
local lease = now + tonumber(ARGV[2])
-- '%.0f' writes integers in full; Lua's tostring would use an exponent.
local function int(n) return string.format('%.0f', n) end
local takeover = 0
if r[1] == 'in_progress' then takeover = 1 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'state', 'in_progress', 'fingerprint', ARGV[1], 'token', int(token),
           'lease_expires_at', int(lease), 'created_at', int(now), 'expires_at', int(lease),
           'attempt', ARGV[4], 'takeover', takeover)
redis.call('PEXPIREAT', KEYS[1], int(lease + tonumber(ARGV[3])))
return {1, now, token, takeover}
