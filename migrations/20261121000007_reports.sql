-- Index, bloat and health reports (PRODUCT C7): each computation of a report on a
-- PostgreSQL target is kept as a snapshot, so that pages read the console
-- database (fast on targets with tens of thousands of relations) and say when the
-- figures were taken. Only the newest few snapshots per target and report keep
-- their rows (`[reports] keep_snapshots`); the database size history is kept
-- whole, for the growth chart.

CREATE TABLE report_snapshots (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    target       text        NOT NULL,
    -- space | bloat | indexes | health | statements
    report       text        NOT NULL,
    -- The target's database the figures are about.
    database     text,
    taken_at     timestamptz NOT NULL DEFAULT now(),
    duration_ms  bigint      NOT NULL DEFAULT 0,
    -- The job that computed it (none when computed from the command line).
    job_id       bigint,
    -- Single figures of the report (database size, hit ratios, statistics reset
    -- time, whether pgstattuple / pg_stat_statements are there, notes).
    facts        jsonb       NOT NULL DEFAULT '{}',
    -- Relations left out, each {"relation": …, "reason": …} (locked exclusively,
    -- dropped while the report ran, lock timeout).
    skipped      jsonb       NOT NULL DEFAULT '[]',
    -- Sections that could not be computed: {"section": "sentence"}.
    errors       jsonb       NOT NULL DEFAULT '{}',
    -- Rows per section.
    counts       jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX report_snapshots_newest ON report_snapshots (target, report, id DESC);

-- The rows of a snapshot, one per relation / index / query, in the report's
-- default order (`n`), so that the default page is an index range scan; other
-- orders sort the JSON values (jsonb orders numbers numerically).
CREATE TABLE report_rows (
    snapshot_id bigint  NOT NULL REFERENCES report_snapshots (id) ON DELETE CASCADE,
    section     text    NOT NULL,
    n           integer NOT NULL,
    -- What the filter box matches: schema.relation, index name, query text.
    label       text    NOT NULL,
    data        jsonb   NOT NULL,
    PRIMARY KEY (snapshot_id, section, n)
);

-- The target database's size over time: one point per space report and per
-- periodic sample (`[reports] size_history_minutes`).
CREATE TABLE report_db_sizes (
    target   text        NOT NULL,
    database text        NOT NULL,
    taken_at timestamptz NOT NULL DEFAULT now(),
    bytes    bigint      NOT NULL,
    PRIMARY KEY (target, taken_at)
);
