//! Restoring a PostgreSQL backup into a NEW database on the backup's own target
//! (PRODUCT C5, the non-destructive kind: nothing that exists is touched).
//!
//! - [`request`] does every check a person can act on before anything is created
//!   (the backup is good and of PostgreSQL, its artifact is there with
//!   the recorded size — and, for artifacts up to [`SYNC_CHECKSUM_LIMIT`], the
//!   recorded checksum — the name is valid and free) and writes the `queued` row
//!   and its `restore.run` operation in one transaction; a refusal is logged as a
//!   failed `restore.run`.
//! - [`run`] does the work: re-reads the artifact and re-checks its checksum
//!   (always, before `CREATE DATABASE`), creates the database, `pg_restore -j N`
//!   (or, for a plain SQL script, `psql -v ON_ERROR_STOP=1` on stdin), and counts
//!   rows per table into `result`. A failure drops the half-restored
//!   database. Progress and a heartbeat go into the row every two seconds.
//! - [`sweep`] ends restores whose runner stopped as `interrupted`.
//!
//! For this slice a restore started from the web runs as a plain `tokio::spawn`
//! in the process that was asked ([`spawn`]), not as a durable underway job:
//! if that process dies, the sweeper (run with the backup sweeper) marks the
//! restore `interrupted` and its operation too, and the page says which database
//! may be left half restored.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{
    Backup,
    pgdump::{self, Format, PgConn, RestoreTo},
    progress::Progress,
};
use crate::{
    app::{AppState, quote_ident},
    audit::{self, AuditCtx, Entry, Outcome},
    config::TargetKind,
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
}

const COLUMNS: &str = "id, backup_id, target, database, mode, status, phase, jobs, progress_bytes, progress_items, \
     progress_total, requested_by_name, created_at, started_at, finished_at, heartbeat_at, error, result, operation_id, \
     safety_backup_id, end_sessions";

impl Restore {
    pub fn is_active(&self) -> bool {
        matches!(self.status.as_str(), "queued" | "running")
    }

    /// `12.3 s`, `4 min 5 s`.
    pub fn duration(&self) -> String {
        let Some(start) = self.started_at else {
            return String::new();
        };
        let end = self.finished_at.unwrap_or_else(Utc::now);
        let s = (end - start).num_milliseconds() as f64 / 1000.0;
        if s < 60.0 {
            format!("{s:.1} s")
        } else {
            format!("{} min {} s", (s / 60.0) as u64, (s % 60.0) as u64)
        }
    }

    /// `3 of 5 tables`, or just `3 tables` when the total is unknown.
    pub fn progress(&self) -> String {
        match self.progress_total {
            0 => format!("{} tables", self.progress_items),
            t => format!("{} of {t} tables", self.progress_items.min(t)),
        }
    }

    pub fn bytes_read(&self) -> String {
        crate::web::fmt::bytes(self.progress_bytes)
    }

    /// The restored tables and their row counts, from the result.
    pub fn tables(&self) -> Vec<(String, i64)> {
        self.result
            .as_ref()
            .and_then(|r| r["row_counts"].as_object())
            .map(|m| {
                m.iter()
                    .map(|(t, n)| (t.clone(), n.as_i64().unwrap_or(0)))
                    .collect()
            })
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

/// What a person asks for.
#[derive(Debug, Clone)]
pub struct RestoreRequest {
    pub backup_id: i64,
    /// The new database's name (checked here).
    pub database: String,
    /// Parallel jobs; `None` for [`default_jobs`].
    pub jobs: Option<u32>,
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

/// Checks everything that can be checked before anything is created, then writes
/// the `queued` restore and its running `restore.run` operation in one
/// transaction. A refusal is logged as a failed `restore.run` and returned as
/// [`RestoreError::Refused`]. The caller starts [`run`] (or [`spawn`]).
pub async fn request(
    state: &AppState,
    ctx: &AuditCtx,
    req: &RestoreRequest,
) -> Result<i64, RestoreError> {
    let backup = super::find(&state.db, req.backup_id).await?;
    let target = backup.as_ref().map(|b| b.target.clone());
    let params = json!({
        "backup_id": req.backup_id, "database": req.database, "mode": "new_database", "jobs": req.jobs,
    });
    match check(state, backup.as_ref(), req).await {
        Ok(()) => {}
        Err(RestoreError::Refused(msg)) => {
            let mut entry = Entry::new("restore.run").params(params).failed(msg.clone());
            entry.target = target;
            audit::record(&state.db, ctx, entry).await?;
            return Err(RestoreError::Refused(msg));
        }
        Err(e) => return Err(e),
    }
    let backup = backup.expect("checked");
    let jobs = req.jobs.unwrap_or_else(default_jobs);
    let total = backup
        .verification
        .as_ref()
        .and_then(|v| v["table_data"].as_i64())
        .unwrap_or(0);
    let mut tx = state.db.begin().await?;
    let id: i64 = match sqlx::query_scalar(
        "INSERT INTO restores (backup_id, target, database, mode, status, jobs, progress_total, requested_by, requested_by_name)
         VALUES ($1, $2, $3, 'new_database', 'queued', $4, $5, $6, $7) RETURNING id",
    )
    .bind(backup.id)
    .bind(&backup.target)
    .bind(req.database.trim())
    .bind(jobs as i32)
    .bind(total)
    .bind(ctx.actor.id)
    .bind(&ctx.actor.name)
    .fetch_one(&mut *tx)
    .await
    {
        Ok(id) => id,
        Err(sqlx::Error::Database(d)) if d.is_unique_violation() => {
            drop(tx);
            let msg = format!(
                "A restore into {} is already running.",
                req.database.trim()
            );
            audit::record(
                &state.db,
                ctx,
                Entry::new("restore.run")
                    .target(backup.target.clone())
                    .params(params)
                    .failed(msg.clone()),
            )
            .await?;
            return Err(RestoreError::Refused(msg));
        }
        Err(e) => return Err(e.into()),
    };
    let mut params = params;
    params["restore_id"] = json!(id);
    params["jobs"] = json!(jobs);
    let op = audit::start(
        &mut *tx,
        ctx,
        Entry::new("restore.run")
            .target(backup.target.clone())
            .params(params),
    )
    .await?;
    sqlx::query("UPDATE restores SET operation_id = $2 WHERE id = $1")
        .bind(id)
        .bind(op)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(id)
}

async fn check(
    state: &AppState,
    backup: Option<&Backup>,
    req: &RestoreRequest,
) -> Result<(), RestoreError> {
    let refuse = |m: String| Err(RestoreError::Refused(m));
    let Some(b) = backup else {
        return refuse(format!("There is no backup #{}.", req.backup_id));
    };
    if b.status != "good" {
        return refuse(format!(
            "Backup #{} is {}: only a good backup can be restored.",
            b.id, b.status
        ));
    }
    if b.method != "pg_dump" {
        return refuse(format!(
            "Backup #{} is a Redis backup: only PostgreSQL backups can be restored here.",
            b.id
        ));
    }
    let name = DatabaseName::parse(&req.database).map_err(RestoreError::Refused)?;
    if let Some(j) = req.jobs
        && !(1..=32).contains(&j)
    {
        return refuse("Parallel jobs must be between 1 and 32.".into());
    }
    let Some(target) = state
        .targets
        .get(&b.target)
        .filter(|t| t.kind() == TargetKind::Postgres)
    else {
        return refuse(format!(
            "The backup's target {} is not configured any more.",
            b.target
        ));
    };
    // The artifact: there, of the recorded size, and (when small enough to read
    // now) of the recorded checksum.
    let storage = state
        .storage_for(&b.storage)
        .map_err(RestoreError::Refused)?;
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
        match super::storage::sha256_of(storage.as_ref(), key).await {
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
    // The name must be free.
    let pool = target.pg().await.map_err(RestoreError::Refused)?;
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(name.as_str())
        .fetch_optional(&pool)
        .await
        .map_err(|e| RestoreError::Refused(target.scrub(&e.to_string())))?;
    if exists.is_some() {
        return refuse(format!(
            "A database called {} already exists on {}: choose a new name (restoring over an existing database is a separate, approved action).",
            name.as_str(),
            b.target
        ));
    }
    Ok(())
}

fn checksum_message(id: i64, found: &str, recorded: &str) -> String {
    format!(
        "The backup file of #{id} does not match its recorded checksum (sha256 {} read, {} recorded): it was altered or damaged, so it is not restored.",
        &found[..12.min(found.len())],
        &recorded[..12.min(recorded.len())]
    )
}

/// Runs [`run`] in the background of this process, ending with dbops' shutdown.
pub fn spawn(state: &AppState, id: i64) {
    let state = state.clone();
    tokio::spawn(async move {
        let cancel = state.shutdown.child_token();
        run(&state, id, &cancel).await;
    });
}

/// Runs a queued restore to its end. Never panics and never returns an error:
/// every outcome is written to the restore's row and its operation.
pub async fn run(state: &AppState, id: i64, cancel: &CancellationToken) {
    let runner = format!("{}:{}", super::run::hostname(), std::process::id());
    let taken: Option<Restore> = match sqlx::query_as(&format!(
        "UPDATE restores SET status = 'running', started_at = clock_timestamp(), heartbeat_at = clock_timestamp(),
                runner = $2, phase = 'starting'
         WHERE id = $1 AND status = 'queued' RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(&runner)
    .fetch_optional(&state.db)
    .await
    {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(restore = id, error = %e, "could not start a restore");
            return;
        }
    };
    let Some(restore) = taken else {
        return;
    };
    let progress = Arc::new(Progress::new("starting"));
    progress.set_items_total(restore.progress_total.max(0) as u64);
    let beat = tokio::spawn(heartbeat(state.clone(), id, progress.clone()));
    let outcome = execute(state, &restore, &progress, cancel).await;
    beat.abort();
    finish(state, &restore, outcome).await;
}

/// Every two seconds: progress into the row (which is also the lease).
async fn heartbeat(state: AppState, id: i64, progress: Arc<Progress>) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        if let Err(e) = sqlx::query(
            "UPDATE restores SET heartbeat_at = clock_timestamp(), progress_bytes = $2, progress_items = $3, phase = $4
             WHERE id = $1 AND status = 'running'",
        )
        .bind(id)
        .bind(progress.bytes() as i64)
        .bind(progress.items() as i64)
        .bind(progress.phase())
        .execute(&state.db)
        .await
        {
            tracing::warn!(restore = id, error = %e, "could not record restore progress");
        }
    }
}

#[tracing::instrument(skip_all, fields(restore = r.id, database = %r.database))]
async fn execute(
    state: &AppState,
    r: &Restore,
    progress: &Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<Value, String> {
    use secrecy::ExposeSecret;
    let backup = super::find(&state.db, r.backup_id)
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
    progress.set_phase("checking the checksum");
    let mut input = storage
        .open(&key)
        .await
        .map_err(|e| format!("the backup file cannot be read ({e}): nothing was restored"))?;
    let (bytes, sha) =
        pgdump::copy_hashed(&mut input, &mut tokio::io::sink(), progress, cancel).await?;
    drop(input);
    if Some(&sha) != backup.sha256.as_ref() || Some(bytes as i64) != backup.bytes {
        return Err(checksum_message(
            backup.id,
            &sha,
            backup.sha256.as_deref().unwrap_or(""),
        ));
    }

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
    let tool = pgdump::pick(tool_name, (server_num / 10000) as u32)?;
    let conn = PgConn::from_url(target.config.url.expose_secret()).map_err(|e| target.scrub(&e))?;

    let over = r.mode == "over_database";
    let quoted = quote_ident(&r.database);
    let mut safety = None;
    if over {
        // 3a. Over the target's database: a safety backup first, in this process;
        // then, if asked, the other sessions on that database are ended.
        let id = safety_backup(state, r, progress, cancel).await?;
        safety = Some(id);
        let still: Option<String> = sqlx::query_scalar("SELECT status FROM backups WHERE id = $1")
            .bind(backup.id)
            .fetch_optional(&state.db)
            .await
            .map_err(|e| e.to_string())?;
        if still.as_deref() != Some("good") {
            return Err(format!(
                "backup #{} was removed while the safety backup #{id} ran (retention?); nothing was restored",
                backup.id
            ));
        }
        if r.end_sessions {
            progress.set_phase("ending other sessions");
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
            )
            .bind(&r.database)
            .execute(&pool)
            .await
            .map_err(|e| {
                format!(
                    "cannot end the other sessions: {}; nothing was restored (safety backup #{id})",
                    target.scrub(&e.to_string())
                )
            })?;
        }
    } else {
        // 3b. The new database. If creating it fails (it appeared meanwhile), it
        // is not ours and is left alone.
        progress.set_phase("creating the database");
        sqlx::query(&format!("CREATE DATABASE {quoted}"))
            .execute(&pool)
            .await
            .map_err(|e| {
                format!(
                    "cannot create the database {} (the target's role needs CREATEDB): {}",
                    r.database,
                    target.scrub(&e.to_string())
                )
            })?;
    }
    let restored = async {
        progress.set_phase("restoring");
        let mut input = storage.open(&key).await.map_err(|e| e.to_string())?;
        let scratch = state.config.backups.directory.join(".scratch");
        let _ = std::fs::create_dir_all(&scratch);
        let into = conn.with_database(&r.database);
        let to = RestoreTo {
            tool: &tool,
            conn: &into,
            format,
            jobs: r.jobs.max(1) as u32,
            clean: over,
        };
        if format == Format::Plain {
            pgdump::restore_plain(&tool, &into, &mut input, progress, cancel).await
        } else {
            pgdump::restore_archive(&to, &mut input, &scratch, progress, cancel).await
        }
        .map_err(|e| target.scrub(&e))?;
        progress.set_phase("counting rows");
        let opts = <sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(
            target.config.url.expose_secret(),
        )
        .map_err(|e| target.scrub(&e.to_string()))?
        .database(&r.database);
        let mut c = <sqlx::PgConnection as sqlx::Connection>::connect_with(&opts)
            .await
            .map_err(|e| target.scrub(&e.to_string()))?;
        let counts = super::run::table_counts(&mut c)
            .await
            .map_err(|e| target.scrub(&e.to_string()));
        let _ = sqlx::Connection::close(c).await;
        counts
    }
    .await;
    let counts = match restored {
        Ok(c) => c,
        Err(e) if over => {
            // The target's own database is never dropped: say where the old
            // contents are.
            return Err(format!(
                "{e}; the database {} may be partly restored: safety backup #{} holds what was there before",
                r.database,
                safety.unwrap_or_default()
            ));
        }
        Err(e) => {
            // Leave nothing half restored behind.
            if let Err(d) = sqlx::query(&format!("DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"))
                .execute(&pool)
                .await
            {
                tracing::warn!(database = %r.database, error = %d, "could not drop a half-restored database");
                return Err(format!(
                    "{e} (and the half-restored database {} could not be dropped: {})",
                    r.database,
                    target.scrub(&d.to_string())
                ));
            }
            return Err(e);
        }
    };
    let mut result = result_json(&backup, &r.database, bytes, &counts);
    result["mode"] = json!(r.mode);
    result["safety_backup_id"] = json!(safety);
    Ok(result)
}

/// Takes a backup of the target with its policy, here and now, before its
/// database is restored over; returns its id once it is good.
async fn safety_backup(
    state: &AppState,
    r: &Restore,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<i64, String> {
    use super::run::{self, BackupRequest, Trigger};
    progress.set_phase("safety backup");
    let id = run::request(
        state,
        &AuditCtx::system(),
        &r.target,
        Trigger::Person,
        BackupRequest {
            run_here: true,
            ..Default::default()
        },
    )
    .await
    .map_err(|e| format!("the safety backup could not start ({e}); nothing was restored"))?;
    sqlx::query("UPDATE restores SET safety_backup_id = $2 WHERE id = $1")
        .bind(r.id)
        .bind(id)
        .execute(&state.db)
        .await
        .map_err(|e| e.to_string())?;
    run::run(state, id, cancel).await;
    let b = super::find(&state.db, id)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("the safety backup vanished")?;
    if b.status != "good" {
        return Err(format!(
            "the safety backup #{id} is {}: {}; nothing was restored",
            b.status,
            b.error.unwrap_or_default()
        ));
    }
    Ok(id)
}

/// `restore.over`: restores a good backup of a target over that target's own
/// database (`pg_restore --clean --if-exists --exit-on-error`), after a safety
/// backup and, if asked, ending the other sessions. Destructive, so it goes
/// through approvals; its execution only starts the restore (which can take far
/// longer than a request may) and answers with the restore's id: the outcome is
/// on `/restores/{id}` and in its `restore.run` operation.
pub struct RestoreOver;

impl crate::approvals::Action for RestoreOver {
    fn kind(&self) -> &'static str {
        "restore.over"
    }

    fn title(&self) -> &'static str {
        "Restore a backup over the database"
    }

    fn target_kind(&self) -> TargetKind {
        TargetKind::Postgres
    }

    fn severity(&self) -> crate::approvals::Severity {
        crate::approvals::Severity::Destructive
    }

    fn parse(&self, form: &std::collections::BTreeMap<String, String>) -> Result<Value, String> {
        let id = form
            .get("backup_id")
            .and_then(|v| v.trim().parse::<i64>().ok())
            .filter(|id| *id > 0)
            .ok_or("Say which backup: backup_id must be a backup number.")?;
        let end_sessions = form
            .get("end_sessions")
            .map(|v| v.trim().to_lowercase())
            .is_some_and(|v| matches!(v.as_str(), "on" | "true" | "yes" | "1"));
        Ok(json!({ "backup_id": id, "end_sessions": end_sessions }))
    }

    fn describe(&self, params: &Value) -> String {
        format!(
            "Restore backup #{} over this target's database: every object the backup contains is dropped and re-created from it \
             (pg_restore --clean --if-exists --exit-on-error); objects it does not contain stay. A safety backup of the database is \
             taken first{}. The checksum is re-checked before anything is touched.",
            params["backup_id"],
            if params["end_sessions"] == json!(true) {
                ", then every other session on the database is ended"
            } else {
                "; other sessions are not ended (their locks can make the restore wait or fail)"
            }
        )
    }

    fn execute<'a>(
        &'a self,
        ctx: crate::approvals::ExecCtx,
        params: &'a Value,
    ) -> futures::future::BoxFuture<'a, Result<Value, String>> {
        Box::pin(async move {
            use secrecy::ExposeSecret;
            let id = params["backup_id"]
                .as_i64()
                .ok_or("the request has no backup number")?;
            let end_sessions = params["end_sessions"] == json!(true);
            let state = &ctx.state;
            let b = super::find(&state.db, id)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("there is no backup #{id}"))?;
            // The approval was for this target: another target's backup is never
            // restored here through it.
            if b.target != ctx.target.name() {
                return Err(format!(
                    "backup #{id} belongs to {}, not to {}; nothing was restored",
                    b.target,
                    ctx.target.name()
                ));
            }
            if b.status != "good" || b.method != "pg_dump" {
                return Err(format!(
                    "backup #{id} is not a good PostgreSQL backup; nothing was restored"
                ));
            }
            if b.format == "plain" {
                return Err(
                    "restoring a plain SQL script over a database comes next; nothing was restored"
                        .into(),
                );
            }
            let storage = state.storage_for(&b.storage)?;
            let key = b.storage_key.clone().unwrap_or_default();
            match storage.size(&key).await {
                Ok(n) if Some(n as i64) == b.bytes => {}
                Ok(n) => {
                    return Err(format!(
                        "the backup file is {n} bytes but {} were recorded; nothing was restored",
                        b.bytes.unwrap_or(0)
                    ));
                }
                Err(e) => return Err(format!("the backup file cannot be read ({e})")),
            }
            let conn = PgConn::from_url(ctx.target.config.url.expose_secret())
                .map_err(|e| ctx.target.scrub(&e))?;
            let total = b
                .verification
                .as_ref()
                .and_then(|v| v["table_data"].as_i64())
                .unwrap_or(0);
            let ctx_audit = AuditCtx::system();
            let mut tx = state.db.begin().await.map_err(|e| e.to_string())?;
            let rid: i64 = sqlx::query_scalar(
                "INSERT INTO restores (backup_id, target, database, mode, status, jobs, progress_total, requested_by_name, end_sessions)
                 VALUES ($1, $2, $3, 'over_database', 'queued', $4, $5, 'approved request', $6) RETURNING id",
            )
            .bind(b.id)
            .bind(&b.target)
            .bind(&conn.dbname)
            .bind(default_jobs() as i32)
            .bind(total)
            .bind(end_sessions)
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| match e {
                sqlx::Error::Database(d) if d.is_unique_violation() => {
                    format!("a restore into {} is already running; nothing was started", conn.dbname)
                }
                e => e.to_string(),
            })?;
            let op = audit::start(
                &mut *tx,
                &ctx_audit,
                Entry::new("restore.run")
                    .target(b.target.clone())
                    .params(json!({
                        "backup_id": b.id, "database": conn.dbname, "mode": "over_database",
                        "end_sessions": end_sessions, "restore_id": rid,
                    })),
            )
            .await
            .map_err(|e| e.to_string())?;
            sqlx::query("UPDATE restores SET operation_id = $2 WHERE id = $1")
                .bind(rid)
                .bind(op)
                .execute(&mut *tx)
                .await
                .map_err(|e| e.to_string())?;
            tx.commit().await.map_err(|e| e.to_string())?;
            spawn(state, rid);
            Ok(
                json!({ "restore_id": rid, "database": conn.dbname, "url": format!("/restores/{rid}") }),
            )
        })
    }
}

/// The outcome: tables, per-table rows, and how they compare with the backup's
/// test restore (which recorded the dump's table and row totals) when there was one.
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
        "compared_with_test_restore": compared,
    })
}

async fn finish(state: &AppState, r: &Restore, outcome: Result<Value, String>) {
    let (status, error, result) = match outcome {
        Ok(v) => ("succeeded", None, Some(v)),
        Err(e) if state.shutdown.is_cancelled() => (
            "interrupted",
            Some(format!("dbops was shut down while this restore ran ({e})")),
            None,
        ),
        Err(e) => ("failed", Some(e), None),
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
    if let Some(op) = r.operation_id {
        let o = match status {
            "succeeded" => Outcome::Succeeded,
            "interrupted" => Outcome::Interrupted,
            _ => Outcome::Failed,
        };
        if let Err(e) = audit::finish(&state.db, op, o, error.as_deref(), result).await {
            tracing::error!(restore = r.id, error = %e, "could not record the restore's outcome");
        }
    }
}

/// Ends restores whose runner stopped sending heartbeats (`stale` ago or more),
/// and queued ones nobody took in that time, as `interrupted`, with their
/// operations. Returns how many it ended.
pub async fn sweep(state: &AppState, stale: Duration) -> Result<u64, sqlx::Error> {
    let ended: Vec<(i64, Option<i64>, String)> = sqlx::query_as(
        "UPDATE restores SET status = 'interrupted', finished_at = clock_timestamp(), phase = NULL,
                error = 'the dbops process running this restore stopped; the database ' || database ||
                        ' may be left half restored: check it and drop it'
         WHERE (status = 'running' AND heartbeat_at < clock_timestamp() - make_interval(secs => $1))
            OR (status = 'queued' AND created_at < clock_timestamp() - make_interval(secs => $1 * 10))
         RETURNING id, operation_id, database",
    )
    .bind(stale.as_secs_f64())
    .fetch_all(&state.db)
    .await?;
    for (id, op, database) in &ended {
        tracing::warn!(restore = id, database = %database, "restore interrupted: its runner stopped");
        if let Some(op) = op {
            let _ = audit::finish(
                &state.db,
                *op,
                Outcome::Interrupted,
                Some("the dbops process running this restore stopped"),
                None,
            )
            .await;
        }
    }
    Ok(ended.len() as u64)
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
