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

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub mod redis;
pub mod swap;

use crate::{
    audit::{self, AuditCtx, Entry},
    backups::Backup,
    config::TargetKind,
    jobs::{self, JobCtx, JobKind, Progress},
    pg_tools::{self, Format, PgConn, RestoreTo},
    state::{AppState, quote_ident},
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
    pub backup_id: i64,
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
    pub heartbeat_at: Option<DateTime<Utc>>,
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
}

/// The row's columns; the phase, the progress and the heartbeat are its job's.
const COLUMNS: &str = "id, backup_id, target, database, mode, status, \
     (SELECT j.phase FROM jobs j WHERE j.id = restores.job_id) AS phase, jobs, \
     coalesce((SELECT j.bytes FROM jobs j WHERE j.id = restores.job_id), progress_bytes) AS progress_bytes, \
     coalesce((SELECT j.done FROM jobs j WHERE j.id = restores.job_id), progress_items) AS progress_items, \
     progress_total, requested_by_name, created_at, started_at, finished_at, \
     (SELECT j.heartbeat_at FROM jobs j WHERE j.id = restores.job_id) AS heartbeat_at, error, result, operation_id, \
     safety_backup_id, end_sessions, options, job_id, source_target, method, work_database, previous_database, \
     swapped_at, swapped_back_at, previous_dropped_at, previous_dropped_by";

impl Restore {
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
fn name_ok(what: &str, n: &str) -> Result<(), String> {
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
    let (bytes, sha) =
        pg_tools::copy_hashed(&mut input, &mut tokio::io::sink(), progress, cancel).await?;
    if Some(&sha) != b.sha256.as_ref() || Some(bytes as i64) != b.bytes {
        return Err(checksum_message(
            b.id,
            &sha,
            b.sha256.as_deref().unwrap_or(""),
        ));
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
async fn refuse_if_being_backed_up(
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

/// The job kind of restores.
pub const JOB_KIND: &str = "restore.run";

/// Runs restores as jobs (any dbops replica may take one).
pub struct RestoreJob;

impl JobKind for RestoreJob {
    fn kind(&self) -> &'static str {
        JOB_KIND
    }

    fn title(&self) -> &'static str {
        "Restore"
    }

    fn run<'a>(&'a self, ctx: &'a JobCtx) -> futures::future::BoxFuture<'a, Result<Value, String>> {
        Box::pin(async move {
            let id = ctx.job.params["restore_id"]
                .as_i64()
                .ok_or("the job names no restore")?;
            run(&ctx.state, id, &ctx.progress, &ctx.cancel).await
        })
    }

    fn subject(&self, job: &jobs::Job) -> Option<(String, String)> {
        job.params["restore_id"]
            .as_i64()
            .map(|id| (format!("restore #{id}"), format!("/restores/{id}")))
    }

    fn result_url(&self, job: &jobs::Job) -> Option<String> {
        job.params["restore_id"]
            .as_i64()
            .map(|id| format!("/restores/{id}"))
    }
}

/// Runs a queued restore to its end: every outcome is written to the restore's
/// row and returned (the job writes it to the operation and the approval).
pub async fn run(
    state: &AppState,
    id: i64,
    progress: &Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<Value, String> {
    let taken: Option<Restore> = sqlx::query_as(&format!(
        "UPDATE restores SET status = 'running', started_at = clock_timestamp()
         WHERE id = $1 AND status = 'queued' RETURNING {COLUMNS}"
    ))
    .bind(id)
    .fetch_optional(&state.db)
    .await
    .map_err(|e| format!("could not start restore #{id}: {e}"))?;
    let Some(restore) = taken else {
        return Err(format!("restore #{id} is not waiting to run"));
    };
    progress.set_phase("starting");
    progress.set_items_total(restore.progress_total.max(0) as u64);
    let outcome = execute(state, &restore, progress, cancel).await;
    finish(state, &restore, cancel, &outcome).await;
    outcome
}

#[tracing::instrument(skip_all, fields(restore = r.id, database = %r.database))]
async fn execute(
    state: &AppState,
    r: &Restore,
    progress: &Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<Value, String> {
    use secrecy::ExposeSecret;
    let backup = crate::backups::find(&state.db, r.backup_id)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("backup #{} is gone", r.backup_id))?;
    if backup.status != "good" {
        return Err(format!(
            "backup #{} is {} now: nothing was restored",
            backup.id, backup.status
        ));
    }
    let target = state
        .targets
        .get(&r.target)
        .ok_or_else(|| format!("there is no target called {} any more", r.target))?;
    let storage = state.storage_for(&backup.storage)?;
    let key = backup.storage_key.clone().unwrap_or_default();
    let format = Format::parse(&backup.format).unwrap_or(Format::Custom);

    // 1. The checksum, re-read whole, before anything is created.
    let bytes = reverify(storage.as_ref(), &backup, progress, cancel).await?;

    // 2. The tool for this server.
    progress.set_phase("connecting");
    let pool = target.pg().await?;
    let server_num: i32 = tokio::time::timeout(
        Duration::from_secs(15),
        sqlx::query_scalar("SELECT current_setting('server_version_num')::int").fetch_one(&pool),
    )
    .await
    .map_err(|_| "the target did not answer within 15 s".to_string())?
    .map_err(|e| crate::targets::postgres::describe_pg_error(&target.scrub(&e.to_string())))?;
    // A plain SQL script is fed to psql; archives go to pg_restore.
    let tool_name = if format == Format::Plain {
        "psql"
    } else {
        "pg_restore"
    };
    let tool = pg_tools::pick(tool_name, (server_num / 10000) as u32)?;
    let conn = PgConn::from_url(target.config.url.expose_secret()).map_err(|e| target.scrub(&e))?;

    let mut options: RestoreOptions = serde_json::from_value(r.options.clone()).unwrap_or_default();
    let method = match r.mode.as_str() {
        "over_database" => Some(OverMethod::for_options(format, &options)),
        _ => None,
    };
    if method == Some(OverMethod::InPlace) {
        // In place is only ever all-or-nothing.
        options.single_transaction = true;
    }
    let names = swap::Names::for_restore(&r.database, r.id);
    // The database the backup is restored into: a new one, the work database
    // beside the live one (swap), or the live one itself (in place).
    let into_db = match method {
        Some(OverMethod::Swap) => names.work.clone(),
        _ => r.database.clone(),
    };
    let mut safety = None;
    let mut preflight = None;
    if let Some(method) = method {
        refuse_if_being_backed_up(state, &target, &r.database)
            .await
            .map_err(|e| format!("{e} Nothing was restored."))?;
        // 3a. Everything that could make the swap impossible, before anything
        // is touched.
        if method == OverMethod::Swap {
            progress.set_phase("checking the server");
            preflight = Some(swap::preflight(&target, &names).await.map_err(|e| {
                format!("{e}. Nothing was restored; {} was not touched.", r.database)
            })?);
        }
        sqlx::query(
            "UPDATE restores SET method = $2, work_database = $3, previous_database = $4 WHERE id = $1",
        )
        .bind(r.id)
        .bind(method.as_str())
        .bind((method == OverMethod::Swap).then_some(&names.work))
        .bind((method == OverMethod::Swap).then_some(&names.previous))
        .execute(&state.db)
        .await
        .map_err(|e| e.to_string())?;
        // 3b. A safety backup of the database as it is (dbops backs up a
        // target's own database; another database of it is protected by the
        // kept previous copy alone).
        if r.database == conn.dbname {
            let id = safety_backup(state, r, progress, cancel).await?;
            safety = Some(id);
        }
        let still: Option<String> = sqlx::query_scalar("SELECT status FROM backups WHERE id = $1")
            .bind(backup.id)
            .fetch_optional(&state.db)
            .await
            .map_err(|e| e.to_string())?;
        if still.as_deref() != Some("good") {
            return Err(format!(
                "backup #{} was removed while the safety backup ran; nothing was restored",
                backup.id
            ));
        }
        if method == OverMethod::InPlace && r.end_sessions {
            progress.set_phase("ending other sessions");
            end_other_sessions(&pool, &target, &r.database, safety).await?;
        }
    }
    // 3c. The database to restore into. If creating a new one fails (it appeared
    // meanwhile), it is not ours and is left alone. Ours from the moment it is
    // asked for: if this restore does not succeed, it (or the sweeper) drops it.
    let creates = method != Some(OverMethod::InPlace);
    if creates {
        sqlx::query("UPDATE restores SET leftover = true WHERE id = $1")
            .bind(r.id)
            .execute(&state.db)
            .await
            .map_err(|e| e.to_string())?;
        progress.set_phase("creating the database");
        let created = match method {
            Some(_) => {
                let mut admin = swap::admin(&target, &[&r.database], WORK_CONNECT).await?;
                let made = swap::create_work(&mut admin, &target, &names).await;
                let _ = sqlx::Connection::close(admin).await;
                made
            }
            None => sqlx::query(&format!("CREATE DATABASE {}", quote_ident(&into_db)))
                .execute(&pool)
                .await
                .map(|_| ())
                .map_err(|e| {
                    format!(
                        "cannot create the database {} (the target's role needs CREATEDB): {}",
                        r.database,
                        target.scrub(&e.to_string())
                    )
                }),
        };
        if let Err(e) = created {
            let _ = sqlx::query("UPDATE restores SET leftover = false WHERE id = $1")
                .bind(r.id)
                .execute(&state.db)
                .await;
            return Err(e);
        }
    }
    let restored = async {
        if !options.schemas.is_empty() && !options.data_only {
            // pg_restore --schema restores what is in a schema, not the schema
            // itself: without this, a schema other than public fails to restore.
            progress.set_phase("creating the schemas");
            let mut c = connect_to(&target, &into_db, WORK_CONNECT).await?;
            for schema in &options.schemas {
                sqlx::query(&format!(
                    "CREATE SCHEMA IF NOT EXISTS {}",
                    quote_ident(schema)
                ))
                .execute(&mut c)
                .await
                .map_err(|e| {
                    format!(
                        "cannot create the schema {schema}: {}",
                        target.scrub(&e.to_string())
                    )
                })?;
            }
            let _ = sqlx::Connection::close(c).await;
        }
        progress.set_phase("restoring");
        let mut input = storage.open(&key).await.map_err(|e| e.to_string())?;
        let scratch = state.config.backups.directory.join(".scratch");
        let _ = std::fs::create_dir_all(&scratch);
        let into = conn.with_database(&into_db);
        let extra = options.args();
        let to = RestoreTo {
            tool: &tool,
            conn: &into,
            format,
            jobs: if options.single_transaction {
                1
            } else {
                r.jobs.max(1) as u32
            },
            clean: method == Some(OverMethod::InPlace) && !options.data_only,
            extra: &extra,
            keep_owner: !options.no_owner,
        };
        if format == Format::Plain {
            pg_tools::restore_plain(
                &tool,
                &into,
                options.single_transaction,
                &mut input,
                progress,
                cancel,
            )
            .await
        } else {
            pg_tools::restore_archive(&to, &mut input, &scratch, progress, cancel).await
        }
        .map_err(|e| target.scrub(&e))?;
        progress.set_phase("counting rows");
        let mut c = connect_to(&target, &into_db, WORK_CONNECT).await?;
        let counts = crate::backups::run::table_counts(&mut c)
            .await
            .map_err(|e| target.scrub(&e.to_string()))?;
        let mut swap_facts = Value::Null;
        if let Some(pre) = &preflight {
            // 4. The copy is checked before it may replace anything.
            progress.set_phase("checking the restored copy");
            let tables = swap::plain_table_names(&mut c)
                .await
                .map_err(|e| target.scrub(&e.to_string()))?;
            let checked = swap::check_restored(&backup, &tables, &counts)?;
            let _ = sqlx::Connection::close(c).await;
            if cancel.is_cancelled() {
                return Err("stopped before the swap".to_string());
            }
            // 5. The swap: the live database keeps its contents under the
            // previous name, the restored copy takes its name; one transaction.
            progress.set_phase("swapping the restored copy in");
            let mut admin = swap::admin(&target, &[&r.database], WORK_CONNECT).await?;
            let copied = swap::copy_properties(&mut admin, &target, &names).await?;
            swap::rename_all(
                &mut admin,
                &target,
                &[(&names.live, &names.previous), (&names.work, &names.live)],
                r.end_sessions,
            )
            .await?;
            let _ = sqlx::Connection::close(admin).await;
            swap_facts = swap::facts(&names, pre, &checked, &copied);
        } else {
            let _ = sqlx::Connection::close(c).await;
        }
        Ok::<_, String>((counts, swap_facts))
    }
    .await;
    let (counts, swap_facts) = match restored {
        Ok(c) => c,
        Err(e) if !creates => {
            // In place, in one transaction: pg_restore's transaction rolled back.
            return Err(format!(
                "{e}; the restore ran in one transaction, which was rolled back: {} is as it was{}",
                r.database,
                safety
                    .map(|s| format!(" (safety backup #{s})"))
                    .unwrap_or_default()
            ));
        }
        Err(e) => {
            // Leave nothing half restored behind: the new or work database is
            // dropped; a live database was never touched.
            let untouched = if method.is_some() {
                format!("; {} was not touched", r.database)
            } else {
                String::new()
            };
            if let Err(d) = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                quote_ident(&into_db)
            ))
            .execute(&pool)
            .await
            {
                tracing::warn!(database = %into_db, error = %d, "could not drop a half-restored database");
                return Err(format!(
                    "{e}{untouched} (and the half-restored database {into_db} could not be dropped: {}; dbops drops it when the server answers again)",
                    target.scrub(&d.to_string())
                ));
            }
            let _ = sqlx::query("UPDATE restores SET leftover = false WHERE id = $1")
                .bind(r.id)
                .execute(&state.db)
                .await;
            return Err(format!("{e}{untouched}"));
        }
    };
    // Restored (and swapped): nothing of this restore is left over.
    sqlx::query(
        "UPDATE restores SET leftover = false,
                swapped_at = CASE WHEN method = 'swap' THEN clock_timestamp() END
         WHERE id = $1",
    )
    .bind(r.id)
    .execute(&state.db)
    .await
    .map_err(|e| e.to_string())?;
    let mut result = result_json(&backup, &r.database, bytes, &counts);
    result["mode"] = json!(r.mode);
    result["method"] = json!(method.map(OverMethod::as_str));
    result["target"] = json!(r.target);
    result["url"] = json!(format!("/restores/{}", r.id));
    result["safety_backup_id"] = json!(safety);
    if !swap_facts.is_null() {
        result["swap"] = swap_facts;
        result["previous_database"] = json!(names.previous);
    }
    Ok(result)
}

/// Ends every other session on `database` (an in-place restore, when asked).
async fn end_other_sessions(
    pool: &sqlx::PgPool,
    target: &Target,
    database: &str,
    safety: Option<i64>,
) -> Result<(), String> {
    sqlx::query(
        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity
         WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(database)
    .execute(pool)
    .await
    .map(|_| ())
    .map_err(|e| {
        format!(
            "cannot end the other sessions: {}; nothing was restored{}",
            target.scrub(&e.to_string()),
            safety
                .map(|s| format!(" (safety backup #{s})"))
                .unwrap_or_default()
        )
    })
}

/// How a restore over a database replaces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverMethod {
    /// Restored beside the live database, checked, then swapped in by renaming
    /// (see [`swap`]). For whole restores: the default.
    Swap,
    /// Into the live database with `pg_restore --clean --single-transaction`:
    /// all or nothing, no second copy. For restores of part of a backup
    /// (schemas, tables, schema or data only), or when a person chooses it.
    InPlace,
}

impl OverMethod {
    pub fn for_options(format: Format, options: &RestoreOptions) -> OverMethod {
        if format != Format::Plain && (options.selective() || options.single_transaction) {
            OverMethod::InPlace
        } else {
            OverMethod::Swap
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OverMethod::Swap => "swap",
            OverMethod::InPlace => "in_place",
        }
    }
}

/// Takes a backup of the target with its policy, here and now, before its
/// database is restored over (linked both ways with the restore); returns its
/// id once it is good.
async fn safety_backup(
    state: &AppState,
    r: &Restore,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<i64, String> {
    progress.set_phase("safety backup");
    crate::backups::run::safety_backup(state, &r.target, None, Some(r.id), cancel).await
}

/// `restore.over`: restores a good PostgreSQL backup (of this target or another
/// one: a production backup into staging) over a database of this target,
/// after a safety backup of it and, if asked, ending the other sessions on it.
/// Destructive, so it goes through approvals; its execution queues the restore
/// as a job, and the request ends executed or failed with it.
pub struct RestoreOver;

impl RestoreOver {
    fn backup_id(params: &Value) -> i64 {
        params["backup_id"].as_i64().unwrap_or(0)
    }
}

impl crate::approvals::Action for RestoreOver {
    fn kind(&self) -> &'static str {
        "restore.over"
    }

    fn title(&self) -> &'static str {
        "Restore a backup over a database"
    }

    fn target_kind(&self) -> TargetKind {
        TargetKind::Postgres
    }

    fn severity(&self) -> crate::approvals::Severity {
        crate::approvals::Severity::Destructive
    }

    fn parse(&self, form: &BTreeMap<String, String>) -> Result<Value, String> {
        let id = crate::backups::backup_id_param(form)?;
        let end_sessions = form
            .get("end_sessions")
            .map(|v| v.trim().to_lowercase())
            .is_some_and(|v| matches!(v.as_str(), "on" | "true" | "yes" | "1"));
        let database = form
            .get("database")
            .map(|d| d.trim())
            .filter(|d| !d.is_empty())
            .map(|d| {
                name_ok("database", d)
                    .map(|_| d.to_string())
                    .map_err(|e| e.replace("“", "The database “"))
            })
            .transpose()?;
        let options = RestoreOptions::from_form(form);
        // Format-specific checks happen when it runs; these are the ones that
        // need no backup.
        options.validate(Format::Custom)?;
        Ok(json!({
            "backup_id": id, "database": database, "end_sessions": end_sessions, "options": options,
        }))
    }

    fn describe(&self, params: &Value) -> String {
        let options: RestoreOptions =
            serde_json::from_value(params["options"].clone()).unwrap_or_default();
        let database = params["database"]
            .as_str()
            .map(|d| format!("the database {d}"))
            .unwrap_or_else(|| "this target's database".into());
        let chosen = options.describe();
        // The method depends on the backup's format too; only a plain backup
        // with part-options is refused, so the archive formats decide here.
        let method = OverMethod::for_options(Format::Custom, &options);
        let how = match method {
            OverMethod::Swap => format!(
                "The backup is restored into a new database beside {database} (pg_restore -j, or psql -v \
                 ON_ERROR_STOP=1 for a plain SQL backup) and checked (every table of the backup there, row counts \
                 equal to its test restore's when it recorded them). Only then is it swapped in: {}, and in one \
                 transaction the live database is renamed to <db>_before_restore_<id> and the restored one takes its \
                 name. Until that moment nothing of the live database is touched; if anything fails, it stays as it \
                 is. Afterwards the database holds exactly what the backup holds; the replaced one is kept (with \
                 everything the backup lacks) until someone drops it, and \"swap back\" restores it. Needs about the \
                 database's size in free space while both exist.",
                if params["end_sessions"] == json!(true) {
                    "every other session on it is ended"
                } else {
                    "other sessions are not ended — the swap waits up to 30 s for them to leave, then fails without \
                     changing anything"
                }
            ),
            OverMethod::InPlace => format!(
                "It restores part of the backup, so it runs in place in ONE transaction (pg_restore --clean --if-exists \
                 --exit-on-error --single-transaction): every object of the chosen part is dropped and re-created, \
                 and if anything fails the whole transaction is rolled back and {database} stays as it was. Objects \
                 the restore does not contain stay. It holds locks on what it replaces until it commits{}.",
                if params["end_sessions"] == json!(true) {
                    "; every other session on the database is ended first"
                } else {
                    ""
                }
            ),
        };
        format!(
            "Restore backup #{} over {database}. The checksum is re-checked and a safety backup of the database is \
             taken first. {how} {}",
            Self::backup_id(params),
            if chosen.is_empty() {
                "Options: the defaults (everything, no owners or privileges).".to_string()
            } else {
                format!("Options: {chosen}.")
            }
        )
    }

    fn details<'a>(
        &'a self,
        state: &'a AppState,
        target: &'a Arc<Target>,
        params: &'a Value,
    ) -> futures::future::BoxFuture<'a, Vec<(String, String)>> {
        Box::pin(async move { over_details(state, target, params).await })
    }

    fn world<'a>(
        &'a self,
        state: &'a AppState,
        target: &'a Arc<Target>,
        params: &'a Value,
    ) -> futures::future::BoxFuture<'a, crate::approvals::World> {
        Box::pin(async move { over_world(state, target, params).await })
    }

    fn execute<'a>(
        &'a self,
        ctx: crate::approvals::ExecCtx,
        params: &'a Value,
    ) -> futures::future::BoxFuture<'a, Result<Value, String>> {
        Box::pin(async move {
            use secrecy::ExposeSecret;
            let id = Self::backup_id(params);
            let end_sessions = params["end_sessions"] == json!(true);
            let options: RestoreOptions = serde_json::from_value(params["options"].clone())
                .map_err(|e| format!("the request's options cannot be read: {e}"))?;
            let state = &ctx.state;
            let b = crate::backups::find(&state.db, id)
                .await
                .map_err(|e| e.to_string())?;
            let target = check_backup(state, b.as_ref(), id, ctx.target.name(), &options)
                .await
                .map_err(|e| format!("{e} Nothing was restored."))?;
            let b = b.expect("checked");
            let database = match params["database"].as_str() {
                Some(d) => d.to_string(),
                None => {
                    PgConn::from_url(target.config.url.expose_secret())
                        .map_err(|e| target.scrub(&e))?
                        .dbname
                }
            };
            refuse_if_being_backed_up(state, &target, &database)
                .await
                .map_err(|e| format!("{e} Nothing was restored."))?;
            let n = NewRestore {
                backup: &b,
                target: target.name(),
                database: &database,
                mode: "over_database",
                jobs: default_jobs(),
                end_sessions,
                options: &options,
                approved: Some((ctx.operation, ctx.approval)),
            };
            let (rid, job) = insert(state, &ctx.audit, n)
                .await
                .map_err(|e| e.to_string())?;
            Ok(json!({
                jobs::HANDED_OFF: job, "restore_id": rid, "database": database,
                "url": format!("/restores/{rid}"),
            }))
        })
    }
}

/// What the approver of a restore over a database sees besides the sentence:
/// the backup (when, size, checksum, source), the database now, and which of its
/// tables will be dropped and re-created or left alone.
async fn over_details(state: &AppState, target: &Target, params: &Value) -> Vec<(String, String)> {
    use secrecy::ExposeSecret;
    let mut out = vec![];
    let id = RestoreOver::backup_id(params);
    let b = match crate::backups::find(&state.db, id).await {
        Ok(Some(b)) => b,
        _ => return vec![("Backup".into(), format!("#{id} does not exist"))],
    };
    out.push((
        "Backup".into(),
        format!(
            "#{} of {}, {} format, {}{}{}",
            b.id,
            b.target,
            b.format,
            b.size(),
            b.finished_at
                .map(|t| format!(", taken {}", t.format("%Y-%m-%d %H:%M:%S UTC")))
                .unwrap_or_default(),
            if b.status == "good" {
                String::new()
            } else {
                format!(" — it is {} now", b.status)
            }
        ),
    ));
    if let Some(s) = &b.sha256 {
        out.push(("SHA-256".into(), s.clone()));
    }
    let Ok(conn) = PgConn::from_url(target.config.url.expose_secret()) else {
        return out;
    };
    let database = params["database"]
        .as_str()
        .map(str::to_string)
        .unwrap_or(conn.dbname);
    // The database as it is now: its size and tables.
    let now: Result<(i64, Vec<(String, i64)>), String> = async {
        let mut c = connect_to(target, &database, Duration::from_secs(5)).await?;
        let size: i64 = sqlx::query_scalar("SELECT pg_database_size(current_database())")
            .fetch_one(&mut c)
            .await
            .map_err(|e| target.scrub(&e.to_string()))?;
        let tables: Vec<(String, i64)> = sqlx::query_as(
            "SELECT schemaname || '.' || relname, n_live_tup FROM pg_stat_user_tables ORDER BY 1",
        )
        .fetch_all(&mut c)
        .await
        .map_err(|e| target.scrub(&e.to_string()))?;
        let _ = sqlx::Connection::close(c).await;
        Ok((size, tables))
    }
    .await;
    let (size, tables) = match now {
        Ok(v) => v,
        Err(e) => {
            out.push((
                "Database".into(),
                format!("{database} on {} — cannot be read now: {e}", target.name()),
            ));
            return out;
        }
    };
    out.push((
        "Database".into(),
        format!(
            "{database} on {} ({}, {} tables)",
            target.name(),
            crate::fmt::bytes(size),
            tables.len()
        ),
    ));
    let options: RestoreOptions =
        serde_json::from_value(params["options"].clone()).unwrap_or_default();
    let method =
        OverMethod::for_options(Format::parse(&b.format).unwrap_or(Format::Custom), &options);
    out.push((
        "How".into(),
        match method {
            OverMethod::Swap => format!(
                "restored beside, checked, then swapped in; the current {database} is kept as \
                 {database}_before_restore_N (N: the restore's number) until someone drops it"
            ),
            OverMethod::InPlace => {
                "in place, in one transaction (rolled back whole if anything fails)".into()
            }
        },
    ));
    if b.format == "plain" {
        out.push((
            "Replaced".into(),
            "the whole database: a plain SQL backup re-creates it from nothing (the current one is kept)".into(),
        ));
        return out;
    }
    let in_backup: Option<Vec<String>> = b
        .verification
        .as_ref()
        .and_then(|v| v["tables"].as_array())
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect()
        });
    match in_backup {
        None => out.push((
            "Dropped".into(),
            "every object the backup contains (this backup did not record its table list)".into(),
        )),
        Some(list) => {
            let (replaced, kept): (Vec<_>, Vec<_>) =
                tables.iter().partition(|(t, _)| list.contains(t));
            let show = |v: &[&(String, i64)]| {
                if v.is_empty() {
                    "none".to_string()
                } else {
                    v.iter()
                        .map(|(t, n)| format!("{t} (~{n} rows)"))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            };
            out.push(("Replaced from the backup".into(), show(&replaced)));
            out.push((
                match method {
                    OverMethod::Swap => {
                        "Not in the backup (kept only in the previous database)".into()
                    }
                    OverMethod::InPlace => "Left as they are".into(),
                },
                show(&kept),
            ));
        }
    }
    out
}

/// The outcome: tables, per-table rows (next to the backup's own counts when
/// its test restore recorded them), and how the totals compare.
fn result_json(
    backup: &Backup,
    database: &str,
    bytes: u64,
    counts: &BTreeMap<String, i64>,
) -> Value {
    let rows: i64 = counts.values().sum();
    let test = backup
        .verification
        .as_ref()
        .map(|v| v["test_restore"].clone())
        .filter(|t| t.is_object());
    let compared = test.as_ref().map(|t| {
        let (tt, tr) = (t["tables"].as_i64(), t["rows"].as_i64());
        if tt == Some(counts.len() as i64) && tr == Some(rows) {
            format!(
                "the same {} tables and {rows} rows as the backup's test restore",
                counts.len()
            )
        } else {
            format!(
                "differs from the backup's test restore ({} tables, {} rows there)",
                tt.unwrap_or(-1),
                tr.unwrap_or(-1)
            )
        }
    });
    json!({
        "database": database,
        "backup_id": backup.id,
        "bytes_read": bytes,
        "tables": counts.len(),
        "rows": rows,
        "row_counts": counts,
        "backup_row_counts": test.as_ref().map(|t| t["row_counts"].clone()),
        "compared_with_test_restore": compared,
    })
}

/// Writes the restore's end to its row (the job writes the operation).
async fn finish(
    state: &AppState,
    r: &Restore,
    cancel: &CancellationToken,
    outcome: &Result<Value, String>,
) {
    let (status, error, result) = match outcome {
        Ok(v) => ("succeeded", None, Some(v.clone())),
        Err(e) if state.shutdown.is_cancelled() => (
            "interrupted",
            Some(format!("dbops was shut down while this restore ran ({e})")),
            None,
        ),
        Err(e) if cancel.is_cancelled() => {
            ("cancelled", Some(format!("stopped by a person: {e}")), None)
        }
        Err(e) => ("failed", Some(e.clone()), None),
    };
    if let Err(e) = sqlx::query(
        "UPDATE restores SET status = $2, error = $3, result = $4, finished_at = clock_timestamp(), phase = NULL
         WHERE id = $1 AND status = 'running'",
    )
    .bind(r.id)
    .bind(status)
    .bind(&error)
    .bind(&result)
    .execute(&state.db)
    .await
    {
        tracing::error!(restore = r.id, error = %e, "could not record the end of a restore");
    }
}

/// Settles restores whose job ended without them: stopped before it started
/// (`cancelled`), or its runner died and the job sweeper ended the job, its
/// operation and its approval (`interrupted`); then finds out on the server
/// what such a restore left ([`drop_leftovers`]) and drops the previous
/// databases whose keeping time is up. Returns how many it ended.
pub async fn sweep(state: &AppState) -> Result<u64, sqlx::Error> {
    let ended: Vec<(i64, String)> = sqlx::query_as(
        "UPDATE restores r SET finished_at = clock_timestamp(), phase = NULL,
                status = CASE WHEN j.status = 'cancelled' AND r.status = 'queued' THEN 'cancelled' ELSE 'interrupted' END,
                error = CASE WHEN j.status = 'cancelled' AND r.status = 'queued' THEN 'stopped before it started'
                        ELSE 'the dbops process running this restore stopped; ' ||
                        CASE WHEN r.mode = 'new_database'
                             THEN 'the half-restored database ' || r.database || ' is dropped by dbops'
                             WHEN r.method = 'in_place'
                             THEN 'its single transaction was rolled back by the server: ' || r.database || ' is as it was'
                             ELSE 'dbops checks on the server whether the swap had happened' END END
         FROM (SELECT r2.id, j2.status FROM restores r2 LEFT JOIN jobs j2 ON j2.id = r2.job_id
               WHERE r2.status IN ('queued', 'running')
                 AND (j2.id IS NULL OR j2.status NOT IN ('queued', 'running'))) j
         WHERE r.id = j.id AND r.status IN ('queued', 'running')
         RETURNING r.id, r.database",
    )
    .fetch_all(&state.db)
    .await?;
    for (id, database) in &ended {
        tracing::warn!(restore = id, database = %database, "restore interrupted: its runner stopped");
    }
    drop_leftovers(state).await;
    drop_expired_previous(state).await;
    Ok(ended.len() as u64)
}

/// A restore that may have left a database on its server.
#[derive(sqlx::FromRow)]
struct Leftover {
    id: i64,
    target: String,
    database: String,
    mode: String,
    work_database: Option<String>,
    previous_database: Option<String>,
}

/// What an ended restore left on its server, found out once the server answers:
/// the new database of a failed restore into a new database is dropped; for a
/// swap whose dbops died, the server says which database the name points at —
/// the work database still there means the swap had not happened (it is
/// dropped; the live database was never touched), the previous name there and
/// the work one gone means it had (recorded as swapped; the previous database is
/// kept). Each is logged (`restore.cleanup`) with the facts, which are also
/// added to the restore's error.
pub async fn drop_leftovers(state: &AppState) {
    let left: Vec<Leftover> = match sqlx::query_as(
        "SELECT id, target, database, mode, work_database, previous_database FROM restores
         WHERE leftover AND status NOT IN ('queued', 'running')",
    )
    .fetch_all(&state.db)
    .await
    {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "could not look for half-restored databases");
            return;
        }
    };
    for l in left {
        let Some(target) = state.targets.get(&l.target) else {
            continue;
        };
        let Ok(mut admin) = swap::admin(&target, &[&l.database], Duration::from_secs(5)).await
        else {
            continue;
        };
        let found = resolve_leftover(&mut admin, &target, &l).await;
        let _ = sqlx::Connection::close(admin).await;
        let (facts, swapped) = match found {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(restore = l.id, error = %e, "a restore's leftover cannot be resolved yet");
                continue;
            }
        };
        let _ = sqlx::query(
            "UPDATE restores SET leftover = false,
                    swapped_at = CASE WHEN $2 THEN coalesce(swapped_at, clock_timestamp()) ELSE swapped_at END,
                    error = CASE WHEN status = 'interrupted' AND mode = 'over_database'
                                 THEN coalesce(error, '') || ' — checked after the restart: ' || $3 ELSE error END
             WHERE id = $1",
        )
        .bind(l.id)
        .bind(swapped)
        .bind(facts["what"].as_str().unwrap_or_default())
        .execute(&state.db)
        .await;
        tracing::info!(restore = l.id, facts = %facts, "resolved what an ended restore left");
        let _ = audit::record(
            &state.db,
            &AuditCtx::system(),
            Entry::new("restore.cleanup")
                .target(l.target.clone())
                .params(json!({ "restore_id": l.id, "database": l.database }))
                .result(facts),
        )
        .await;
    }
}

/// The facts of one leftover (see [`drop_leftovers`]) and whether the swap had
/// happened.
async fn resolve_leftover(
    admin: &mut sqlx::PgConnection,
    target: &Target,
    l: &Leftover,
) -> Result<(Value, bool), String> {
    if l.mode == "new_database" {
        swap::drop_database(admin, target, &l.database).await?;
        return Ok((
            json!({ "dropped": l.database, "what": format!("the half-restored database {} was dropped", l.database) }),
            false,
        ));
    }
    let (Some(work), Some(previous)) = (&l.work_database, &l.previous_database) else {
        return Ok((json!({ "what": "no database had been created" }), false));
    };
    let work_there = swap::exists_on(admin, work)
        .await
        .map_err(|e| target.scrub(&e.to_string()))?;
    let previous_there = swap::exists_on(admin, previous)
        .await
        .map_err(|e| target.scrub(&e.to_string()))?;
    match (work_there, previous_there) {
        (true, false) => {
            swap::drop_database(admin, target, work).await?;
            Ok((
                json!({
                    "swapped": false, "dropped": work,
                    "what": format!("the swap had not happened: {} is as it was, and the half-restored copy {work} was dropped", l.database),
                }),
                false,
            ))
        }
        (false, true) => Ok((
            json!({
                "swapped": true, "previous_database": previous,
                "what": format!("the swap had completed: {} is the restored (and checked) database, and the one it replaced is kept as {previous}", l.database),
            }),
            true,
        )),
        (false, false) => Ok((
            json!({ "swapped": false, "what": format!("the copy had not been created: {} is as it was", l.database) }),
            false,
        )),
        (true, true) => Err(format!(
            "both {work} and {previous} exist on {}: left for a person to look at",
            target.name()
        )),
    }
}

/// Drops the databases restores replaced once `[restores] keep_previous_days`
/// have passed since the swap (logged as `restore.drop_previous` by dbops).
pub async fn drop_expired_previous(state: &AppState) {
    let Some(keep) = state.config.restores.keep_previous else {
        return;
    };
    let due: Vec<(i64, String, String, String)> = match sqlx::query_as(
        "SELECT id, target, database, previous_database FROM restores
         WHERE swapped_at < clock_timestamp() - make_interval(secs => $1)
           AND previous_database IS NOT NULL AND previous_dropped_at IS NULL",
    )
    .bind(keep.as_secs_f64())
    .fetch_all(&state.db)
    .await
    {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "could not look for previous databases to drop");
            return;
        }
    };
    for (id, target_name, database, previous) in due {
        let Some(target) = state.targets.get(&target_name) else {
            continue;
        };
        let dropped = async {
            let mut admin = swap::admin(&target, &[&database], Duration::from_secs(5)).await?;
            let d = swap::drop_database(&mut admin, &target, &previous).await;
            let _ = sqlx::Connection::close(admin).await;
            d
        }
        .await;
        if let Err(e) = dropped {
            tracing::debug!(restore = id, error = %e, "a previous database cannot be dropped yet");
            continue;
        }
        let _ = sqlx::query(
            "UPDATE restores SET previous_dropped_at = clock_timestamp(), previous_dropped_by = 'dbops (keeping time over)'
             WHERE id = $1",
        )
        .bind(id)
        .execute(&state.db)
        .await;
        let _ = audit::record(
            &state.db,
            &AuditCtx::system(),
            Entry::new("restore.drop_previous")
                .target(target_name.clone())
                .params(json!({ "restore_id": id, "database": previous, "reason": "keep_previous_days passed" }))
                .result(json!({ "dropped": previous })),
        )
        .await;
    }
}

/// What a restore over a database is approved on ([`RestoreOver`]'s
/// `Action::world`): the backup (id, status, checksum) and the sorted table list
/// of the database it replaces (`null` when it cannot be read now). Stops the
/// request when the backup is gone or no longer good.
async fn over_world(state: &AppState, target: &Target, params: &Value) -> crate::approvals::World {
    use secrecy::ExposeSecret;
    let (backup, blocked) =
        crate::backups::actions::backup_facts(state, RestoreOver::backup_id(params)).await;
    let database = params["database"].as_str().map(str::to_string).or_else(|| {
        PgConn::from_url(target.config.url.expose_secret())
            .ok()
            .map(|c| c.dbname)
    });
    let tables: Option<Vec<String>> = match &database {
        None => None,
        Some(d) => async {
            let mut c = connect_to(target, d, Duration::from_secs(5)).await.ok()?;
            let t = sqlx::query_scalar(
                "SELECT (n.nspname || '.' || c.relname)::text COLLATE \"C\" AS t
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                   AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'
                 ORDER BY t",
            )
            .fetch_all(&mut c)
            .await
            .ok();
            let _ = sqlx::Connection::close(c).await;
            t
        }
        .await,
    };
    crate::approvals::World {
        facts: json!({ "backup": backup, "database": database, "tables": tables }),
        blocked,
    }
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
