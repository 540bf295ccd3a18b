"""idempo's PostgreSQL schema, migrations and named queries."""
