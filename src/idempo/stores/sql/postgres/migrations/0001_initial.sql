-- idempo PostgreSQL migration 0001: the records table and the schema version table.
-- Applied by `idempo migrate` (or PostgresStore.create_schema()) inside one
-- transaction, with search_path set to the target schema.

CREATE TABLE idempo_records (
    record_key       text    NOT NULL PRIMARY KEY,
    state            text    NOT NULL CHECK (state IN ('in_progress', 'completed')),
    fingerprint      text    NOT NULL,
    token            bigint  NOT NULL,
    lease_expires_at bigint  NOT NULL,
    created_at       bigint  NOT NULL,
    expires_at       bigint  NOT NULL,
    status           integer,
    headers          text,
    body             bytea
);

CREATE INDEX idempo_records_expires_at ON idempo_records (expires_at);

CREATE TABLE idempo_schema_version (
    version    integer     NOT NULL PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);
