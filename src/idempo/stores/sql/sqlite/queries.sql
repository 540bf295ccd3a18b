-- Named query blocks for the SQLite store; each starts with "-- name: <name>".
-- Parameters are named (:record_key ...); times are milliseconds from the store's clock.

-- name: select_record
SELECT state, fingerprint, token, lease_expires_at, created_at, expires_at, status, headers, body
FROM idempo_records
WHERE record_key = :record_key;

-- name: insert_lease
-- A record for a key that was absent, in its own (implicit) transaction: it
-- inserts, or does nothing when another connection inserted the key since.
INSERT INTO idempo_records
    (record_key, state, fingerprint, token, lease_expires_at, created_at, expires_at, status, headers, body)
VALUES
    (:record_key, 'in_progress', :fingerprint, :token, :lease_expires_at, :now, :lease_expires_at, NULL, NULL, NULL)
ON CONFLICT (record_key) DO NOTHING;

-- name: take_lease
-- Runs inside BEGIN IMMEDIATE after select_record found no live record, so it
-- either inserts a fresh record or replaces an expired one.
INSERT INTO idempo_records
    (record_key, state, fingerprint, token, lease_expires_at, created_at, expires_at, status, headers, body)
VALUES
    (:record_key, 'in_progress', :fingerprint, :token, :lease_expires_at, :now, :lease_expires_at, NULL, NULL, NULL)
ON CONFLICT (record_key) DO UPDATE SET
    state = 'in_progress',
    fingerprint = excluded.fingerprint,
    token = excluded.token,
    lease_expires_at = excluded.lease_expires_at,
    created_at = excluded.created_at,
    expires_at = excluded.expires_at,
    status = NULL,
    headers = NULL,
    body = NULL;

-- name: complete
-- The lease holder's record, or a live marker (status 0: held, not replayable)
-- under the same token: how an operator resolves a held key.
UPDATE idempo_records
SET state = 'completed', lease_expires_at = 0, expires_at = :now + :record_ttl_ms,
    status = :status, headers = :headers, body = :body
WHERE record_key = :record_key AND token = :token
  AND (state = 'in_progress' OR (state = 'completed' AND status = 0 AND expires_at > :now));

-- name: release
DELETE FROM idempo_records
WHERE record_key = :record_key AND token = :token
  AND (state = 'in_progress' OR (state = 'completed' AND status = 0 AND expires_at > :now));

-- name: extend
UPDATE idempo_records
SET lease_expires_at = :now + :lease_ttl_ms, expires_at = :now + :lease_ttl_ms
WHERE record_key = :record_key AND token = :token AND state = 'in_progress';

-- name: purge_expired
-- An in-progress record is kept :grace_ms past its lease (its holder may still
-- save under its token: idempo.stores._base.IN_PROGRESS_GRACE).
DELETE FROM idempo_records
WHERE rowid IN (
    SELECT rowid FROM idempo_records
    WHERE expires_at <= :now AND (state <> 'in_progress' OR expires_at <= :now - :grace_ms)
    LIMIT :limit
);

-- name: stats
-- For `idempo stats`: live in-progress, live completed and expired records (one scan).
-- 'idempo:...' keys are idempo's own (its generated secret, the legacy window), not requests' records.
SELECT
    coalesce(sum(state = 'in_progress' AND expires_at > :now), 0),
    coalesce(sum(state = 'completed' AND expires_at > :now), 0),
    coalesce(sum(expires_at <= :now), 0)
FROM idempo_records
WHERE record_key NOT LIKE 'idempo:%';

-- name: oldest_lease
-- The live in-progress record whose lease was taken first.
SELECT record_key, state, fingerprint, token, lease_expires_at, created_at, expires_at, status, headers, body
FROM idempo_records
WHERE state = 'in_progress' AND expires_at > :now AND record_key NOT LIKE 'idempo:%'
ORDER BY created_at
LIMIT 1;
