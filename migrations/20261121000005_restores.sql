-- Restores of PostgreSQL backups. A row is created `queued` when a restore is
-- asked for (after the cheap checks passed), becomes `running` when its task
-- takes it, and ends `succeeded`, `failed` (nothing is left behind: a
-- half-restored database is dropped) or `interrupted` (its runner stopped).

CREATE TABLE restores (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    backup_id         bigint      NOT NULL REFERENCES backups (id),
    target            text        NOT NULL,
    database          text        NOT NULL,
    -- `new_database`: into a database created for it (not destructive);
    -- `over_database`: over the target's own database, an approved action that
    -- takes a safety backup first (`safety_backup_id`).
    mode              text        NOT NULL CHECK (mode IN ('new_database', 'over_database')),
    status            text        NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'interrupted')),
    phase             text,
    jobs              integer     NOT NULL DEFAULT 1 CHECK (jobs BETWEEN 1 AND 32),
    progress_bytes    bigint      NOT NULL DEFAULT 0,
    progress_items    bigint      NOT NULL DEFAULT 0,
    progress_total    bigint      NOT NULL DEFAULT 0,
    requested_by      bigint REFERENCES users (id),
    requested_by_name text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    started_at        timestamptz,
    finished_at       timestamptz,
    heartbeat_at      timestamptz,
    runner            text,
    error             text,
    result            jsonb,
    operation_id      bigint,
    safety_backup_id  bigint REFERENCES backups (id),
    approval_id       bigint,
    end_sessions      boolean     NOT NULL DEFAULT false,
    CONSTRAINT restore_finished_has_end CHECK (status IN ('queued', 'running') OR finished_at IS NOT NULL)
);
CREATE INDEX restores_backup ON restores (backup_id, id DESC);
CREATE INDEX restores_active ON restores (id) WHERE status IN ('queued', 'running');
-- Two restores into the same new database at once: the second is refused.
CREATE UNIQUE INDEX restores_one_active_per_database ON restores (target, database)
    WHERE status IN ('queued', 'running');
