-- Backups run on the one job runtime (src/jobs): a backup's lease, progress and
-- Stop are its job's. The backup keeps its own facts (artifact, checksum,
-- verification, outcome) and the id of its job.
--
-- Expand only: `backups.heartbeat_at`, `runner`, `phase`, `progress_bytes`,
-- `progress_items`, `cancel_requested` and `restores.heartbeat_at`, `runner`,
-- `progress_bytes`, `progress_items` are no longer written, but stay for one
-- release so that a replica of the previous version still reads them during a
-- rolling upgrade; a later migration drops them.
ALTER TABLE backups ADD COLUMN job_id bigint;
CREATE INDEX backups_job ON backups (job_id) WHERE job_id IS NOT NULL;

-- A restore stopped by a person ends `cancelled` (as its job does), not `failed`.
ALTER TABLE restores DROP CONSTRAINT IF EXISTS restores_status_check;
ALTER TABLE restores ADD CONSTRAINT restores_status_check
    CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'interrupted', 'cancelled'));
