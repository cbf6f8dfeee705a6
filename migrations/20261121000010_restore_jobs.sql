-- Restores run as jobs (the `jobs` table holds their lease), can go to another
-- target than the backup's, and carry the pg_restore options a person chose.
ALTER TABLE restores
    ADD COLUMN options       jsonb  NOT NULL DEFAULT '{}',
    ADD COLUMN job_id        bigint,
    ADD COLUMN source_target text,
    -- A new database this restore created and has not (yet) been able to drop
    -- after failing: the sweeper keeps trying (when dbops died, or the server
    -- was down).
    ADD COLUMN leftover      boolean NOT NULL DEFAULT false;
UPDATE restores SET source_target = target WHERE source_target IS NULL;
ALTER TABLE restores ALTER COLUMN source_target SET NOT NULL;
CREATE INDEX restores_job ON restores (job_id) WHERE job_id IS NOT NULL;
