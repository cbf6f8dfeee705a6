-- Point-in-time recovery, second half (src/pitr/base_backups.rs, src/pitr/recover.rs).
--
-- `base_backups`: one `pg_basebackup -Ft -X none` of an archived target, stored
-- as one tar through SHA-256. `good` only when stored whole, its start/end WAL
-- positions are known and its files were checked against the backup manifest.
CREATE TABLE base_backups (
    id bigserial PRIMARY KEY,
    target text NOT NULL,
    job_id bigint,
    operation_id bigint,
    status text NOT NULL DEFAULT 'queued'
        CHECK (status IN ('queued', 'running', 'good', 'failed', 'cancelled', 'interrupted', 'deleted')),
    trigger text NOT NULL DEFAULT 'person',
    requested_by_name text,
    system_identifier text,
    timeline integer,
    start_lsn bigint,
    end_lsn bigint,
    server_version text,
    storage text NOT NULL,
    storage_key text,
    bytes bigint,
    sha256 text,
    verification jsonb,
    error text,
    schedule_slot timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    started_at timestamptz,
    finished_at timestamptz,
    deleted_at timestamptz,
    CHECK (status <> 'good' OR (sha256 IS NOT NULL AND start_lsn IS NOT NULL AND end_lsn IS NOT NULL
                               AND system_identifier IS NOT NULL AND verification IS NOT NULL))
);
CREATE INDEX base_backups_target ON base_backups (target, id DESC);
-- One scheduled base backup per target and scheduled instant, however many replicas tick.
CREATE UNIQUE INDEX base_backups_schedule_slot ON base_backups (target, schedule_slot)
    WHERE schedule_slot IS NOT NULL;

-- `recoveries`: a scratch PostgreSQL recovered from a base backup and the
-- archived WAL to a chosen point, on dbops' own host, until a person is done.
CREATE TABLE recoveries (
    id bigserial PRIMARY KEY,
    target text NOT NULL,
    job_id bigint,
    operation_id bigint,
    status text NOT NULL DEFAULT 'queued'
        CHECK (status IN ('queued', 'recovering', 'ready', 'failed', 'removed')),
    -- `time`, `restore_point`, `operation` or `end` (the newest stored WAL).
    point_kind text NOT NULL,
    target_time timestamptz,
    restore_point text,
    before_operation bigint,
    point_text text NOT NULL,
    base_backup_id bigint REFERENCES base_backups (id),
    system_identifier text,
    -- The machine the scratch server runs on (only it can reach 127.0.0.1:port);
    -- its dbops removes it when asked (`remove_requested_at`), expired or orphaned.
    host text,
    scratch_dir text,
    -- The scratch server's Unix socket directory (0700) and its superuser: dbops
    -- connects there; TCP on 127.0.0.1:port takes passwords only.
    socket_dir text,
    superuser text,
    port integer,
    target_lsn bigint,
    replayed_lsn bigint,
    -- What recovery did in words (stopped at the target, or at the end of the archive).
    outcome text,
    error text,
    requested_by_name text,
    created_at timestamptz NOT NULL DEFAULT now(),
    started_at timestamptz,
    ready_at timestamptz,
    expires_at timestamptz,
    remove_requested_at timestamptz,
    removed_at timestamptz,
    removed_by_name text
);
CREATE INDEX recoveries_target ON recoveries (target, id DESC);
CREATE INDEX recoveries_open ON recoveries (status) WHERE status IN ('queued', 'recovering', 'ready');
