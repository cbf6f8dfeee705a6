//! Index, bloat and health reports of a PostgreSQL target, and the maintenance
//! actions they lead to (PRODUCT C7).
//!
//! A report is computed by a background job ([`jobs`]) on its own connection to the
//! target with `statement_timeout` and `lock_timeout` set, and stored as a snapshot
//! in the console database ([`snapshot`]); pages read the snapshot, so they stay
//! fast on catalogs with tens of thousands of relations, and say when it was taken.
//!
//! Catalog-only statements (bloat estimates, duplicate indexes, XID ages) run as one
//! statement each. Relation sizes are read from the files of the database
//! directory when dbops' role may list them ([`measure`]: one statement, no lock on
//! any relation, checked against a second catalog snapshot). Functions that open
//! relations (`pg_total_relation_size`, `pg_sequence_last_value`) run in batches
//! ([`per_relation`]), one short transaction each, after leaving out relations
//! someone holds (or waits for) an `AccessExclusiveLock` on; a batch that still
//! meets a lock timeout is retried one relation at a time and the relations that
//! time out again are skipped — and listed as skipped on the page. A relation
//! dropped while the report runs is skipped the same way. Exclusively locked
//! relations are skipped by the file path too. The space and indexes reports
//! split their work over `[reports] connections` connections.
//!
//! The report families: [`space`], [`bloat`], [`indexes`], [`health`],
//! [`statements`]. Maintenance: [`maintenance`] (ANALYZE / VACUUM as operator
//! jobs; VACUUM FULL, REINDEX, DROP INDEX CONCURRENTLY and
//! `pg_stat_statements_reset` as approval-gated actions).
//!
//! Over 600 lines: the report model (kinds, sections, columns, row actions) and the
//! safe-reading helpers every report uses (connect, lock checks, batches) are the
//! base the report files build on; about 60 lines are tests.

pub mod bloat;
pub mod health;
pub mod indexes;
pub mod jobs;
pub mod maintenance;
pub mod settings;
pub mod snapshot;
pub mod space;
pub mod statements;

use std::{collections::BTreeMap, str::FromStr, time::Duration};

use secrecy::ExposeSecret;
use serde_json::{Map, Value, json};
use sqlx::{
    ConnectOptions, Connection, PgConnection, Row,
    postgres::{PgConnectOptions, PgRow},
};

pub use settings::ReportSettings;

use crate::targets::{Target, postgres::describe_pg_error};

/// The gated action kinds of reports, for [`crate::actions::all`].
pub fn actions() -> Vec<std::sync::Arc<dyn crate::approvals::Action>> {
    use maintenance::{Command, Gated, ResetStatements};
    vec![
        std::sync::Arc::new(Gated(Command::VacuumFull)),
        std::sync::Arc::new(Gated(Command::Reindex)),
        std::sync::Arc::new(Gated(Command::DropIndex)),
        std::sync::Arc::new(ResetStatements),
    ]
}

/// The report families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Report {
    Space,
    Bloat,
    Indexes,
    Health,
    Statements,
}

impl Report {
    pub const ALL: [Report; 5] = [
        Report::Space,
        Report::Bloat,
        Report::Indexes,
        Report::Health,
        Report::Statements,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Report::Space => "space",
            Report::Bloat => "bloat",
            Report::Indexes => "indexes",
            Report::Health => "health",
            Report::Statements => "statements",
        }
    }

    pub fn parse(s: &str) -> Option<Report> {
        Report::ALL.into_iter().find(|r| r.as_str() == s)
    }

    pub fn title(self) -> &'static str {
        match self {
            Report::Space => "Space",
            Report::Bloat => "Bloat and vacuum",
            Report::Indexes => "Indexes",
            Report::Health => "Health",
            Report::Statements => "Slow queries",
        }
    }

    /// One line under the title.
    pub fn summary(self) -> &'static str {
        match self {
            Report::Space => {
                "Where the space goes: every table with its own size, its indexes and its TOAST data, and how the database grows."
            }
            Report::Bloat => {
                "Space taken by dead rows and free space inside tables and B-tree indexes, dead tuples, and when each table was last vacuumed and analyzed."
            }
            Report::Indexes => {
                "Indexes that cost writes and space without helping reads, indexes left invalid by a failed build, and tables read sequentially far more than through an index."
            }
            Report::Health => {
                "Cache hit ratio, transaction-ID wraparound, sequences running out of numbers, replicas and replication slots."
            }
            Report::Statements => {
                "The statements that take the most time in total and per call, from pg_stat_statements."
            }
        }
    }

    /// Its sections, in page order.
    pub fn sections(self) -> &'static [Section] {
        match self {
            Report::Space => space::SECTIONS,
            Report::Bloat => bloat::SECTIONS,
            Report::Indexes => indexes::SECTIONS,
            Report::Health => health::SECTIONS,
            Report::Statements => statements::SECTIONS,
        }
    }

    pub fn section(self, key: &str) -> Option<&'static Section> {
        self.sections().iter().find(|s| s.key == key)
    }

    /// The job kind that computes it.
    pub fn job_kind(self) -> &'static str {
        match self {
            Report::Space => "pg.report.space",
            Report::Bloat => "pg.report.bloat",
            Report::Indexes => "pg.report.indexes",
            Report::Health => "pg.report.health",
            Report::Statements => "pg.report.statements",
        }
    }
}

/// How a column's values are shown (and exported: CSV gets the raw value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    /// An identifier or SQL text, shown in monospace.
    Code,
    Bytes,
    Count,
    /// A percentage 0–100.
    Pct,
    /// Milliseconds.
    Ms,
    /// Seconds (lag).
    Secs,
    /// A timestamp (ISO text from PostgreSQL).
    Time,
    /// A short state word shown as a badge (`ok`, `warn`, `danger`, `unknown`…).
    Status,
    Bool,
}

/// One column of a section's table.
#[derive(Debug)]
pub struct Column {
    pub key: &'static str,
    pub label: &'static str,
    pub kind: Kind,
}

/// Which buttons each row of a section gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowActions {
    None,
    /// ANALYZE / VACUUM / VACUUM ANALYZE / VACUUM FULL / exact bloat on `schema`.`table`.
    Table,
    /// REINDEX / DROP INDEX on `schema`.`index` (plus exact bloat for B-trees).
    Index,
    /// Same, for the redundant index of a duplicate pair (`schema`.`index`).
    IndexDrop,
}

/// One table of a report.
#[derive(Debug)]
pub struct Section {
    pub key: &'static str,
    pub title: &'static str,
    /// What this means and what to do about it.
    pub meaning: &'static str,
    pub columns: &'static [Column],
    /// The column the rows are stored in (descending unless `default_asc`).
    pub default_sort: &'static str,
    pub default_asc: bool,
    pub actions: RowActions,
}

impl Section {
    pub fn column(&self, key: &str) -> Option<&'static Column> {
        self.columns.iter().find(|c| c.key == key)
    }
}

/// Shorthand for the column tables of the report modules.
pub(crate) const fn col(key: &'static str, label: &'static str, kind: Kind) -> Column {
    Column { key, label, kind }
}

/// A relation left out of a report, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Skipped {
    pub relation: String,
    pub reason: String,
}

/// A computed report, before it is stored.
#[derive(Debug, Default)]
pub struct Computed {
    pub database: String,
    pub facts: Map<String, Value>,
    pub skipped: Vec<Skipped>,
    /// Section key → why it could not be computed.
    pub errors: BTreeMap<String, String>,
    /// Section key → rows (label for the filter, the row), in the default order.
    pub sections: BTreeMap<String, Vec<(String, Value)>>,
}

impl Computed {
    /// Sorts the rows of `section` by its default column (missing values last).
    pub fn set_rows(&mut self, section: &Section, mut rows: Vec<(String, Value)>) {
        let key = section.default_sort;
        rows.sort_by(|a, b| {
            let (x, y) = (a.1.get(key), b.1.get(key));
            let ord = match (x, y) {
                (None | Some(Value::Null), None | Some(Value::Null)) => std::cmp::Ordering::Equal,
                (None | Some(Value::Null), _) => return std::cmp::Ordering::Greater,
                (_, None | Some(Value::Null)) => return std::cmp::Ordering::Less,
                (Some(Value::Number(p)), Some(Value::Number(q))) => p
                    .as_f64()
                    .unwrap_or(0.0)
                    .total_cmp(&q.as_f64().unwrap_or(0.0)),
                (Some(p), Some(q)) => p.to_string().cmp(&q.to_string()),
            };
            if section.default_asc {
                ord
            } else {
                ord.reverse()
            }
            .then_with(|| a.0.cmp(&b.0))
        });
        self.sections.insert(section.key.to_string(), rows);
    }
}

/// What a long computation reports back (the job's progress and Stop button).
pub trait Progress: Send + Sync {
    fn phase(&self, phase: &str);
    fn total(&self, items: u64);
    fn add(&self, items: u64);
    fn cancelled(&self) -> bool;
}

/// Progress that goes nowhere (the command line, tests).
pub struct NoProgress;

impl Progress for NoProgress {
    fn phase(&self, _: &str) {}
    fn total(&self, _: u64) {}
    fn add(&self, _: u64) {}
    fn cancelled(&self) -> bool {
        false
    }
}

pub use crate::state::quote_ident;

/// `"schema"."name"`.
pub fn qualified(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

/// Checks a schema or relation name as typed into a form: 1–63 bytes, no control
/// characters (PostgreSQL names cannot hold NUL; quotes, spaces and semicolons are
/// fine — they are quoted).
pub fn check_name(field: &str, value: &str) -> Result<String, String> {
    if value.is_empty() {
        return Err(format!("“{field}” is required."));
    }
    if value.len() > 63 || value.chars().any(char::is_control) {
        return Err(format!(
            "“{field}” is not a PostgreSQL name (at most 63 bytes, no control characters)."
        ));
    }
    Ok(value.to_string())
}

/// A connection of its own to the target (not from the shared pool, whose
/// statement timeout is short): `application_name` says what it is for, and the
/// given `statement_timeout` and `lock_timeout` hold for the whole session.
pub async fn connect(
    target: &Target,
    purpose: &str,
    statement_timeout: Option<Duration>,
    lock_timeout: Option<Duration>,
    connect_timeout: Duration,
) -> Result<PgConnection, String> {
    let ms = |d: Option<Duration>| d.map(|d| d.as_millis().to_string()).unwrap_or("0".into());
    let opts = PgConnectOptions::from_str(target.config.url.expose_secret())
        .map_err(|e| target.scrub(&format!("invalid connection URL: {e}")))?
        .application_name(&format!("dbops {purpose}"))
        .options([
            ("statement_timeout", ms(statement_timeout)),
            ("lock_timeout", ms(lock_timeout)),
        ])
        .log_statements(tracing::log::LevelFilter::Debug)
        // Report statements on big catalogs are slow by nature: not a warning.
        .log_slow_statements(tracing::log::LevelFilter::Debug, Duration::from_secs(1));
    match tokio::time::timeout(connect_timeout, PgConnection::connect_with(&opts)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(describe_pg_error(&target.scrub(&e.to_string()))),
        Err(_) => Err(format!(
            "{} did not answer within {} s",
            target.name(),
            connect_timeout.as_secs()
        )),
    }
}

/// A driver error as a sentence for the page, scrubbed of the target's secrets.
pub fn pg_error(target: &Target, e: &sqlx::Error) -> String {
    let text = match e {
        sqlx::Error::Database(d) => d.message().to_string(),
        other => other.to_string(),
    };
    describe_pg_error(&target.scrub(&text))
}

/// The SQLSTATE of a database error.
pub fn sqlstate(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(d) => d.code().map(|c| c.to_string()),
        _ => None,
    }
}

/// Why a relation was skipped, from the error its statement met.
fn skip_reason(e: &sqlx::Error) -> String {
    match sqlstate(e).as_deref() {
        Some("55P03") => "locked by another session (lock timeout)".into(),
        Some("57014") => "took longer than the statement timeout".into(),
        Some("42P01") | Some("XX000") => "dropped while the report ran".into(),
        Some("42501") => "dbops' role may not read it".into(),
        _ => match e {
            sqlx::Error::Database(d) => d.message().to_string(),
            other => other.to_string(),
        },
    }
}

/// Runs a catalog-only statement returning one `jsonb` per row (its first column).
pub async fn json_rows(
    conn: &mut PgConnection,
    sql: &str,
    binds: &[Value],
) -> Result<Vec<Value>, sqlx::Error> {
    let mut q = sqlx::query(sql);
    for b in binds {
        q = q.bind(b.clone());
    }
    let rows: Vec<PgRow> = q.fetch_all(&mut *conn).await?;
    rows.iter()
        .map(|r| r.try_get::<Value, _>(0))
        .collect::<Result<Vec<_>, _>>()
}

/// The relations (by OID) that someone holds or waits for an
/// `AccessExclusiveLock` on in this database — each under its own OID and under
/// the OID of the table it belongs to (for an index or a TOAST table). Asking for
/// any lock on those would queue behind it (and everything after would queue
/// behind us).
pub async fn exclusively_locked(
    conn: &mut PgConnection,
) -> Result<BTreeMap<i64, String>, sqlx::Error> {
    let rows: Vec<(i64, i64, bool)> = sqlx::query_as(
        "SELECT l.relation::int8, coalesce(t.oid, i.indrelid, l.relation)::int8, bool_or(l.granted)
         FROM pg_locks l
         LEFT JOIN pg_index i ON i.indexrelid = l.relation
         LEFT JOIN pg_class t ON t.reltoastrelid = coalesce(i.indrelid, l.relation)
         WHERE l.locktype = 'relation' AND l.mode = 'AccessExclusiveLock'
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND l.pid <> pg_backend_pid()
         GROUP BY 1, 2",
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut out = BTreeMap::new();
    for (rel, owner, granted) in rows {
        let reason = if granted {
            "locked exclusively by another session (ACCESS EXCLUSIVE)"
        } else {
            "another session is waiting for an ACCESS EXCLUSIVE lock on it"
        };
        out.insert(rel, reason.to_string());
        out.entry(owner).or_insert_with(|| reason.to_string());
    }
    Ok(out)
}

/// One relation for [`per_relation`]: its OID and its name for the skipped list.
#[derive(Debug, Clone)]
pub struct RelRef {
    pub oid: i64,
    /// The table an index belongs to (its lock counts too).
    pub owner: Option<i64>,
    pub name: String,
}

/// Runs `sql` — which takes the relations as `$1::oid[]` and returns one `jsonb`
/// per relation with its `"oid"` — over `rels` in batches of `batch`, each batch in
/// its own short transaction (so that locks some functions keep until the end of
/// the transaction never pile up). Relations exclusively locked right now are left
/// out first; a batch that fails (lock timeout, statement timeout, a relation
/// dropped meanwhile) is retried one relation at a time, and the ones that fail
/// again are skipped with the reason.
pub async fn per_relation(
    conn: &mut PgConnection,
    sql: &str,
    rels: &[RelRef],
    batch: usize,
    progress: &dyn Progress,
    skipped: &mut Vec<Skipped>,
) -> Result<BTreeMap<i64, Value>, String> {
    let mut out = BTreeMap::new();
    for chunk in rels.chunks(batch.max(1)) {
        if progress.cancelled() {
            return Err("stopped".into());
        }
        let locked = exclusively_locked(conn)
            .await
            .map_err(|e| format!("reading pg_locks: {e}"))?;
        let mut todo = Vec::with_capacity(chunk.len());
        for r in chunk {
            match locked
                .get(&r.oid)
                .or_else(|| r.owner.and_then(|o| locked.get(&o)))
            {
                Some(reason) => skipped.push(Skipped {
                    relation: r.name.clone(),
                    reason: reason.clone(),
                }),
                None => todo.push(r),
            }
        }
        let oids: Vec<i64> = todo.iter().map(|r| r.oid).collect();
        match run_batch(conn, sql, &oids).await {
            Ok(rows) => {
                let seen = collect(rows, &mut out);
                for r in &todo {
                    if !seen.contains(&r.oid) {
                        skipped.push(Skipped {
                            relation: r.name.clone(),
                            reason: "dropped while the report ran".into(),
                        });
                    }
                }
            }
            Err(_) => {
                for r in &todo {
                    match run_batch(conn, sql, &[r.oid]).await {
                        Ok(rows) => {
                            if collect(rows, &mut out).is_empty() {
                                skipped.push(Skipped {
                                    relation: r.name.clone(),
                                    reason: "dropped while the report ran".into(),
                                });
                            }
                        }
                        Err(e) => skipped.push(Skipped {
                            relation: r.name.clone(),
                            reason: skip_reason(&e),
                        }),
                    }
                }
            }
        }
        progress.add(chunk.len() as u64);
    }
    Ok(out)
}

/// Rows whose functions returned NULL (the relation vanished between the catalog
/// read and the call) are left out.
fn collect(rows: Vec<Value>, out: &mut BTreeMap<i64, Value>) -> Vec<i64> {
    let mut seen = Vec::new();
    for row in rows {
        let Some(oid) = row.get("oid").and_then(Value::as_i64) else {
            continue;
        };
        if row.get("gone").and_then(Value::as_bool) == Some(true) {
            continue;
        }
        seen.push(oid);
        out.insert(oid, row);
    }
    seen
}

async fn run_batch(
    conn: &mut PgConnection,
    sql: &str,
    oids: &[i64],
) -> Result<Vec<Value>, sqlx::Error> {
    if oids.is_empty() {
        return Ok(vec![]);
    }
    let mut tx = conn.begin().await?;
    let rows: Vec<PgRow> = sqlx::query(sql).bind(oids).fetch_all(&mut *tx).await?;
    let rows = rows
        .iter()
        .map(|r| r.try_get::<Value, _>(0))
        .collect::<Result<Vec<_>, _>>()?;
    tx.commit().await?;
    Ok(rows)
}

/// The files of the database directory (`base/<database oid>`), summed per file
/// node: `12345`, `12345.1`, `12345_fsm`, `12345_vm`, `12345_init` all count for
/// node `12345` — exactly the files `pg_relation_size` adds up over a relation's
/// forks and 1 GB segments. A file removed between the listing and its `stat`
/// counts 0. Listing the directory costs about as much as one `stat` per file in
/// it, whatever is measured.
const DIRECTORY_CTE: &str = "f AS MATERIALIZED (
        SELECT split_part(split_part(name, '.', 1), '_', 1) AS node,
               sum((pg_stat_file(d.dir || '/' || name, true)).size)::int8 AS bytes, true AS whole
        FROM (SELECT 'base/' || oid AS dir FROM pg_database WHERE datname = current_database()) d
        CROSS JOIN LATERAL pg_ls_dir(d.dir) AS name
        GROUP BY 1)";

/// Only the members' own files: the first segment of each fork (`12345`,
/// `12345_fsm`, `12345_vm`, `12345_init`, missing ones count 0). A main fork as
/// large as a segment may go on in `12345.1`…: such a relation is not `whole`
/// and is measured by opening it. Cheaper than [`DIRECTORY_CTE`] when the
/// members are a small part of the directory (the indexes report).
const MEMBERS_CTE: &str = "f AS MATERIALIZED (
        SELECT r.node, sum(s.bytes)::int8 AS bytes,
               bool_and(x.fork <> '' OR s.bytes IS NULL OR s.bytes < g.seg) AS whole
        FROM (SELECT 'base/' || oid AS dir FROM pg_database WHERE datname = current_database()) d
        CROSS JOIN (SELECT pg_size_bytes(current_setting('segment_size')) AS seg) g
        CROSS JOIN (SELECT DISTINCT c.relfilenode::text AS node FROM m JOIN pg_class c ON c.oid = m.member
                    WHERE c.relfilenode <> 0) r
        CROSS JOIN (VALUES (''), ('_fsm'), ('_vm'), ('_init')) x(fork)
        CROSS JOIN LATERAL (SELECT (pg_stat_file(d.dir || '/' || r.node || x.fork, true)).size AS bytes) s
        GROUP BY r.node)";

/// How to measure relations from their files instead of opening them: `members`
/// defines the CTE `m (rel, member, part)` — for each relation of `$1::oid[]`
/// the relations whose files count for it (a table: itself, its TOAST table and
/// that one's index, its indexes; an index: itself) — and `fields` the
/// `jsonb_build_object` pairs computed from `f.bytes` and `m.part`, the same keys
/// the relation-opening statement returns. `directory`: list the whole database
/// directory (worth it when the members are most of its files; it also gives the
/// database's size) rather than `stat` each member's files.
#[derive(Debug, Clone, Copy)]
pub struct FromFiles {
    pub members: &'static str,
    pub fields: &'static str,
    pub directory: bool,
}

impl FromFiles {
    /// One row per relation with its sizes, whether all its files were seen
    /// (`local`: default tablespace, not temporary, not a mapped catalog, no
    /// second segment missed) and its fingerprint (`fp`: every member's OID and
    /// file node); plus one row with OID 0 and the directory's total.
    fn sql(&self) -> String {
        format!(
            "WITH {members}, {files}
             SELECT jsonb_build_object('oid', m.rel::int8, {fields},
                    'local', bool_and(c.reltablespace = 0 AND c.relfilenode <> 0 AND c.relpersistence <> 't'
                                      AND coalesce(f.whole, true)),
                    'fp', string_agg(c.oid::text || ':' || c.relfilenode::text, ',' ORDER BY c.oid))
             FROM m JOIN pg_class c ON c.oid = m.member LEFT JOIN f ON f.node = c.relfilenode::text
             GROUP BY m.rel
             UNION ALL
             SELECT jsonb_build_object('oid', 0, 'database_bytes', (SELECT sum(bytes) FROM f)::int8,
                    'exact', {directory} AND NOT EXISTS
                        (SELECT 1 FROM pg_tablespace WHERE spcname NOT IN ('pg_default', 'pg_global')))",
            members = self.members,
            files = if self.directory { DIRECTORY_CTE } else { MEMBERS_CTE },
            fields = self.fields,
            directory = self.directory,
        )
    }

    /// The fingerprints again, in a new snapshot.
    fn recheck_sql(&self) -> String {
        format!(
            "WITH {members}
             SELECT jsonb_build_object('oid', m.rel::int8,
                    'fp', string_agg(c.oid::text || ':' || c.relfilenode::text, ',' ORDER BY c.oid))
             FROM m JOIN pg_class c ON c.oid = m.member
             GROUP BY m.rel",
            members = self.members,
        )
    }
}

/// What [`measure`] found.
#[derive(Debug, Default)]
pub struct Measured {
    /// OID → the row of the statement (or of [`FromFiles::fields`]).
    pub rows: BTreeMap<i64, Value>,
    /// The database directory's total when it was listed and the database has
    /// no other tablespace (what `pg_database_size` would say).
    pub database_bytes: Option<i64>,
    /// How many relations were measured from their files.
    pub from_files: usize,
}

/// Whether dbops' role may list the database directory and the database lives
/// in `pg_default` (superusers may; others after `GRANT EXECUTE ON FUNCTION
/// pg_ls_dir(text), pg_stat_file(text, boolean)`).
async fn may_list_files(conn: &mut PgConnection) -> bool {
    sqlx::query_scalar::<_, bool>(
        "SELECT has_function_privilege('pg_catalog.pg_ls_dir(text)', 'EXECUTE')
            AND has_function_privilege('pg_catalog.pg_stat_file(text, boolean)', 'EXECUTE')
            AND (SELECT dattablespace FROM pg_database WHERE datname = current_database())
                = (SELECT oid FROM pg_tablespace WHERE spcname = 'pg_default')",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap_or(false)
}

/// Measures `rels` (sizes) over the report's connections `conns` (one or more,
/// each with the report's timeouts; the work is split between them where that
/// helps). With `from_files` (and a role that may list files) most relations
/// are measured from their files in one catalog-only statement, which opens and
/// locks no relation at all, so it can never queue behind (or in front of)
/// anyone's lock; relations that someone holds or waits for an
/// `AccessExclusiveLock` on are still skipped, with the reason, as their files
/// are being replaced or removed. A second statement (a new catalog snapshot)
/// re-reads every relation's file nodes: a relation rewritten (`VACUUM FULL`,
/// `TRUNCATE`, `CLUSTER`), dropped or given a new index while the files were
/// read, one outside the default tablespace, and everything after an error go
/// through `sql` and [`per_relation`] (in batches under `lock_timeout`, then
/// relation by relation) instead.
pub async fn measure(
    conns: &mut [PgConnection],
    from_files: Option<&FromFiles>,
    sql: &str,
    rels: &[RelRef],
    batch: usize,
    progress: &dyn Progress,
    skipped: &mut Vec<Skipped>,
) -> Result<Measured, String> {
    let mut m = Measured::default();
    let Some(first) = conns.first_mut() else {
        return Err("no connection".into());
    };
    let mut rest: Vec<RelRef> = Vec::new();
    match from_files {
        Some(ff) if !rels.is_empty() && may_list_files(first).await => {
            if progress.cancelled() {
                return Err("stopped".into());
            }
            let locked = exclusively_locked(first)
                .await
                .map_err(|e| format!("reading pg_locks: {e}"))?;
            let mut todo = Vec::with_capacity(rels.len());
            for r in rels {
                match locked
                    .get(&r.oid)
                    .or_else(|| r.owner.and_then(|o| locked.get(&o)))
                {
                    Some(reason) => {
                        skipped.push(Skipped {
                            relation: r.name.clone(),
                            reason: reason.clone(),
                        });
                        progress.add(1);
                    }
                    None => todo.push(r.clone()),
                }
            }
            // Listing the directory once is the cost whatever is measured: one
            // connection; stat-ing members' files splits.
            let lanes = if ff.directory { 1 } else { conns.len() };
            let parts = split(&todo, lanes);
            let results = futures::future::join_all(
                conns
                    .iter_mut()
                    .zip(&parts)
                    .map(|(conn, part)| from_file_listing(conn, ff, part)),
            )
            .await;
            for (part, result) in parts.into_iter().zip(results) {
                let (mut rows, fps) = match result {
                    Ok(found) => found,
                    Err(e) => {
                        tracing::debug!(error = %e, "reading relation files failed; opening the relations instead");
                        rest.extend(part);
                        continue;
                    }
                };
                if let Some(total) = rows.remove(&0)
                    && total["exact"].as_bool() == Some(true)
                {
                    m.database_bytes = total["database_bytes"].as_i64();
                }
                for r in part {
                    let row = rows.remove(&r.oid).and_then(|mut row| {
                        let obj = row.as_object_mut()?;
                        let local = obj.remove("local")?.as_bool()?;
                        let fp = obj.remove("fp")?;
                        (local && fps.get(&r.oid) == Some(&fp)).then_some(row)
                    });
                    match row {
                        Some(row) => {
                            m.rows.insert(r.oid, row);
                            m.from_files += 1;
                            progress.add(1);
                        }
                        None => rest.push(r),
                    }
                }
            }
        }
        _ => rest = rels.to_vec(),
    }
    if !rest.is_empty() {
        let parts = split(&rest, conns.len());
        let results = futures::future::join_all(conns.iter_mut().zip(&parts).map(
            |(conn, part)| async move {
                let mut skipped = Vec::new();
                per_relation(conn, sql, part, batch, progress, &mut skipped)
                    .await
                    .map(|rows| (rows, skipped))
            },
        ))
        .await;
        for result in results {
            let (rows, lane_skipped) = result?;
            m.rows.extend(rows);
            skipped.extend(lane_skipped);
        }
    }
    Ok(m)
}

/// `rels` in `lanes` contiguous parts (fewer when there are fewer relations).
fn split(rels: &[RelRef], lanes: usize) -> Vec<Vec<RelRef>> {
    let size = rels.len().div_ceil(lanes.max(1)).max(1);
    rels.chunks(size).map(<[RelRef]>::to_vec).collect()
}

/// The two statements of [`measure`]'s file listing: the rows by OID (with OID
/// 0 for the directory's total), and the fingerprints re-read afterwards.
async fn from_file_listing(
    conn: &mut PgConnection,
    ff: &FromFiles,
    rels: &[RelRef],
) -> Result<(BTreeMap<i64, Value>, BTreeMap<i64, Value>), sqlx::Error> {
    let oids: Vec<i64> = rels.iter().map(|r| r.oid).collect();
    let mut tx = conn.begin().await?;
    // Hashing 100,000+ file names and members: in memory, not in batches on disk.
    sqlx::query("SELECT set_config('work_mem', '64MB', true)")
        .execute(&mut *tx)
        .await?;
    let rows: Vec<PgRow> = sqlx::query(&ff.sql())
        .bind(&oids)
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    let mut out = BTreeMap::new();
    for r in &rows {
        let v: Value = r.try_get(0)?;
        if let Some(oid) = v.get("oid").and_then(Value::as_i64) {
            out.insert(oid, v);
        }
    }
    let rows: Vec<PgRow> = sqlx::query(&ff.recheck_sql())
        .bind(&oids)
        .fetch_all(&mut *conn)
        .await?;
    let mut fps = BTreeMap::new();
    for r in &rows {
        let v: Value = r.try_get(0)?;
        if let (Some(oid), Some(fp)) = (v.get("oid").and_then(Value::as_i64), v.get("fp")) {
            fps.insert(oid, fp.clone());
        }
    }
    Ok((out, fps))
}

/// The user-relation filter every report uses: no system schemas, no other
/// sessions' temporary tables.
pub const USER_SCHEMAS: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_(toast|temp_|toast_temp_)'";

/// Computes one report on `target`.
#[tracing::instrument(skip_all, fields(target = %target.name(), report = report.as_str()))]
pub async fn compute(
    target: &Target,
    report: Report,
    settings: &ReportSettings,
    connect_timeout: Duration,
    progress: &dyn Progress,
) -> Result<Computed, String> {
    progress.phase("connecting");
    let mut conn = connect(
        target,
        &format!("report {}", report.as_str()),
        Some(settings.statement_timeout),
        Some(settings.lock_timeout),
        connect_timeout,
    )
    .await?;
    let mut c = Computed::default();
    let (database, in_recovery): (String, bool) =
        sqlx::query_as("SELECT current_database()::text, pg_is_in_recovery()")
            .fetch_one(&mut conn)
            .await
            .map_err(|e| pg_error(target, &e))?;
    c.database = database;
    c.facts.insert("in_recovery".into(), json!(in_recovery));
    // Reports that measure relations split the work over more backends
    // (`[reports] connections`), each with the same timeouts; without them
    // (max_connections reached, say) the report runs on the one it has.
    let lanes = match report {
        Report::Space | Report::Indexes => settings.connections,
        _ => 1,
    };
    let mut conns = vec![conn];
    while conns.len() < lanes {
        match connect(
            target,
            &format!("report {}", report.as_str()),
            Some(settings.statement_timeout),
            Some(settings.lock_timeout),
            connect_timeout,
        )
        .await
        {
            Ok(more) => conns.push(more),
            Err(e) => {
                tracing::debug!(error = %e, "a report connection more could not be opened");
                break;
            }
        }
    }
    let conn = &mut conns[0];
    let result = match report {
        Report::Space => space::compute(&mut conns, target, settings, progress, &mut c).await,
        Report::Bloat => bloat::compute(conn, target, settings, progress, &mut c).await,
        Report::Indexes => indexes::compute(&mut conns, target, settings, progress, &mut c).await,
        Report::Health => health::compute(conn, target, settings, progress, &mut c).await,
        Report::Statements => statements::compute(conn, target, settings, progress, &mut c).await,
    };
    for conn in conns {
        let _ = conn.close().await;
    }
    result.map(|()| c)
}

/// Runs one catalog statement for a section: its rows, or the error recorded on
/// the section (the rest of the report still shows).
pub(crate) async fn section_rows(
    conn: &mut PgConnection,
    target: &Target,
    c: &mut Computed,
    section: &Section,
    sql: &str,
    binds: &[Value],
) -> Option<Vec<Value>> {
    let rows = json_rows(conn, sql, binds).await;
    section_result(target, c, section, rows)
}

/// The rows of a section's statement, or the error recorded on the section.
pub(crate) fn section_result(
    target: &Target,
    c: &mut Computed,
    section: &Section,
    rows: Result<Vec<Value>, sqlx::Error>,
) -> Option<Vec<Value>> {
    match rows {
        Ok(rows) => Some(rows),
        Err(e) => {
            let msg = match sqlstate(&e).as_deref() {
                Some("57014") => format!(
                    "stopped at the statement timeout ({}); the catalog is too large for this section to finish in time — raise [reports] statement_timeout_seconds",
                    pg_error(target, &e)
                ),
                _ => pg_error(target, &e),
            };
            c.errors.insert(section.key.to_string(), msg);
            None
        }
    }
}

/// `schema.name` as the filter box matches it.
pub(crate) fn label_of(row: &Value, keys: &[&str]) -> String {
    keys.iter()
        .filter_map(|k| row.get(*k).and_then(Value::as_str))
        .collect::<Vec<_>>()
        .join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_whatever_they_contain() {
        assert_eq!(quote_ident("orders"), "\"orders\"");
        assert_eq!(
            quote_ident("Robert\"; DROP TABLE x; --"),
            "\"Robert\"\"; DROP TABLE x; --\""
        );
        assert_eq!(qualified("My Schema", "a\"b"), "\"My Schema\".\"a\"\"b\"");
    }

    #[test]
    fn names_are_checked_not_rewritten() {
        assert_eq!(check_name("table", "We;ird \"T\"").unwrap(), "We;ird \"T\"");
        assert!(check_name("table", "").is_err());
        assert!(check_name("table", &"x".repeat(64)).is_err());
        assert!(check_name("table", "a\nb").is_err());
    }

    #[test]
    fn every_report_has_sections_whose_default_sort_is_a_column() {
        for r in Report::ALL {
            assert_eq!(Report::parse(r.as_str()), Some(r));
            assert!(!r.sections().is_empty());
            for s in r.sections() {
                assert!(
                    s.column(s.default_sort).is_some(),
                    "{}.{}",
                    r.as_str(),
                    s.key
                );
                assert!(!s.meaning.is_empty());
            }
        }
    }

    #[test]
    fn rows_are_stored_in_the_default_order_with_missing_values_last() {
        static S: Section = Section {
            key: "t",
            title: "t",
            meaning: "m",
            columns: &[col("size", "Size", Kind::Bytes)],
            default_sort: "size",
            default_asc: false,
            actions: RowActions::None,
        };
        let mut c = Computed::default();
        c.set_rows(
            &S,
            vec![
                ("a".into(), json!({"size": 1})),
                ("b".into(), json!({})),
                ("c".into(), json!({"size": 30})),
            ],
        );
        let order: Vec<&str> = c.sections["t"].iter().map(|r| r.0.as_str()).collect();
        assert_eq!(order, ["c", "a", "b"]);
    }
}
