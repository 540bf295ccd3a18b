-- idempo's PostgreSQL schema, current version, applied to an empty schema by
-- `idempo migrate` (or PostgresStore.create_schema()), which then records the
-- version in idempo_schema_version. It must equal migrations/*.sql applied in
-- order; tests/migration/test_postgres_migrations.py checks that.
--
-- Times are integer milliseconds since the epoch from the database's clock.
-- A record is live while expires_at > now: the lease expiry while in progress,
-- completion + record TTL once completed. Expired rows behave as absent until
-- purge_expired deletes them.

CREATE TABLE idempo_records (
    record_key       text    NOT NULL PRIMARY KEY,
    state            text    NOT NULL CHECK (state IN ('in_progress', 'completed')),
    fingerprint      text    NOT NULL,
    token            bigint  NOT NULL,   -- fencing token: max(previous + 1, now ms)
    lease_expires_at bigint  NOT NULL,   -- 0 once completed
    created_at       bigint  NOT NULL,
    expires_at       bigint  NOT NULL,
    status           integer,            -- the stored response, once completed
    headers          text,               -- JSON [[name, value], ...], latin-1
    body             bytea
);

-- Serves purge_expired.
CREATE INDEX idempo_records_expires_at ON idempo_records (expires_at);

-- One row per applied version; the store refuses to start below its version.
CREATE TABLE idempo_schema_version (
    version    integer     NOT NULL PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);
