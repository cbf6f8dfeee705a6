-- Long-running work other than backups (reports, bulk deletes, maintenance,
-- restores' long part): one row per job, run by whichever dbops replica takes
-- it from the durable `dbops-jobs` queue. The row is also the lease: a running
-- job's runner refreshes `heartbeat_at`; a job whose runner stopped is ended
-- `interrupted` by the sweeper.

CREATE TABLE jobs (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind              text        NOT NULL,
    target            text        NOT NULL,
    params            jsonb       NOT NULL DEFAULT '{}',
    status            text        NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'interrupted')),
    phase             text,
    done              bigint      NOT NULL DEFAULT 0,
    total             bigint      NOT NULL DEFAULT 0,
    bytes             bigint      NOT NULL DEFAULT 0,
    result            jsonb,
    error             text,
    cancel_requested  boolean     NOT NULL DEFAULT false,
    requested_by      bigint REFERENCES users (id),
    requested_by_name text,
    operation_id      bigint,
    -- Set when the job is the long part of an approved action: the request ends
    -- executed or failed when the job ends.
    approval_id       bigint,
    runner            text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    started_at        timestamptz,
    finished_at       timestamptz,
    heartbeat_at      timestamptz,
    CONSTRAINT job_finished_has_end CHECK (status IN ('queued', 'running') OR finished_at IS NOT NULL)
);
CREATE INDEX jobs_kind_target ON jobs (kind, target, id DESC);
CREATE INDEX jobs_active ON jobs (id) WHERE status IN ('queued', 'running');
CREATE INDEX jobs_approval ON jobs (approval_id) WHERE approval_id IS NOT NULL;
