-- Maintenance windows (issue 20): a change window with targets, a planned start
-- and duration, an owner, and the ordered steps of its template (automatic ones
-- run as jobs, manual ones ticked by a named person with a note).

CREATE TABLE maintenance_windows (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    template            text        NOT NULL,
    title               text        NOT NULL,
    -- The first target: routes about the window check the user's role on it.
    target              text        NOT NULL,
    targets             text[]      NOT NULL CHECK (cardinality(targets) >= 1),
    reason              text        NOT NULL DEFAULT '',
    planned_start       timestamptz NOT NULL,
    planned_minutes     integer     NOT NULL CHECK (planned_minutes BETWEEN 1 AND 10080),
    owner_id            bigint REFERENCES users (id),
    owner_name          text        NOT NULL,
    health_url          text,
    state               text        NOT NULL CHECK (state IN
                            ('requested', 'approved', 'open', 'stopped', 'closed', 'aborted', 'rejected')),
    stop_reason         text,
    -- The approval requests (one per target, `window.gate`).
    approval_ids        bigint[]    NOT NULL DEFAULT '{}',
    opened_at           timestamptz,
    opened_by_name      text,
    closed_at           timestamptz,
    closed_by_name      text,
    summary             text,
    overrun_notified_at timestamptz,
    created_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX maintenance_windows_live ON maintenance_windows (state) WHERE state IN ('open', 'stopped');

CREATE TABLE maintenance_window_steps (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    window_id    bigint      NOT NULL REFERENCES maintenance_windows (id),
    position     integer     NOT NULL,
    kind         text        NOT NULL,
    title        text        NOT NULL,
    automatic    boolean     NOT NULL,
    -- The step's settings from its template (health URL expectations, …).
    config       jsonb       NOT NULL DEFAULT '{}',
    status       text        NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'running', 'done', 'failed', 'skipped')),
    job_id       bigint REFERENCES jobs (id),
    done_by      bigint REFERENCES users (id),
    done_by_name text,
    note         text,
    started_at   timestamptz,
    finished_at  timestamptz,
    output       jsonb,
    error        text,
    UNIQUE (window_id, position)
);

-- Pipelines open, step and close windows with a token of this scope.
ALTER TABLE api_tokens DROP CONSTRAINT scopes_known;
ALTER TABLE api_tokens ADD CONSTRAINT scopes_known
    CHECK (scopes <@ ARRAY['backup:create', 'backup:read', 'migrations:deploy', 'windows:run']::text[]);
