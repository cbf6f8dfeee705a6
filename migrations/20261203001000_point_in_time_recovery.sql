-- Point-in-time recovery (src/pitr): continuous WAL archiving per PostgreSQL target.
--
-- `wal_streams`: one row per archived target and server (system identifier): who
-- streams it (the lease: exactly one dbops replica at a time), how the stream is
-- doing, and how far WAL is stored (the real recovery point).
CREATE TABLE wal_streams (
    target text PRIMARY KEY,
    slot text NOT NULL,
    holder text,
    lease_until timestamptz,
    state text NOT NULL DEFAULT 'stopped'
        CHECK (state IN ('starting', 'streaming', 'retrying', 'stopped', 'failed')),
    message text,
    system_identifier text,
    timeline integer,
    wal_segment_size bigint,
    -- WAL up to this position is stored whole (completed segments, or the
    -- snapshot of the segment being written), and every change the server had
    -- written by `stored_through_at` is at or below it.
    stored_lsn bigint,
    stored_through_at timestamptz,
    -- The snapshot of the segment being written (`<name>.partial` in storage).
    partial_name text,
    partial_key text,
    partial_sha256 text,
    partial_bytes bigint,
    restarts integer NOT NULL DEFAULT 0,
    started_at timestamptz,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Every stored WAL file: completed segments and timeline history files. A row is
-- written only after its file is stored whole (committed, checksum known).
CREATE TABLE wal_segments (
    id bigserial PRIMARY KEY,
    target text NOT NULL,
    system_identifier text NOT NULL,
    timeline integer NOT NULL,
    file_name text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('segment', 'history')),
    -- For segments: the WAL positions [start_lsn, end_lsn) it holds.
    start_lsn bigint,
    end_lsn bigint,
    size_bytes bigint NOT NULL,
    sha256 text NOT NULL,
    storage text NOT NULL,
    storage_key text NOT NULL,
    archived_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (target, system_identifier, file_name)
);
CREATE INDEX wal_segments_position ON wal_segments (target, system_identifier, start_lsn);

-- Named recovery targets dbops created with pg_create_restore_point(), e.g. just
-- before an approved destructive action (`operation_id`).
CREATE TABLE restore_points (
    id bigserial PRIMARY KEY,
    target text NOT NULL,
    name text NOT NULL,
    lsn bigint NOT NULL,
    timeline integer,
    system_identifier text,
    operation_id bigint,
    action text,
    created_by text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX restore_points_target ON restore_points (target, created_at DESC);
CREATE INDEX restore_points_operation ON restore_points (operation_id) WHERE operation_id IS NOT NULL;
