-- Deploys reported by pipelines (`POST /api/v1/targets/{target}/migrations/deploys`):
-- which migrations the deployed repository held (the manifest that
-- `dbops migrations manifest` prints: names and the checksums the tool keeps),
-- whether the deploy succeeded, and a snapshot of the database's relations taken
-- when it was reported. The migrations page compares a database with the newest
-- manifest when no directory is configured; a failed deploy keeps the target red
-- until a later one succeeds, and relations that are not in the snapshot of the
-- last successful deploy are listed as possibly left behind. Append-only.

CREATE TABLE migration_deploys (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    target           text        NOT NULL,
    database         text        NOT NULL,
    tool             text        NOT NULL,
    outcome          text        NOT NULL CHECK (outcome IN ('succeeded', 'failed')),
    reference        text        CHECK (reference IS NULL OR length(reference) <= 500),
    manifest         jsonb       NOT NULL,
    migrations       integer     NOT NULL,
    reported_by      text        NOT NULL,
    operation_id     bigint,
    reported_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- pg_class oids of the database's relations (tables, indexes, sequences,
    -- views, materialized views, foreign tables) outside the system schemas when
    -- the deploy was reported; NULL when the database could not be read.
    relation_oids    bigint[],
    max_relation_oid bigint,
    snapshot_error   text,
    CONSTRAINT snapshot_or_reason CHECK ((relation_oids IS NULL) <> (snapshot_error IS NULL))
);
CREATE INDEX migration_deploys_newest ON migration_deploys (target, database, tool, id DESC);

CREATE FUNCTION migration_deploys_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'migration_deploys is append-only: % refused', TG_OP;
END;
$$;

CREATE TRIGGER migration_deploys_no_change
    BEFORE UPDATE OR DELETE ON migration_deploys
    FOR EACH ROW EXECUTE FUNCTION migration_deploys_append_only();
CREATE TRIGGER migration_deploys_no_truncate
    BEFORE TRUNCATE ON migration_deploys
    FOR EACH STATEMENT EXECUTE FUNCTION migration_deploys_append_only();

-- Tokens may carry the scope of this route.
ALTER TABLE api_tokens DROP CONSTRAINT scopes_known;
ALTER TABLE api_tokens ADD CONSTRAINT scopes_known
    CHECK (scopes <@ ARRAY['backup:create', 'backup:read', 'migrations:deploy']::text[]);
