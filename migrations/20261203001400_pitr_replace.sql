-- Issue 17: a database replaced by one recovered to a point in time
-- (`pitr.replace`) is a restore whose source is a recovery, not a backup. It
-- uses the same row, swap, "swap back", kept previous database and sweeper as
-- a restore over a database.
ALTER TABLE restores ALTER COLUMN backup_id DROP NOT NULL;
ALTER TABLE restores
    ADD COLUMN recovery_id     bigint REFERENCES recoveries (id),
    -- The recovered database copied (the recovery's server may hold several).
    ADD COLUMN source_database text;
ALTER TABLE restores ADD CONSTRAINT restore_has_a_source
    CHECK (backup_id IS NOT NULL OR (recovery_id IS NOT NULL AND source_database IS NOT NULL));
CREATE INDEX restores_recovery ON restores (recovery_id) WHERE recovery_id IS NOT NULL;

-- A person's pin on a base backup: retention never deletes it (nor the WAL
-- from its start on, which recovering from it needs).
ALTER TABLE base_backups
    ADD COLUMN pinned_reason  text CHECK (length(pinned_reason) BETWEEN 1 AND 2000),
    ADD COLUMN pinned_by_name text,
    ADD COLUMN pinned_at      timestamptz,
    ADD CONSTRAINT base_backup_pin_whole CHECK ((pinned_at IS NULL) = (pinned_reason IS NULL));
