-- Backups. A row is created `queued` when a backup is asked for, becomes
-- `running` when a worker takes it, and ends `good` only when the artifact is
-- complete, committed under its final name and verified; otherwise `failed`,
-- `interrupted` (its runner died) or `cancelled`. `deleted` keeps the history of a
-- pruned or deleted artifact.

CREATE TABLE backups (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    target          text        NOT NULL,
    method          text        NOT NULL CHECK (method IN ('pg_dump', 'redis_rdb', 'redis_logical')),
    format          text        NOT NULL,
    options         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    status          text        NOT NULL CHECK (status IN ('queued', 'running', 'good', 'failed', 'interrupted', 'cancelled', 'deleted')),
    phase           text,
    trigger         text        NOT NULL CHECK (trigger IN ('person', 'schedule', 'api', 'cli')),
    requested_by    bigint REFERENCES users (id),
    requested_by_name text,
    storage         text        NOT NULL,
    storage_key     text,
    bytes           bigint,
    sha256          text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    heartbeat_at    timestamptz,
    runner          text,
    progress_bytes  bigint      NOT NULL DEFAULT 0,
    progress_items  bigint      NOT NULL DEFAULT 0,
    error           text,
    verification    jsonb,
    tool_version    text,
    server_version  text,
    operation_id    bigint,
    schedule_slot   timestamptz,
    deleted_at      timestamptz,
    deleted_by_name text,
    -- "Good" means complete, checksummed and verified: the database refuses
    -- anything less.
    CONSTRAINT good_means_verified CHECK (
        status <> 'good' OR (sha256 IS NOT NULL AND bytes IS NOT NULL AND verification IS NOT NULL
                             AND finished_at IS NOT NULL AND storage_key IS NOT NULL)),
    CONSTRAINT finished_has_end CHECK (status IN ('queued', 'running') OR finished_at IS NOT NULL)
);
CREATE INDEX backups_target_id ON backups (target, id DESC);
CREATE INDEX backups_active ON backups (id) WHERE status IN ('queued', 'running');
CREATE INDEX backups_good ON backups (target, finished_at DESC) WHERE status = 'good';
-- Each scheduled instant of a target runs once, however many replicas tick.
CREATE UNIQUE INDEX backups_schedule_once ON backups (target, schedule_slot) WHERE schedule_slot IS NOT NULL;

-- API tokens for pipelines (`POST /api/v1/targets/NAME/backups`): hashed at rest,
-- scoped, revocable.
CREATE TABLE api_tokens (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name          text        NOT NULL,
    token_hash    bytea       NOT NULL UNIQUE,
    prefix        text        NOT NULL,
    scopes        text[]      NOT NULL,
    targets       text[],
    created_by    bigint REFERENCES users (id),
    created_by_name text      NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz,
    revoked_at    timestamptz,
    CONSTRAINT scopes_known CHECK (scopes <@ ARRAY['backup:create', 'backup:read']::text[])
);

-- A cancel asked for on any replica; the runner's heartbeat sees it.
ALTER TABLE backups ADD COLUMN cancel_requested boolean NOT NULL DEFAULT false;
