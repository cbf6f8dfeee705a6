//! The bookkeeping tables of the common migration tools: finding them (one catalog
//! query over every schema), telling which tool a table belongs to, and reading
//! each one into the same shape.
//!
//! The tables and columns each tool creates on PostgreSQL (checked against the
//! tools' sources and docs):
//! - **sqlx** `_sqlx_migrations(version bigint pk, description text, installed_on
//!   timestamptz, success bool, checksum bytea, execution_time bigint)`, execution
//!   time in nanoseconds (`sqlx-postgres/src/migrate.rs`, 0.8.6: `elapsed.as_nanos()`).
//!   A row with `success = false` makes sqlx refuse to go on ("dirty").
//! - **Prisma** `_prisma_migrations(id, checksum varchar(64), finished_at, migration_name,
//!   logs, rolled_back_at, started_at, applied_steps_count)`; a row with neither
//!   `finished_at` nor `rolled_back_at` is a failed (or still running) migration and
//!   `migrate deploy` stops on it (P3009); `logs` holds the error.
//! - **Drizzle** `drizzle.__drizzle_migrations(id serial, hash text, created_at bigint)`
//!   (as `pg_dump` shows it in projects using Drizzle; schema and table are
//!   configurable, `migrationsSchema`/`migrationsTable` in `drizzle-orm/src/migrator.ts`,
//!   the default schema is `drizzle`): `hash` is the SHA-256 of the file, `created_at`
//!   the journal's `when` in milliseconds; there is no name and no apply time, so
//!   `created_at` is shown as the version and read as the apply time.
//! - **Flyway** `flyway_schema_history(installed_rank int pk, version varchar(50),
//!   description, type, script, checksum int, installed_by, installed_on timestamp,
//!   execution_time int /* ms */, success bool)`
//!   (`flyway-core/.../createMetaDataTable.sql`); `version` is NULL for repeatables;
//!   `type` `SCHEMA`/`BASELINE`/`DELETE`/`UNDO_*` rows are bookkeeping, not files.
//! - **Liquibase** `databasechangelog(id, author, filename, dateexecuted, orderexecuted,
//!   exectype, md5sum, description, comments, tag, liquibase, contexts, labels,
//!   deployment_id)` with `exectype` one of `EXECUTED`, `FAILED`, `SKIPPED`, `RERAN`,
//!   `MARK_RAN`; and `databasechangeloglock(id, locked, lockgranted, lockedby)`, a row
//!   with `locked` true is a held lock (a crashed run leaves it; `liquibase
//!   release-locks` clears it).
//! - **golang-migrate** `schema_migrations(version bigint pk, dirty boolean)`, one row
//!   (`database/postgres/postgres.go`); `dirty` = a migration failed half-way.
//! - **Rails** `schema_migrations(version varchar pk)` plus `ar_internal_metadata(key,
//!   value, created_at, updated_at)` (ActiveRecord's `SchemaMigration` and
//!   `InternalMetadata`, which records the `environment`).
//! - **dbmate** `schema_migrations(version varchar(128) pk)` (`pkg/driver/postgres`).
//! - **Django** `django_migrations(id, app varchar(255), name varchar(255), applied
//!   timestamptz)` (`django/db/migrations/recorder.py`).
//! - **Alembic** `alembic_version(version_num varchar(32) pk)`: only the current
//!   revision(s), one row per head; no history.
//! - **Knex** `knex_migrations(id, name, batch, migration_time)` and
//!   `knex_migrations_lock(index, is_locked integer)` (`lib/migrations/migrate/table-creator.js`);
//!   `is_locked = 1` is a held lock (`knex migrate:unlock` clears it).
//! - **Sequelize** (umzug `SequelizeStorage`) `"SequelizeMeta"(name varchar pk)`:
//!   names only, applied in name order.
//! - **goose** `goose_db_version(id serial, version_id bigint, is_applied bool, tstamp
//!   timestamp)`: every up and down is a row; the first row (version 0) is goose's own.
//! - **Diesel** `__diesel_schema_migrations(version varchar(50) pk, run_on timestamp)`.
//! - **refinery** `refinery_schema_history(version int4 pk, name varchar(255),
//!   applied_on varchar(255) /* RFC 3339 text */, checksum varchar(255))`
//!   (`refinery_core/src/traits/mod.rs`); the checksum is a SipHash of name, version
//!   and SQL, not recomputed here.
//! - **TypeORM** `migrations(id serial, "timestamp" bigint, name varchar)` (table name
//!   configurable; `typeorm_migrations` is common); `timestamp` is the migration
//!   class's, not the time it ran.
//!
//! - **node-pg-migrate** `pgmigrations(id serial, name varchar(255), run_on
//!   timestamp)` (`src/migration.ts`, table name configurable): the name is the file
//!   name without its extension. It locks with an advisory lock, not a table.
//! - **Atlas** `atlas_schema_revisions.atlas_schema_revisions(version pk, description,
//!   type, applied, total, executed_at, execution_time /* ns */, error, error_stmt,
//!   hash, partial_hashes, operator_version)` (`cmd/atlas/internal/migrate/ent/revision`):
//!   a revision with an `error`, or fewer statements `applied` than its `total`, failed
//!   part-way; rows whose version starts with `.` are Atlas' own identifiers.
//! - **Sqitch** `sqitch.changes(change_id, script_hash, change, project, note,
//!   committed_at, committer_name, …)` holds what is deployed; `sqitch.events`
//!   logs every `deploy`, `revert` and `fail`: a `fail` with no later `deploy` of the
//!   same change is a failed deploy (Sqitch reverts it, so it is not in `changes`).
//! - **Graphile Migrate** `graphile_migrate.migrations(hash, previous_hash, filename,
//!   date)`: committed migrations, each hash chained to the previous one.
//!
//! Any other table whose name contains `migration` and that has a `version`,
//! `name`, `migration` or `filename` column is shown as "unrecognised, looks like
//! migrations" (Laravel's `migrations`, hand-made ones), with that column.
//!
//! `schema_migrations` is shared: with a `dirty` column it is golang-migrate's; with an
//! `ar_internal_metadata` table in the same schema it is Rails'; with `version` as its
//! only column it is dbmate's; anything else is shown as an unrecognised
//! `schema_migrations`. A table called `migrations` is TypeORM's only when it has
//! exactly TypeORM's columns (`id`, `timestamp`, `name`); otherwise it is someone
//! else's (Laravel, hand-made) and left out.
//!
//! Over 600 lines: finding each migration tool's bookkeeping table and reading its
//! rows is one table of per-tool SQL, kept together so tools are compared side by
//! side.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::{Applied, RowState, Tool};

/// Every table name that may be a tool's bookkeeping table (or its lock/metadata).
pub const TABLE_NAMES: &[&str] = &[
    "_sqlx_migrations",
    "_prisma_migrations",
    "__drizzle_migrations",
    "flyway_schema_history",
    "databasechangelog",
    "databasechangeloglock",
    "schema_migrations",
    "ar_internal_metadata",
    "django_migrations",
    "alembic_version",
    "knex_migrations",
    "knex_migrations_lock",
    "SequelizeMeta",
    "goose_db_version",
    "__diesel_schema_migrations",
    "refinery_schema_history",
    "migrations",
    "typeorm_migrations",
    "pgmigrations",
    "atlas_schema_revisions",
    "changes",
    "events",
];

/// Columns that make a `*migration*` table look like bookkeeping, in the order
/// they are preferred as its version.
const LOOKALIKE_COLUMNS: &[&str] = &["version", "migration", "name", "filename"];

/// Rows read per table at most (the newest); the page says when there are more.
pub const ROW_LIMIT: i64 = 2000;

/// A candidate table from the catalog.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Found {
    pub schema: String,
    pub table: String,
    pub columns: Vec<String>,
    pub readable: bool,
}

/// A table recognised as a tool's.
#[derive(Debug, Clone)]
pub struct Detected {
    pub tool: Tool,
    pub schema: String,
    pub table: String,
    pub readable: bool,
    /// Liquibase/Knex lock table in the same schema.
    pub lock_table: Option<String>,
    /// Rails' `ar_internal_metadata`.
    pub metadata_table: Option<String>,
    /// The name is the tool's but the columns are not: why it is not read.
    pub unexpected: Option<String>,
    /// The column read as the version of an unrecognised table.
    pub key_column: Option<String>,
}

/// One catalog query for every candidate table in every schema of the database
/// (system schemas left out), with its columns and whether we may read it.
pub async fn find_tables(conn: &mut PgConnection) -> Result<Vec<Found>, sqlx::Error> {
    sqlx::query_as::<_, Found>(
        "SELECT n.nspname::text AS schema, c.relname::text AS table,
                array_agg(a.attname::text ORDER BY a.attnum) AS columns,
                has_table_privilege(c.oid, 'SELECT') AS readable
           FROM pg_catalog.pg_class c
           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
           JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
          WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
            AND (c.relname = ANY($1) OR c.relname ILIKE '%migration%')
            AND n.nspname NOT IN ('pg_catalog', 'information_schema')
            AND n.nspname NOT LIKE 'pg\\_%'
          GROUP BY n.nspname, c.relname, c.oid
          ORDER BY n.nspname, c.relname",
    )
    .bind(TABLE_NAMES)
    .fetch_all(conn)
    .await
}

fn has_all(f: &Found, cols: &[&str]) -> bool {
    cols.iter().all(|c| f.columns.iter().any(|x| x == c))
}

/// Which tool each candidate table belongs to (lock and metadata tables are
/// attached to their main table, not listed on their own).
pub fn classify(found: &[Found]) -> Vec<Detected> {
    let sibling = |schema: &str, name: &str| {
        found
            .iter()
            .any(|f| f.schema == schema && f.table == name)
            .then(|| name.to_string())
    };
    let mut out = vec![];
    for f in found {
        let lookalike = || {
            let lower = f.table.to_ascii_lowercase();
            if !lower.contains("migration") || lower.ends_with("lock") {
                return None;
            }
            LOOKALIKE_COLUMNS
                .iter()
                .find(|c| f.columns.iter().any(|x| x == *c))
                .map(|c| c.to_string())
        };
        let mut key_column = None;
        let (tool, required): (Tool, &[&str]) = match f.table.as_str() {
            "_sqlx_migrations" => (
                Tool::Sqlx,
                &[
                    "version",
                    "description",
                    "installed_on",
                    "success",
                    "checksum",
                    "execution_time",
                ],
            ),
            "_prisma_migrations" => (
                Tool::Prisma,
                &[
                    "migration_name",
                    "checksum",
                    "started_at",
                    "finished_at",
                    "rolled_back_at",
                    "logs",
                ],
            ),
            "__drizzle_migrations" => (Tool::Drizzle, &["id", "hash", "created_at"]),
            "flyway_schema_history" => (
                Tool::Flyway,
                &[
                    "installed_rank",
                    "version",
                    "description",
                    "type",
                    "script",
                    "checksum",
                    "installed_on",
                    "execution_time",
                    "success",
                ],
            ),
            "databasechangelog" => (
                Tool::Liquibase,
                &[
                    "id",
                    "author",
                    "filename",
                    "dateexecuted",
                    "orderexecuted",
                    "exectype",
                ],
            ),
            "schema_migrations" => {
                if !has_all(f, &["version"]) {
                    continue;
                }
                if has_all(f, &["dirty"]) {
                    (Tool::GolangMigrate, &["version", "dirty"])
                } else if sibling(&f.schema, "ar_internal_metadata").is_some() {
                    (Tool::Rails, &["version"])
                } else if f.columns.len() == 1 {
                    (Tool::Dbmate, &["version"])
                } else {
                    key_column = Some("version".to_string());
                    (Tool::Unknown, &["version"])
                }
            }
            "django_migrations" => (Tool::Django, &["id", "app", "name", "applied"]),
            "alembic_version" => (Tool::Alembic, &["version_num"]),
            "knex_migrations" => (Tool::Knex, &["id", "name", "batch", "migration_time"]),
            "SequelizeMeta" => (Tool::Sequelize, &["name"]),
            "goose_db_version" => (Tool::Goose, &["id", "version_id", "is_applied", "tstamp"]),
            "__diesel_schema_migrations" => (Tool::Diesel, &["version", "run_on"]),
            "refinery_schema_history" => (
                Tool::Refinery,
                &["version", "name", "applied_on", "checksum"],
            ),
            "migrations" | "typeorm_migrations" => {
                let mut cols = f.columns.clone();
                cols.sort();
                if cols == ["id", "name", "timestamp"] {
                    (Tool::TypeOrm, &["id", "timestamp", "name"])
                } else if has_all(f, &["hash", "previous_hash", "filename", "date"]) {
                    (
                        Tool::GraphileMigrate,
                        &["hash", "previous_hash", "filename", "date"],
                    )
                } else if let Some(c) = lookalike() {
                    key_column = Some(c);
                    (Tool::Unknown, &[])
                } else {
                    continue;
                }
            }
            "pgmigrations" => (Tool::NodePgMigrate, &["id", "name", "run_on"]),
            "atlas_schema_revisions" => (
                Tool::Atlas,
                &[
                    "version",
                    "description",
                    "type",
                    "applied",
                    "total",
                    "executed_at",
                    "execution_time",
                    "error",
                    "hash",
                ],
            ),
            "changes" => {
                if !has_all(
                    f,
                    &[
                        "change_id",
                        "change",
                        "project",
                        "committed_at",
                        "script_hash",
                    ],
                ) {
                    continue;
                }
                (
                    Tool::Sqitch,
                    &[
                        "change_id",
                        "change",
                        "project",
                        "committed_at",
                        "script_hash",
                    ],
                )
            }
            _ => match lookalike() {
                Some(c) => {
                    key_column = Some(c);
                    (Tool::Unknown, &[])
                }
                None => continue,
            },
        };
        let unexpected = (!has_all(f, required)).then(|| {
            format!(
                "a table named {} exists but lacks {}'s columns ({}), so it is not read",
                f.table,
                tool.label(),
                required.join(", ")
            )
        });
        out.push(Detected {
            tool,
            schema: f.schema.clone(),
            table: f.table.clone(),
            readable: f.readable,
            lock_table: match tool {
                Tool::Liquibase => sibling(&f.schema, "databasechangeloglock"),
                Tool::Knex => sibling(&f.schema, "knex_migrations_lock"),
                Tool::Sqitch => sibling(&f.schema, "events"),
                _ => None,
            },
            metadata_table: match tool {
                Tool::Rails => sibling(&f.schema, "ar_internal_metadata"),
                _ => None,
            },
            unexpected,
            key_column,
        });
    }
    out
}

/// `"schema"."table"`, quoted.
pub fn qualified(schema: &str, table: &str) -> String {
    format!(
        "{}.{}",
        crate::state::quote_ident(schema),
        crate::state::quote_ident(table)
    )
}

/// The rows of a tool's table, newest `ROW_LIMIT` first, in one shape:
/// version, name, applied at, applied at as text (refinery), duration in ms,
/// checksum, state, note, logs, and the table's total row count.
fn rows_sql(tool: Tool, t: &str, key_column: Option<&str>) -> String {
    let l = ROW_LIMIT;
    let cols = |version: &str,
                name: &str,
                at: &str,
                at_text: &str,
                ms: &str,
                sum: &str,
                state: &str,
                note: &str,
                logs: &str| {
        format!(
            "SELECT ({version})::text, ({name})::text, ({at})::timestamptz, ({at_text})::text, \
                    ({ms})::float8, ({sum})::text, ({state})::text, ({note})::text, ({logs})::text, \
                    count(*) OVER ()"
        )
    };
    match tool {
        Tool::Sqlx => format!(
            "{} FROM {t} ORDER BY version DESC LIMIT {l}",
            cols(
                "version",
                "description",
                "installed_on",
                "NULL",
                "execution_time / 1000000.0",
                "encode(checksum, 'hex')",
                "CASE WHEN success THEN 'applied' ELSE 'failed' END",
                "''",
                "NULL"
            )
        ),
        Tool::Prisma => format!(
            "{} FROM {t} ORDER BY started_at DESC, migration_name DESC LIMIT {l}",
            cols(
                "migration_name",
                "''",
                "coalesce(finished_at, started_at)",
                "NULL",
                "extract(epoch FROM (finished_at - started_at)) * 1000",
                "checksum",
                "CASE WHEN rolled_back_at IS NOT NULL THEN 'rolled_back' \
                      WHEN finished_at IS NULL THEN 'failed' ELSE 'applied' END",
                "'steps applied: ' || coalesce(applied_steps_count::text, '?') \
                 || coalesce(', rolled back ' || to_char(rolled_back_at::timestamptz AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || ' UTC', '')",
                "logs"
            )
        ),
        Tool::Drizzle => format!(
            "{} FROM {t} ORDER BY created_at DESC NULLS LAST, id DESC LIMIT {l}",
            cols(
                "created_at",
                "''",
                "to_timestamp(created_at / 1000.0)",
                "NULL",
                "NULL",
                "hash",
                "'applied'",
                "'id ' || id",
                "NULL"
            )
        ),
        Tool::Flyway => format!(
            "{} FROM {t} ORDER BY installed_rank DESC LIMIT {l}",
            cols(
                "coalesce(version, '')",
                "description",
                "installed_on",
                "NULL",
                "execution_time",
                "checksum",
                "CASE WHEN success THEN 'applied' ELSE 'failed' END",
                "type || ' · ' || script",
                "NULL"
            )
        ),
        Tool::Liquibase => format!(
            "{} FROM {t} ORDER BY orderexecuted DESC, dateexecuted DESC LIMIT {l}",
            cols(
                "id",
                "filename",
                "dateexecuted",
                "NULL",
                "NULL",
                "md5sum",
                "CASE upper(exectype) WHEN 'EXECUTED' THEN 'applied' WHEN 'RERAN' THEN 'applied' \
                      WHEN 'FAILED' THEN 'failed' WHEN 'SKIPPED' THEN 'skipped' \
                      WHEN 'MARK_RAN' THEN 'marked' ELSE lower(exectype) END",
                "'by ' || author || coalesce(' · ' || nullif(description, ''), '') \
                 || coalesce(' · tag ' || nullif(tag, ''), '') || ' · ' || exectype",
                "NULL"
            )
        ),
        Tool::GolangMigrate => format!(
            "{} FROM {t} ORDER BY version DESC LIMIT {l}",
            cols(
                "version",
                "''",
                "NULL",
                "NULL",
                "NULL",
                "NULL",
                "CASE WHEN dirty THEN 'dirty' ELSE 'applied' END",
                "''",
                "NULL"
            )
        ),
        Tool::Unknown => {
            let k = crate::state::quote_ident(key_column.unwrap_or("version"));
            format!(
                "{} FROM {t} ORDER BY length({k}::text) DESC, {k}::text DESC LIMIT {l}",
                cols(
                    &k,
                    "''",
                    "NULL",
                    "NULL",
                    "NULL",
                    "NULL",
                    "'applied'",
                    "''",
                    "NULL"
                )
            )
        }
        Tool::NodePgMigrate => format!(
            "{} FROM {t} ORDER BY id DESC LIMIT {l}",
            cols(
                "name",
                "''",
                "run_on",
                "NULL",
                "NULL",
                "NULL",
                "'applied'",
                "''",
                "NULL"
            )
        ),
        Tool::Atlas => format!(
            "{} FROM {t} WHERE version NOT LIKE '.%' ORDER BY executed_at DESC, version DESC LIMIT {l}",
            cols(
                "version",
                "description",
                "executed_at",
                "NULL",
                "execution_time / 1000000.0",
                "hash",
                "CASE WHEN coalesce(error, '') <> '' OR applied < total THEN 'failed' ELSE 'applied' END",
                "applied || ' of ' || total || ' statements applied'",
                "nullif(concat_ws(E'\\n', nullif(error, ''), nullif(error_stmt, '')), '')"
            )
        ),
        Tool::Sqitch => format!(
            "{} FROM {t} ORDER BY committed_at DESC LIMIT {l}",
            cols(
                "change",
                "project",
                "committed_at",
                "NULL",
                "NULL",
                "script_hash",
                "'applied'",
                "coalesce(nullif(note, ''), '')",
                "NULL"
            )
        ),
        Tool::GraphileMigrate => format!(
            "{} FROM {t} ORDER BY date DESC, filename DESC LIMIT {l}",
            cols(
                "filename",
                "''",
                "date",
                "NULL",
                "NULL",
                "hash",
                "'applied'",
                "''",
                "NULL"
            )
        ),
        Tool::Rails | Tool::Dbmate => format!(
            "{} FROM {t} ORDER BY length(version::text) DESC, version::text DESC LIMIT {l}",
            cols(
                "version",
                "''",
                "NULL",
                "NULL",
                "NULL",
                "NULL",
                "'applied'",
                "''",
                "NULL"
            )
        ),
        Tool::Django => format!(
            "{} FROM {t} ORDER BY id DESC LIMIT {l}",
            cols(
                "app",
                "name",
                "applied",
                "NULL",
                "NULL",
                "NULL",
                "'applied'",
                "''",
                "NULL"
            )
        ),
        Tool::Alembic => format!(
            "{} FROM {t} ORDER BY version_num DESC LIMIT {l}",
            cols(
                "version_num",
                "''",
                "NULL",
                "NULL",
                "NULL",
                "NULL",
                "'applied'",
                "''",
                "NULL"
            )
        ),
        Tool::Knex => format!(
            "{} FROM {t} ORDER BY id DESC LIMIT {l}",
            cols(
                "name",
                "''",
                "migration_time",
                "NULL",
                "NULL",
                "NULL",
                "'applied'",
                "'batch ' || batch",
                "NULL"
            )
        ),
        Tool::Sequelize => format!(
            "{} FROM {t} ORDER BY name DESC LIMIT {l}",
            cols(
                "name",
                "''",
                "NULL",
                "NULL",
                "NULL",
                "NULL",
                "'applied'",
                "''",
                "NULL"
            )
        ),
        Tool::Goose => format!(
            "{} FROM {t} WHERE version_id <> 0 ORDER BY id DESC LIMIT {l}",
            cols(
                "version_id",
                "''",
                "tstamp",
                "NULL",
                "NULL",
                "NULL",
                "CASE WHEN is_applied THEN 'applied' ELSE 'down' END",
                "''",
                "NULL"
            )
        ),
        Tool::Diesel => format!(
            "{} FROM {t} ORDER BY version DESC LIMIT {l}",
            cols(
                "version",
                "''",
                "run_on",
                "NULL",
                "NULL",
                "NULL",
                "'applied'",
                "''",
                "NULL"
            )
        ),
        Tool::Refinery => format!(
            "{} FROM {t} ORDER BY version DESC LIMIT {l}",
            cols(
                "version",
                "name",
                "NULL",
                "applied_on",
                "NULL",
                "checksum",
                "'applied'",
                "''",
                "NULL"
            )
        ),
        Tool::TypeOrm => format!(
            "{} FROM {t} ORDER BY id DESC LIMIT {l}",
            cols(
                "\"timestamp\"",
                "name",
                "NULL",
                "NULL",
                "NULL",
                "NULL",
                "'applied'",
                "''",
                "NULL"
            )
        ),
    }
}

type Row = (
    Option<String>,
    Option<String>,
    Option<DateTime<Utc>>,
    Option<String>,
    Option<f64>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    i64,
);

/// Reads a tool's table: its rows in applied order (oldest first) and the total
/// number of rows.
pub async fn read_rows(
    conn: &mut PgConnection,
    d: &Detected,
) -> Result<(Vec<Applied>, i64), sqlx::Error> {
    let sql = rows_sql(
        d.tool,
        &qualified(&d.schema, &d.table),
        d.key_column.as_deref(),
    );
    let rows: Vec<Row> = sqlx::query_as(&sql).fetch_all(conn).await?;
    let total = rows.first().map(|r| r.9).unwrap_or(0);
    let mut out: Vec<Applied> = rows
        .into_iter()
        .map(
            |(version, name, at, at_text, ms, sum, state, note, logs, _)| {
                let applied_at = at.or_else(|| {
                    at_text.as_deref().and_then(|t| {
                        DateTime::parse_from_rfc3339(t.trim())
                            .ok()
                            .map(|d| d.with_timezone(&Utc))
                    })
                });
                Applied {
                    version: version.unwrap_or_default(),
                    name: name.unwrap_or_default(),
                    applied_at,
                    duration_ms: ms,
                    checksum: sum.filter(|s| !s.is_empty()),
                    state: RowState::from_sql(state.as_deref().unwrap_or("applied")),
                    note: note.unwrap_or_default(),
                    logs: logs.filter(|l| !l.trim().is_empty()),
                }
            },
        )
        .collect();
    out.reverse();
    Ok((out, total))
}

/// A held Liquibase lock: who holds it and since when.
pub async fn liquibase_lock(
    conn: &mut PgConnection,
    schema: &str,
    table: &str,
) -> Result<Option<String>, sqlx::Error> {
    let row: Option<(Option<String>, Option<DateTime<Utc>>)> = sqlx::query_as(&format!(
        "SELECT lockedby::text, lockgranted::timestamptz FROM {} \
          WHERE locked::text IN ('true', '1', 't') LIMIT 1",
        qualified(schema, table)
    ))
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|(by, at)| {
        let mut s = "the Liquibase lock is held".to_string();
        if let Some(by) = by {
            s.push_str(&format!(" by {by}"));
        }
        if let Some(at) = at {
            s.push_str(&format!(" since {}", crate::fmt::time(&at)));
        }
        s.push_str(
            " (left by a run that crashed, or one running now; `liquibase release-locks` clears a stale one)",
        );
        s
    }))
}

/// A held Knex lock.
pub async fn knex_lock(
    conn: &mut PgConnection,
    schema: &str,
    table: &str,
) -> Result<Option<String>, sqlx::Error> {
    let held: bool = sqlx::query_scalar(&format!(
        "SELECT EXISTS (SELECT 1 FROM {} WHERE is_locked::int = 1)",
        qualified(schema, table)
    ))
    .fetch_one(conn)
    .await?;
    Ok(held.then(|| {
        "the Knex migration lock is held (is_locked = 1): a run that crashed, or one running now; `knex migrate:unlock` clears a stale one"
            .to_string()
    }))
}

/// Rails' environment from `ar_internal_metadata`.
pub async fn rails_environment(
    conn: &mut PgConnection,
    schema: &str,
    table: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(&format!(
        "SELECT value::text FROM {} WHERE key = 'environment' LIMIT 1",
        qualified(schema, table)
    ))
    .fetch_optional(conn)
    .await
    .map(Option::flatten)
}

/// Sqitch deploys that failed and were not deployed later (`sqitch.events`), as
/// failed rows.
pub async fn sqitch_failures(
    conn: &mut PgConnection,
    schema: &str,
    events: &str,
) -> Result<Vec<Applied>, sqlx::Error> {
    let rows: Vec<(String, String, DateTime<Utc>)> = sqlx::query_as(&format!(
        "SELECT e.change::text, e.project::text, e.committed_at::timestamptz FROM {t} e
          WHERE e.event = 'fail'
            AND NOT EXISTS (SELECT 1 FROM {t} d WHERE d.change = e.change AND d.project = e.project
                              AND d.event = 'deploy' AND d.committed_at > e.committed_at)
          ORDER BY e.committed_at LIMIT 50",
        t = qualified(schema, events)
    ))
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(change, project, at)| Applied {
            version: change,
            name: project,
            applied_at: Some(at),
            duration_ms: None,
            checksum: None,
            state: RowState::Failed,
            note: "fail event in sqitch.events; Sqitch reverted it".into(),
            logs: None,
        })
        .collect())
}
