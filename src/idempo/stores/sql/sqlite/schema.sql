-- idempo's SQLite schema, version 1. Times are integer milliseconds since the epoch.
-- A record is live while expires_at > now: the lease expiry while in progress,
-- completion + record TTL once completed. Expired rows behave as absent.
CREATE TABLE IF NOT EXISTS idempo_records (
    record_key       TEXT    NOT NULL PRIMARY KEY,
    state            TEXT    NOT NULL CHECK (state IN ('in_progress', 'completed')),
    fingerprint      TEXT    NOT NULL,
    token            INTEGER NOT NULL,
    lease_expires_at INTEGER NOT NULL,
    created_at       INTEGER NOT NULL,
    expires_at       INTEGER NOT NULL,
    status           INTEGER,
    headers          TEXT,
    body             BLOB
);
-- Serves purge_expired.
CREATE INDEX IF NOT EXISTS idempo_records_expires_at ON idempo_records (expires_at);
