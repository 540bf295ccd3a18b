-- Named query blocks for the PostgreSQL store; each starts with "-- name: <name>".
-- Parameters are psycopg's %(name)s. Tables are unqualified: every connection
-- has search_path set to the store's schema. Times are integer milliseconds
-- from the database's clock, (extract(epoch FROM now()) * 1000)::bigint, so
-- application servers with skewed clocks agree on leases and TTLs. Each
-- transition is one statement, run in autocommit mode: one round trip.

-- name: begin
-- Take the lease (insert a record, or replace an expired one) or return the
-- live record, in one statement. Row: acquired, now_ms, token, takeover, then
-- the existing record's nine columns (NULL when acquired). No row at all means
-- a concurrent transaction committed the record after this statement's
-- snapshot was taken, so neither branch could see it: the caller runs the
-- statement again (it then sees the record).
-- When the snapshot already holds a live record (a replay, a duplicate) the
-- INSERT is skipped: ON CONFLICT DO UPDATE would lock that row even though its
-- WHERE refuses the update, and a row lock makes the statement a write whose
-- commit waits for a WAL flush. Skipped, a replay reads and commits nothing.
WITH clock AS (
    SELECT (extract(epoch FROM now()) * 1000)::bigint AS now_ms
), old AS (
    SELECT state, fingerprint, token, lease_expires_at, created_at, expires_at, status, headers, body
    FROM idempo_records
    WHERE record_key = %(record_key)s
), taken AS (
    INSERT INTO idempo_records AS r
        (record_key, state, fingerprint, token, lease_expires_at, created_at, expires_at)
    SELECT %(record_key)s, 'in_progress', %(fingerprint)s, now_ms,
           now_ms + %(lease_ttl_ms)s::bigint, now_ms, now_ms + %(lease_ttl_ms)s::bigint
    FROM clock
    WHERE NOT EXISTS (SELECT FROM old WHERE old.expires_at > clock.now_ms)
    ON CONFLICT (record_key) DO UPDATE SET
        state = 'in_progress',
        fingerprint = excluded.fingerprint,
        token = greatest(r.token + 1, excluded.created_at),
        lease_expires_at = excluded.lease_expires_at,
        created_at = excluded.created_at,
        expires_at = excluded.expires_at,
        status = NULL,
        headers = NULL,
        body = NULL
    WHERE r.expires_at <= excluded.created_at
    RETURNING r.token
)
SELECT true AS acquired, clock.now_ms, taken.token,
       coalesce((SELECT old.state = 'in_progress' FROM old), false) AS takeover,
       NULL::text, NULL::text, NULL::bigint, NULL::bigint, NULL::bigint, NULL::bigint,
       NULL::integer, NULL::text, NULL::bytea
FROM taken, clock
UNION ALL
SELECT false, clock.now_ms, NULL::bigint, NULL::boolean, old.*
FROM old, clock
WHERE old.expires_at > clock.now_ms AND NOT EXISTS (SELECT FROM taken);

-- name: complete
-- The lease holder's record, or a live marker (status 0: held, not replayable)
-- under the same token: how an operator resolves a held key.
UPDATE idempo_records
SET state = 'completed',
    lease_expires_at = 0,
    expires_at = (extract(epoch FROM now()) * 1000)::bigint + %(record_ttl_ms)s::bigint,
    status = %(status)s::integer,
    headers = %(headers)s,
    body = %(body)s
WHERE record_key = %(record_key)s AND token = %(token)s::bigint
  AND (state = 'in_progress'
       OR (state = 'completed' AND status = 0 AND expires_at > (extract(epoch FROM now()) * 1000)::bigint));

-- name: complete_last
-- complete as the last statement of a transactional execution, sent with COMMIT in one
-- pipeline (one round trip). When the token no longer holds the record the division by
-- zero aborts the transaction, so the COMMIT behind it rolls the handler's writes back.
WITH done AS (
    UPDATE idempo_records
    SET state = 'completed',
        lease_expires_at = 0,
        expires_at = (extract(epoch FROM now()) * 1000)::bigint + %(record_ttl_ms)s::bigint,
        status = %(status)s::integer,
        headers = %(headers)s,
        body = %(body)s
    WHERE record_key = %(record_key)s AND token = %(token)s::bigint AND state = 'in_progress'
    RETURNING 1
)
SELECT 1 / count(*) FROM done;

-- name: release
-- Like complete: the lease holder's record, or a live marker under the same token.
DELETE FROM idempo_records
WHERE record_key = %(record_key)s AND token = %(token)s::bigint
  AND (state = 'in_progress'
       OR (state = 'completed' AND status = 0 AND expires_at > (extract(epoch FROM now()) * 1000)::bigint));

-- name: extend
UPDATE idempo_records
SET lease_expires_at = (extract(epoch FROM now()) * 1000)::bigint + %(lease_ttl_ms)s::bigint,
    expires_at = (extract(epoch FROM now()) * 1000)::bigint + %(lease_ttl_ms)s::bigint
WHERE record_key = %(record_key)s AND token = %(token)s::bigint AND state = 'in_progress';

-- name: get
SELECT state, fingerprint, token, lease_expires_at, created_at, expires_at, status, headers, body
FROM idempo_records
WHERE record_key = %(record_key)s AND expires_at > (extract(epoch FROM now()) * 1000)::bigint;

-- name: purge_expired
-- One bounded batch, oldest first, served by idempo_records_expires_at. Rows a
-- begin is taking over right now are skipped, not waited for. An in-progress
-- record is kept grace_ms past its lease (its holder may still save under its
-- token: idempo.stores._base.IN_PROGRESS_GRACE).
DELETE FROM idempo_records
WHERE record_key IN (
    SELECT record_key
    FROM idempo_records
    WHERE expires_at <= (extract(epoch FROM now()) * 1000)::bigint
      AND (state <> 'in_progress'
           OR expires_at <= (extract(epoch FROM now()) * 1000)::bigint - %(grace_ms)s::bigint)
    ORDER BY expires_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
);

-- name: stats
-- For `idempo stats`: the database's clock, then live in-progress, live
-- completed and expired records (one scan; maintenance, not the request path).
-- 'idempo:...' keys are idempo's own (its generated secret, the legacy window), not requests' records.
SELECT n.now_ms,
       count(r.record_key) FILTER (WHERE r.state = 'in_progress' AND r.expires_at > n.now_ms),
       count(r.record_key) FILTER (WHERE r.state = 'completed' AND r.expires_at > n.now_ms),
       count(r.record_key) FILTER (WHERE r.expires_at <= n.now_ms)
FROM (SELECT (extract(epoch FROM now()) * 1000)::bigint AS now_ms) AS n
LEFT JOIN idempo_records AS r ON r.record_key NOT LIKE 'idempo:%'
GROUP BY n.now_ms;

-- name: oldest_lease
-- The live in-progress record whose lease was taken first.
SELECT record_key, state, fingerprint, token, lease_expires_at, created_at, expires_at, status, headers, body
FROM idempo_records
WHERE state = 'in_progress' AND expires_at > (extract(epoch FROM now()) * 1000)::bigint
  AND record_key NOT LIKE 'idempo:%'
ORDER BY created_at
LIMIT 1;

-- name: schema_version
SELECT max(version) FROM idempo_schema_version;

-- name: migration_lock
-- Serialises concurrent `idempo migrate` runs on one schema, until commit.
SELECT pg_advisory_xact_lock(hashtext('idempo migrate ' || %(schema)s));

-- name: version_table_exists
SELECT to_regclass('idempo_schema_version') IS NOT NULL;

-- name: record_version
INSERT INTO idempo_schema_version (version) VALUES (%(version)s);
