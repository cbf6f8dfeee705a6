-- Restore over a database is all-or-nothing (issue 13): the backup is restored
-- into a new database beside the live one (`work_database`), checked, and only
-- then swapped in by renaming, in one transaction on the server: the live one
-- becomes `previous_database`, kept until a person drops it (or
-- `[restores] keep_previous_days` pass). A restore that cannot swap (options
-- that restore part of a database) runs in place in one transaction instead
-- (`method` = 'in_place').
ALTER TABLE restores
    ADD COLUMN method              text CHECK (method IN ('swap', 'in_place')),
    ADD COLUMN work_database       text,
    ADD COLUMN previous_database   text,
    ADD COLUMN swapped_at          timestamptz,
    ADD COLUMN swapped_back_at     timestamptz,
    ADD COLUMN previous_dropped_at timestamptz,
    ADD COLUMN previous_dropped_by text;
CREATE INDEX restores_kept_previous ON restores (target)
    WHERE previous_database IS NOT NULL AND swapped_at IS NOT NULL AND previous_dropped_at IS NULL;

-- A safety backup names the restore it protects (linked both ways).
ALTER TABLE backups ADD COLUMN safety_for_restore bigint;

-- A person's "keep this backup": retention never deletes a pinned backup.
CREATE TABLE backup_pins (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    backup_id        bigint      NOT NULL REFERENCES backups (id),
    reason           text        NOT NULL CHECK (length(reason) BETWEEN 1 AND 2000),
    pinned_by        bigint REFERENCES users (id),
    pinned_by_name   text        NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz,
    released_at      timestamptz,
    released_by_name text
);
CREATE INDEX backup_pins_backup ON backup_pins (backup_id) WHERE released_at IS NULL;

-- Why a backup must not be deleted now, one sentence a reason (empty: it may
-- be). The one definition, used by retention's DELETE guard and by the pages:
--   - a person's pin that is not released or expired;
--   - an approval request that is pending or approved and not finished (other
--     than a request to delete it);
--   - a restore of it that is queued or running;
--   - a restore it is the safety backup of, while that restore runs or while
--     the database it replaced is kept.
CREATE FUNCTION backup_pin_reasons(b bigint) RETURNS text[]
LANGUAGE sql STABLE AS $$
    SELECT coalesce(array_agg(why ORDER BY ord, why), '{}') FROM (
        SELECT 1 AS ord, 'kept by ' || p.pinned_by_name || ': ' || p.reason ||
               coalesce(' (until ' || to_char(p.expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') || ' UTC)', '') AS why
          FROM backup_pins p
         WHERE p.backup_id = b AND p.released_at IS NULL AND (p.expires_at IS NULL OR p.expires_at > now())
        UNION ALL
        SELECT 2, 'request #' || r.id || ' (' || r.kind || ') is ' || r.state || ' and refers to it'
          FROM approval_requests r
         WHERE r.state IN ('pending', 'approved') AND r.finished_at IS NULL AND r.kind <> 'backup.delete'
           AND r.params -> 'backup_id' = to_jsonb(b)
        UNION ALL
        SELECT 3, 'restore #' || x.id || ' of it is ' || x.status
          FROM restores x WHERE x.backup_id = b AND x.status IN ('queued', 'running')
        UNION ALL
        SELECT 4, 'the safety backup of restore #' || x.id ||
               CASE WHEN x.status IN ('queued', 'running') THEN ', which is running'
                    ELSE ', whose previous database ' || x.previous_database || ' is kept' END
          FROM restores x
         WHERE x.safety_backup_id = b
           AND (x.status IN ('queued', 'running')
                OR (x.swapped_at IS NOT NULL AND x.previous_dropped_at IS NULL AND x.swapped_back_at IS NULL))
    ) reasons
$$;
