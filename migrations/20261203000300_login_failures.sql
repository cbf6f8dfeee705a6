-- Failed logins for usernames that have no account, counted like a real
-- account's (users.failed_logins / locked_until), so that after the same number
-- of failures an unknown name answers "locked" exactly as a real one does and
-- the login form cannot tell which names exist. Keyed by the lowercased name as
-- typed (at most 256 bytes, as the form allows); rows not failed for 30 days are
-- removed, and the table is kept to 10,000 rows (the oldest go first).

CREATE TABLE login_failures (
    name           text        PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 256),
    failures       integer     NOT NULL CHECK (failures >= 0),
    locked_until   timestamptz,
    last_failed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX login_failures_last_failed_at ON login_failures (last_failed_at);
