//! Restoring a PostgreSQL backup (PRODUCT C5): into a NEW database on the
//! backup's own target or another one (not destructive), or OVER an existing
//! database (the approved action [`RestoreOver`], on any PostgreSQL target).
//!
//! - [`request`] does every check a person can act on before anything is created
//!   (the backup is good and of PostgreSQL, its artifact is there with the
//!   recorded size — and, for artifacts up to [`SYNC_CHECKSUM_LIMIT`], the
//!   recorded checksum — the name is valid and free, the options make sense, the
//!   installed `pg_restore` is new enough for the archive) and writes the `queued`
//!   row, its job and the job's `restore.run` operation in one transaction; a
//!   refusal is logged as a failed `restore.run`.
//! - The job ([`RestoreJob`], run by any dbops replica through [`crate::jobs`])
//!   re-reads the artifact and re-checks its checksum (always, before anything is
//!   created or dropped), creates the database (or, over one: takes a safety
//!   backup, optionally ends the other sessions), runs `pg_restore -j N` (or, for
//!   a plain SQL script, `psql -v ON_ERROR_STOP=1` on stdin) with the chosen
//!   options, and counts rows per table into `result`, next to the backup's own
//!   counts. A failed restore into a new database drops it. Progress goes into
//!   the row every two seconds; the job's row is the lease.
//! - [`sweep`] ends restores whose job ended without them (the runner died).
//!
//! Over 600 lines: a restore's row, options, request checks and artifact checks are
//! shared by the runner, the swap and the approval action (which have files of
//! their own).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

mod leftovers;
mod over;
pub mod redis;
pub(crate) mod run;
pub mod swap;

pub use leftovers::{drop_expired_previous, drop_leftovers, sweep};
pub use over::{OverMethod, RestoreOver};
pub use run::{JOB_KIND, RestoreJob, run};

use crate::{
    audit::{self, AuditCtx, Entry},
    backups::Backup,
    config::TargetKind,
    jobs::{self, JobCtx, JobKind, Progress},
    pg_tools::{self, Format, PgConn, RestoreTo},
    state::{AppState, quote_ident},
    storage::compress,
    targets::Target,
};

/// Artifacts up to this size have their checksum re-checked while the request
/// waits (refused on the form); larger ones as the first step of the restore,
/// still before any database is created.
pub const SYNC_CHECKSUM_LIMIT: u64 = 64 * 1024 * 1024;

/// A row of `restores`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Restore {
    pub id: i64,
    /// The backup restored; `None` for a database replaced by a recovered one
    /// (`recovery_id`).
    pub backup_id: Option<i64>,
    pub target: String,
    pub database: String,
    pub mode: String,
    pub status: String,
    pub phase: Option<String>,
    pub jobs: i32,
    pub progress_bytes: i64,
    pub progress_items: i64,
    pub progress_total: i64,
    pub requested_by_name: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
    pub result: Option<Value>,
    pub operation_id: Option<i64>,
    pub safety_backup_id: Option<i64>,
    pub end_sessions: bool,
    pub options: Value,
    pub job_id: Option<i64>,
    /// The target the backup was taken of (`target` is where it is restored).
    pub source_target: String,
    /// Over a database: `swap` or `in_place` (see [`OverMethod`]).
    pub method: Option<String>,
    /// The database restored into beside the live one (swap).
    pub work_database: Option<String>,
    /// The name the replaced database is kept under (after a swap back: the
    /// restored one).
    pub previous_database: Option<String>,
    pub swapped_at: Option<DateTime<Utc>>,
    pub swapped_back_at: Option<DateTime<Utc>>,
    pub previous_dropped_at: Option<DateTime<Utc>>,
    pub previous_dropped_by: Option<String>,
    /// For `pitr.replace`: the point-in-time recovery copied, and its database.
    pub recovery_id: Option<i64>,
    pub source_database: Option<String>,
}

/// The row's columns; the phase and the progress are its job's.
const COLUMNS: &str = "id, backup_id, target, database, mode, status, \
     (SELECT j.phase FROM jobs j WHERE j.id = restores.job_id) AS phase, jobs, \
     coalesce((SELECT j.bytes FROM jobs j WHERE j.id = restores.job_id), progress_bytes) AS progress_bytes, \
     coalesce((SELECT j.done FROM jobs j WHERE j.id = restores.job_id), progress_items) AS progress_items, \
     progress_total, requested_by_name, created_at, started_at, finished_at, \
     error, result, operation_id, \
     safety_backup_id, end_sessions, options, job_id, source_target, method, work_database, previous_database, \
     swapped_at, swapped_back_at, previous_dropped_at, previous_dropped_by, recovery_id, source_database";

impl Restore {
    /// What was restored, in words: `backup #12`, or `database shop of recovery #3`.
    pub fn source(&self) -> String {
        match (self.backup_id, self.recovery_id) {
            (Some(b), _) => format!("backup #{b}"),
            (None, Some(r)) => format!(
                "database {} of recovery #{r}",
                self.source_database.as_deref().unwrap_or("?")
            ),
            (None, None) => "nothing recorded".into(),
        }
    }

    /// The page of what was restored.
    pub fn source_url(&self) -> String {
        match (self.backup_id, self.recovery_id) {
            (Some(b), _) => format!("/backups/{b}"),
            (None, Some(r)) => format!("/targets/{}/pitr/recoveries/{r}", self.source_target),
            (None, None) => "/restores".into(),
        }
    }

    pub fn is_active(&self) -> bool {
        matches!(self.status.as_str(), "queued" | "running")
    }

    /// The database this restore replaced (or, after a swap back, the restored
    /// one), while it is kept.
    pub fn kept_database(&self) -> Option<&str> {
        match (self.swapped_at, self.previous_dropped_at) {
            (Some(_), None) => self.previous_database.as_deref(),
            _ => None,
        }
    }

    /// Swapped in and not swapped back: "swap back" is possible.
    pub fn can_swap_back(&self) -> bool {
        self.kept_database().is_some() && self.swapped_back_at.is_none()
    }

    /// `12.3 s`, `4 min 5 s`.
    pub fn duration(&self) -> String {
        let Some(start) = self.started_at else {
            return String::new();
        };
        crate::fmt::elapsed(start, self.finished_at)
    }

    /// `3 of 5 tables`, or just `3 tables` when the total is unknown.
    pub fn progress(&self) -> String {
        match self.progress_total {
            0 => format!("{} tables", self.progress_items),
            t => format!("{} of {t} tables", self.progress_items.min(t)),
        }
    }

    pub fn bytes_read(&self) -> String {
        crate::fmt::bytes(self.progress_bytes)
    }

    /// The restored tables with their row counts and, when the backup recorded
    /// them (its test restore), the backup's counts, from the result.
    pub fn tables(&self) -> Vec<(String, i64, Option<i64>)> {
        let Some(r) = self.result.as_ref() else {
            return vec![];
        };
        let recorded = r["backup_row_counts"].as_object();
        r["row_counts"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(t, n)| {
                        let b = recorded.and_then(|b| b.get(t)).and_then(Value::as_i64);
                        (t.clone(), n.as_i64().unwrap_or(0), b)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The options a person chose, in words (empty for the defaults).
    pub fn options_text(&self) -> String {
        serde_json::from_value::<RestoreOptions>(self.options.clone())
            .map(|o| o.describe())
            .unwrap_or_default()
    }

    /// The total rows restored, when finished.
    pub fn rows(&self) -> Option<i64> {
        self.result.as_ref().and_then(|r| r["rows"].as_i64())
    }

    /// What the comparison with the backup's test restore said, if there was one.
    pub fn comparison(&self) -> Option<String> {
        self.result
            .as_ref()
            .and_then(|r| r["compared_with_test_restore"].as_str())
            .map(str::to_string)
    }
}

/// Why a restore was refused.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// A sentence for the person who asked (shown on the form).
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

impl From<RestoreError> for crate::error::AppError {
    fn from(e: RestoreError) -> Self {
        match e {
            RestoreError::Refused(m) => crate::error::AppError::BadRequest(m),
            RestoreError::Db(d) => d.into(),
        }
    }
}

/// A name for a new database: `^[a-z_][a-z0-9_]{0,62}$` (so it never needs
/// quoting to be typed back, and fits PostgreSQL's 63-byte limit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseName(String);

impl DatabaseName {
    pub fn parse(s: &str) -> Result<DatabaseName, String> {
        let s = s.trim();
        let mut chars = s.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
        let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if first_ok && rest_ok && s.len() <= 63 {
            Ok(DatabaseName(s.to_string()))
        } else {
            Err(format!(
                "“{s}” is not a valid name for a new database: use 1 to 63 lowercase letters, digits and underscores, not starting with a digit."
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The default number of parallel `pg_restore` jobs: the CPUs here, at most 8.
pub fn default_jobs() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
        .clamp(1, 8)
}

/// The `pg_restore` options a person can choose; stored with the restore.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RestoreOptions {
    /// Only the definitions (`--schema-only`).
    #[serde(default)]
    pub schema_only: bool,
    /// Only the rows, into tables that exist (`--data-only`).
    #[serde(default)]
    pub data_only: bool,
    /// Only these schemas (`--schema`, each).
    #[serde(default)]
    pub schemas: Vec<String>,
    /// Only these tables (`--table`, each; pg_restore matches the name exactly).
    #[serde(default)]
    pub tables: Vec<String>,
    /// Skip ownership and privileges (`--no-owner --no-privileges`): the restored
    /// objects belong to the role that restores. The default.
    #[serde(default = "yes")]
    pub no_owner: bool,
    /// Restore as this role (`--role`: `SET ROLE` after connecting).
    #[serde(default)]
    pub role: Option<String>,
    /// All or nothing (`--single-transaction`, or `psql --single-transaction`);
    /// runs with one job.
    #[serde(default)]
    pub single_transaction: bool,
}

fn yes() -> bool {
    true
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            schema_only: false,
            data_only: false,
            schemas: vec![],
            tables: vec![],
            no_owner: true,
            role: None,
            single_transaction: false,
        }
    }
}

/// A schema, table or role name as typed: 1 to 63 bytes, no control characters
/// (it goes to pg_restore as one argument, never through a shell or into SQL).
pub(crate) fn name_ok(what: &str, n: &str) -> Result<(), String> {
    if n.is_empty() || n.len() > 63 || n.chars().any(char::is_control) {
        return Err(format!(
            "“{}” is not a {what} name: 1 to 63 characters, no control characters.",
            n.escape_debug()
        ));
    }
    Ok(())
}

impl RestoreOptions {
    /// Parses comma- or space-separated lists of names.
    pub fn names(list: &str) -> Vec<String> {
        list.split([',', '\n'])
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// Checks the options against each other and the backup's format.
    pub fn validate(&self, format: Format) -> Result<(), String> {
        if self.schema_only && self.data_only {
            return Err("Choose schema only or data only, not both.".into());
        }
        for s in &self.schemas {
            name_ok("schema", s)?;
        }
        for t in &self.tables {
            name_ok("table", t)?;
        }
        if let Some(r) = &self.role {
            name_ok("role", r)?;
        }
        if format == Format::Plain && self.selective() {
            return Err(
                "A plain SQL backup is one script: it restores whole. Schema only, data only, and schema or table \
                 selection need a custom or directory format backup."
                    .into(),
            );
        }
        Ok(())
    }

    pub fn selective(&self) -> bool {
        self.schema_only || self.data_only || !self.schemas.is_empty() || !self.tables.is_empty()
    }

    /// The pg_restore arguments (each one argument; no shell).
    pub fn args(&self) -> Vec<String> {
        let mut a = vec![];
        if self.schema_only {
            a.push("--schema-only".into());
        }
        if self.data_only {
            a.push("--data-only".into());
        }
        for s in &self.schemas {
            a.push(format!("--schema={s}"));
        }
        for t in &self.tables {
            a.push(format!("--table={t}"));
        }
        if let Some(r) = &self.role {
            a.push(format!("--role={r}"));
        }
        if self.single_transaction {
            a.push("--single-transaction".into());
        }
        a
    }

    /// In words, for pages and the approval (empty for the defaults).
    pub fn describe(&self) -> String {
        let mut parts = vec![];
        if self.schema_only {
            parts.push("schema only".to_string());
        }
        if self.data_only {
            parts.push("data only".to_string());
        }
        if !self.schemas.is_empty() {
            parts.push(format!("schemas {}", self.schemas.join(", ")));
        }
        if !self.tables.is_empty() {
            parts.push(format!("tables {}", self.tables.join(", ")));
        }
        if !self.no_owner {
            parts.push("keeping owners and privileges".into());
        }
        if let Some(r) = &self.role {
            parts.push(format!("as role {r}"));
        }
        if self.single_transaction {
            parts.push("in a single transaction".into());
        }
        parts.join("; ")
    }

    /// Reads the options from a form's fields (`schema_only`, `data_only`,
    /// `schemas`, `tables`, `keep_owner`, `role`, `single_transaction`).
    pub fn from_form(form: &BTreeMap<String, String>) -> RestoreOptions {
        let on = |k: &str| {
            form.get(k)
                .map(|v| v.trim().to_lowercase())
                .is_some_and(|v| matches!(v.as_str(), "on" | "true" | "yes" | "1"))
        };
        let text = |k: &str| {
            form.get(k)
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        RestoreOptions {
            schema_only: on("schema_only"),
            data_only: on("data_only"),
            schemas: Self::names(&text("schemas")),
            tables: Self::names(&text("tables")),
            no_owner: !on("keep_owner"),
            role: Some(text("role")).filter(|r| !r.is_empty()),
            single_transaction: on("single_transaction"),
        }
    }
}

/// What a person asks for.
#[derive(Debug, Clone)]
pub struct RestoreRequest {
    pub backup_id: i64,
    /// The new database's name (checked here).
    pub database: String,
    /// Parallel jobs; `None` for [`default_jobs`].
    pub jobs: Option<u32>,
    /// The target to restore into; `None` for the backup's own.
    pub target: Option<String>,
    pub options: RestoreOptions,
}

pub async fn find(db: &sqlx::PgPool, id: i64) -> Result<Option<Restore>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM restores WHERE id = $1"))
        .bind(id)
        .fetch_optional(db)
        .await
}

/// The restores of one backup, newest first.
pub async fn for_backup(db: &sqlx::PgPool, backup_id: i64) -> Result<Vec<Restore>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM restores WHERE backup_id = $1 ORDER BY id DESC LIMIT 50"
    ))
    .bind(backup_id)
    .fetch_all(db)
    .await
}

/// The row, job and operation of a restore, written in one transaction.
struct NewRestore<'a> {
    backup: &'a Backup,
    target: &'a str,
    database: &'a str,
    mode: &'a str,
    jobs: u32,
    end_sessions: bool,
    options: &'a RestoreOptions,
    /// For an approved restore: the action's operation and request, which the
    /// job ends.
    approved: Option<(i64, i64)>,
}

/// Writes the `queued` restore and queues its job. Returns the restore's and the
/// job's ids.
async fn insert(
    state: &AppState,
    ctx: &AuditCtx,
    n: NewRestore<'_>,
) -> Result<(i64, i64), RestoreError> {
    let total = n
        .backup
        .verification
        .as_ref()
        .and_then(|v| v["table_data"].as_i64())
        .unwrap_or(0);
    let jobs = if n.options.single_transaction {
        1
    } else {
        n.jobs
    };
    let mut tx = state.db.begin().await?;
    let rid: i64 = match sqlx::query_scalar(
        "INSERT INTO restores (backup_id, target, source_target, database, mode, status, jobs, progress_total,
                               requested_by, requested_by_name, end_sessions, options)
         VALUES ($1, $2, $3, $4, $5, 'queued', $6, $7, $8, $9, $10, $11) RETURNING id",
    )
    .bind(n.backup.id)
    .bind(n.target)
    .bind(&n.backup.target)
    .bind(n.database)
    .bind(n.mode)
    .bind(jobs as i32)
    .bind(total)
    .bind(ctx.actor.id)
    .bind(&ctx.actor.name)
    .bind(n.end_sessions)
    .bind(serde_json::to_value(n.options).unwrap_or_default())
    .fetch_one(&mut *tx)
    .await
    {
        Ok(id) => id,
        Err(sqlx::Error::Database(d)) if d.is_unique_violation() => {
            return Err(RestoreError::Refused(format!(
                "A restore into {} on {} is already running.",
                n.database, n.target
            )));
        }
        Err(e) => return Err(e.into()),
    };
    let params = json!({
        "restore_id": rid, "backup_id": n.backup.id, "source_target": n.backup.target,
        "database": n.database, "mode": n.mode, "jobs": jobs, "end_sessions": n.end_sessions,
        "options": n.options,
    });
    let (job, op) = jobs::submit_in(
        &mut tx,
        state,
        ctx,
        jobs::NewJob {
            kind: JOB_KIND,
            target: n.target,
            params,
            operation: n.approved.map(|(op, _)| op),
            approval: n.approved.map(|(_, a)| a),
            run_here: false,
        },
    )
    .await?;
    sqlx::query("UPDATE restores SET operation_id = $2, job_id = $3 WHERE id = $1")
        .bind(rid)
        .bind(op)
        .bind(job)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok((rid, job))
}

/// Checks everything that can be checked before anything is created, then writes
/// the `queued` restore, its job and the job's running `restore.run` operation in
/// one transaction. A refusal is logged as a failed `restore.run` and returned as
/// [`RestoreError::Refused`]. Returns the restore's id.
pub async fn request(
    state: &AppState,
    ctx: &AuditCtx,
    req: &RestoreRequest,
) -> Result<i64, RestoreError> {
    let backup = crate::backups::find(&state.db, req.backup_id).await?;
    let into = req
        .target
        .clone()
        .or_else(|| backup.as_ref().map(|b| b.target.clone()));
    let params = json!({
        "backup_id": req.backup_id, "database": req.database, "mode": "new_database", "jobs": req.jobs,
        "options": req.options,
    });
    let refused = |msg: String| async {
        let mut entry = Entry::new("restore.run")
            .params(params.clone())
            .failed(msg.clone());
        entry.target = into.clone();
        audit::record(&state.db, ctx, entry).await?;
        Err::<i64, _>(RestoreError::Refused(msg))
    };
    let target = match check(state, backup.as_ref(), req).await {
        Ok(t) => t,
        Err(RestoreError::Refused(msg)) => return refused(msg).await,
        Err(e) => return Err(e),
    };
    let backup = backup.expect("checked");
    let n = NewRestore {
        backup: &backup,
        target: target.name(),
        database: req.database.trim(),
        mode: "new_database",
        jobs: req.jobs.unwrap_or_else(default_jobs),
        end_sessions: false,
        options: &req.options,
        approved: None,
    };
    match insert(state, ctx, n).await {
        Ok((id, _)) => Ok(id),
        Err(RestoreError::Refused(msg)) => refused(msg).await,
        Err(e) => Err(e),
    }
}

/// The checks every restore makes before it is queued: the backup is good, of
/// PostgreSQL, its artifact there (and, when small, of the recorded checksum),
/// the options sensible, the target known, and its tools able to read the
/// archive.
async fn check_backup(
    state: &AppState,
    backup: Option<&Backup>,
    backup_id: i64,
    into: &str,
    options: &RestoreOptions,
) -> Result<Arc<Target>, RestoreError> {
    let refuse = |m: String| Err(RestoreError::Refused(m));
    let Some(b) = backup else {
        return refuse(format!("There is no backup #{backup_id}."));
    };
    if b.status != "good" {
        return refuse(format!(
            "Backup #{} is {}: only a good backup can be restored.",
            b.id, b.status
        ));
    }
    if b.method != "pg_dump" {
        return refuse(format!(
            "Backup #{} is a Redis backup: restore it from the Redis restore page.",
            b.id
        ));
    }
    let format = Format::parse(&b.format).unwrap_or(Format::Custom);
    options.validate(format).map_err(RestoreError::Refused)?;
    let Some(target) = state.targets.get(into) else {
        return refuse(format!("There is no target called {into}."));
    };
    if target.kind() != TargetKind::Postgres {
        return refuse(format!(
            "{into} is a Redis server: a PostgreSQL backup is restored into a PostgreSQL target."
        ));
    }
    // The restoring tool must read what the dumping tool wrote: pg_restore (or
    // psql) at least as new as the pg_dump of the backup.
    let tool = if format == Format::Plain {
        "psql"
    } else {
        "pg_restore"
    };
    if let Some(dumped) = dump_major(b) {
        let newest = pg_tools::installed(tool).iter().map(|t| t.major).max();
        match newest {
            Some(n) if n >= dumped => {}
            Some(n) => {
                return refuse(format!(
                    "Backup #{} was written by pg_dump {dumped}, but the newest {tool} here is version {n}: an older \
                     {tool} cannot read it. Install postgresql-client-{dumped} on the dbops machine.",
                    b.id
                ));
            }
            None => {
                return refuse(format!(
                    "{tool} is not installed on the dbops machine: install postgresql-client-{dumped}."
                ));
            }
        }
    }
    check_artifact(state, b)
        .await
        .map_err(RestoreError::Refused)?;
    Ok(target)
}

/// The artifact of a backup is there, of the recorded size, and (when small
/// enough to read while a person waits) of the recorded checksum; larger ones are
/// re-checked as the restore's first step, before anything is touched.
pub(crate) async fn check_artifact(state: &AppState, b: &Backup) -> Result<(), String> {
    let refuse = |m: String| Err(m);
    let storage = state.storage_for(&b.storage)?;
    let (Some(key), Some(bytes), Some(sha)) = (&b.storage_key, b.bytes, &b.sha256) else {
        return refuse(format!("Backup #{} has no artifact.", b.id));
    };
    let size = match storage.size(key).await {
        Ok(s) => s,
        Err(e) => {
            return refuse(format!(
                "The backup file of #{} cannot be found or read ({e}): nothing was restored.",
                b.id
            ));
        }
    };
    if size != bytes as u64 {
        return refuse(format!(
            "The backup file of #{} is {size} bytes but {bytes} were recorded: it was truncated or altered, so it is not restored.",
            b.id
        ));
    }
    if size <= SYNC_CHECKSUM_LIMIT {
        match crate::storage::sha256_of(storage.as_ref(), key).await {
            Ok((found, _)) if found == *sha => {}
            Ok((found, _)) => return refuse(checksum_message(b.id, &found, sha)),
            Err(e) => {
                return refuse(format!(
                    "The backup file of #{} cannot be read ({e}): nothing was restored.",
                    b.id
                ));
            }
        }
    }
    Ok(())
}

/// How long a restore waits for a connection it needs for its work.
const WORK_CONNECT: Duration = Duration::from_secs(15);

/// A connection of its own to `database` on `target` (with the target's
/// credentials), given up after `within`; errors are scrubbed of secrets.
pub(crate) async fn connect_to(
    target: &Target,
    database: &str,
    within: Duration,
) -> Result<sqlx::PgConnection, String> {
    use secrecy::ExposeSecret;
    let opts = <sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(
        target.config.url.expose_secret(),
    )
    .map_err(|e| target.scrub(&e.to_string()))?
    .database(database);
    tokio::time::timeout(
        within,
        <sqlx::PgConnection as sqlx::Connection>::connect_with(&opts),
    )
    .await
    .map_err(|_| {
        format!(
            "{} did not answer within {} s",
            target.name(),
            within.as_secs()
        )
    })?
    .map_err(|e| target.scrub(&e.to_string()))
}

/// Re-reads a backup's whole artifact and checks it against the recorded size
/// and checksum: the first step of every restore, before anything is created,
/// dropped or written. Returns the bytes read.
pub(crate) async fn reverify(
    storage: &dyn crate::storage::Storage,
    b: &Backup,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<u64, String> {
    progress.set_phase("checking the checksum");
    let key = b.storage_key.clone().unwrap_or_default();
    let mut input = storage
        .open(&key)
        .await
        .map_err(|e| format!("the backup file cannot be read ({e}): nothing was restored"))?;
    let mut damaged = None;
    let (bytes, sha) = match b.compression.as_deref() {
        None => pg_tools::copy_hashed(&mut input, &mut tokio::io::sink(), progress, cancel).await?,
        Some(compress::ZSTD) => {
            // Compressed by dbops: decompressed whole too (zstd's frame checksum
            // and end), so a damaged file is refused before anything is touched.
            // The stored bytes are hashed to their end either way: a file that
            // differs from the one recorded says so first.
            let mut unpacked = compress::Unpacked::new(input);
            match pg_tools::copy_hashed(&mut unpacked, &mut tokio::io::sink(), progress, cancel)
                .await
            {
                Ok(_) => {}
                Err(e) if cancel.is_cancelled() => return Err(e),
                Err(e) => damaged = Some(format!("{e}; nothing was restored")),
            }
            unpacked.finish().await.map_err(|e| {
                format!("the backup file cannot be read ({e}): nothing was restored")
            })?
        }
        Some(other) => {
            return Err(format!(
                "backup #{} is compressed with {other}, which this dbops cannot read: nothing was restored",
                b.id
            ));
        }
    };
    if Some(&sha) != b.sha256.as_ref() || Some(bytes as i64) != b.bytes {
        return Err(checksum_message(
            b.id,
            &sha,
            b.sha256.as_deref().unwrap_or(""),
        ));
    }
    if let Some(e) = damaged {
        return Err(e);
    }
    Ok(bytes)
}

/// The major version of the pg_dump that wrote a backup (`tool_version` is
/// `pg_dump 15`).
fn dump_major(b: &Backup) -> Option<u32> {
    b.tool_version
        .as_deref()?
        .split_whitespace()
        .find_map(|w| w.split('.').next()?.parse().ok())
}

async fn check(
    state: &AppState,
    backup: Option<&Backup>,
    req: &RestoreRequest,
) -> Result<Arc<Target>, RestoreError> {
    let into = req
        .target
        .clone()
        .or_else(|| backup.map(|b| b.target.clone()))
        .unwrap_or_default();
    let name = DatabaseName::parse(&req.database).map_err(RestoreError::Refused)?;
    if let Some(j) = req.jobs
        && !(1..=32).contains(&j)
    {
        return Err(RestoreError::Refused(
            "Parallel jobs must be between 1 and 32.".into(),
        ));
    }
    let target = check_backup(state, backup, req.backup_id, &into, &req.options).await?;
    // The name must be free.
    let pool = target.pg().await.map_err(RestoreError::Refused)?;
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(name.as_str())
        .fetch_optional(&pool)
        .await
        .map_err(|e| RestoreError::Refused(target.scrub(&e.to_string())))?;
    if exists.is_some() {
        return Err(RestoreError::Refused(format!(
            "A database called {} already exists on {}: choose a new name (restoring over an existing database is a separate, approved action).",
            name.as_str(),
            target.name()
        )));
    }
    Ok(target)
}

/// Refuses restoring over `database` of `target` while a backup of it is queued
/// or running: the restore would change what the backup is reading.
pub(crate) async fn refuse_if_being_backed_up(
    state: &AppState,
    target: &Target,
    database: &str,
) -> Result<(), String> {
    use secrecy::ExposeSecret;
    let own = PgConn::from_url(target.config.url.expose_secret())
        .map(|c| c.dbname)
        .unwrap_or_default();
    if own != database {
        return Ok(());
    }
    let running: Option<i64> = sqlx::query_scalar(
        "SELECT id FROM backups WHERE target = $1 AND status IN ('queued', 'running') ORDER BY id LIMIT 1",
    )
    .bind(target.name())
    .fetch_optional(&state.db)
    .await
    .map_err(|e| e.to_string())?;
    match running {
        Some(id) => Err(format!(
            "Backup #{id} of {} is reading the database {database} right now: restoring over it would change what \
             that backup reads. Wait for it to end (or cancel it) and run this again.",
            target.name()
        )),
        None => Ok(()),
    }
}

fn checksum_message(id: i64, found: &str, recorded: &str) -> String {
    format!(
        "The backup file of #{id} does not match its recorded checksum (sha256 {} read, {} recorded): it was altered or damaged, so it is not restored.",
        &found[..12.min(found.len())],
        &recorded[..12.min(recorded.len())]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_names_are_plain_lowercase_identifiers_of_at_most_63_bytes() {
        for ok in ["shop", "_x", "shop_restore_2", &"a".repeat(63)] {
            assert!(DatabaseName::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1shop",
            "Shop",
            "shop-copy",
            "shop\"; DROP",
            "café",
            &"a".repeat(64),
        ] {
            assert!(DatabaseName::parse(bad).is_err(), "{bad}");
        }
        assert!((1..=8).contains(&default_jobs()));
    }
}
