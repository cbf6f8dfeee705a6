//! Taking a backup: the request (a `queued` row, its operations-log row and a
//! job of kind [`JOB_KIND`] in one transaction), the job's body (run by the one
//! job runtime, [`crate::jobs`], in any dbops replica: the lease, progress and
//! Stop are the job's), and the sweeper that settles a backup whose job ended
//! without it (its runner died, or it was stopped before it started).
//!
//! A backup is `good` only after its artifact is complete, committed under its
//! final name and verified (`pg_restore --list` on a re-read that also re-checks the
//! checksum); the database refuses `good` without a checksum and a verification.
//!
//! Over 600 lines: taking a backup is one job (request, dump through storage,
//! verify, test restore, record, sweep) whose steps share the row and its failure
//! handling; the safety backup and delete paths use the same pieces.

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{Backup, BackupError, redis_dump};
use crate::{
    audit::{self, AuditCtx, Entry, Outcome},
    config::TargetKind,
    jobs::{self, Job, JobCtx, JobKind, Limit, NewJob, Progress},
    notify,
    pg_tools::{self, DumpOptions, Format, PgConn},
    state::AppState,
    storage::Storage,
    storage::compress::{self, Zstd},
    targets::Target,
};

/// Who or what asked for a backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Person,
    Schedule,
    Api,
    Cli,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Person => "person",
            Trigger::Schedule => "schedule",
            Trigger::Api => "api",
            Trigger::Cli => "cli",
        }
    }
}

/// The job kind of backups.
pub const JOB_KIND: &str = "backup.create";

/// Backups as jobs: at most `[jobs] backups` at once, `[jobs]
/// backups_per_target` of one target.
pub struct BackupJob;

impl JobKind for BackupJob {
    fn kind(&self) -> &'static str {
        JOB_KIND
    }

    fn title(&self) -> &'static str {
        "Backup"
    }

    fn run<'a>(&'a self, ctx: &'a JobCtx) -> BoxFuture<'a, Result<Value, String>> {
        Box::pin(async move {
            let id = ctx.job.params["backup_id"]
                .as_i64()
                .ok_or("the job names no backup")?;
            run(&ctx.state, id, &ctx.progress, &ctx.cancel).await
        })
    }

    fn subject(&self, job: &Job) -> Option<(String, String)> {
        job.params["backup_id"]
            .as_i64()
            .map(|id| (format!("backup #{id}"), format!("/backups/{id}")))
    }

    fn result_url(&self, job: &Job) -> Option<String> {
        job.params["backup_id"]
            .as_i64()
            .map(|id| format!("/backups/{id}"))
    }

    fn limit(&self, state: &AppState) -> Limit {
        Limit {
            per_target: Some(state.config.jobs.backups_per_target),
            overall: Some(state.config.jobs.backups),
        }
    }

    /// A failed backup says so itself, with its target and what failed.
    fn failure_event(&self) -> Option<&'static str> {
        None
    }
}

/// What a person (or pipeline) asks for.
#[derive(Debug, Clone, Default)]
pub struct BackupRequest {
    /// Overrides of the target's policy (PostgreSQL); `None` uses the policy.
    pub options: Option<DumpOptions>,
    /// For Redis: `logical` or `rdb`; `None` uses the policy.
    pub redis_format: Option<String>,
    /// The scheduled instant this run is for (each runs once).
    pub schedule_slot: Option<DateTime<Utc>>,
    /// Run it in this process ([`run_here`]: `dbops backup run --wait`, a safety
    /// backup) instead of by a worker.
    pub run_here: bool,
    /// Test-restore this backup even if the target's policy does not say so.
    pub test_restore: bool,
    /// Take it pinned ("keep", with this reason): retention leaves it alone
    /// until a person releases the pin (a pre-migration backup).
    pub keep: Option<String>,
}

fn key_for(target: &str, id: i64, ext: &str, now: DateTime<Utc>) -> String {
    format!(
        "{target}/{}/{target}-{}-{id}.{ext}",
        now.format("%Y/%m"),
        now.format("%Y%m%dT%H%M%SZ")
    )
}

/// Queues a backup of `target`: the `queued` row, its `backup.create` operation
/// (running) and the durable job, in one transaction. Returns the backup's id.
pub async fn request(
    state: &AppState,
    ctx: &AuditCtx,
    target_name: &str,
    trigger: Trigger,
    req: BackupRequest,
) -> Result<i64, BackupError> {
    let target = state
        .targets
        .get(target_name)
        .ok_or_else(|| BackupError::Invalid(format!("There is no target called {target_name}.")))?;
    let policy = &target.config.backup;
    let (method, format, options) = match target.kind() {
        TargetKind::Postgres => {
            let opts = match req.options {
                Some(o) => o,
                None => DumpOptions {
                    format: Format::parse(&policy.format).unwrap_or(Format::Custom),
                    jobs: policy.jobs,
                    ..DumpOptions::default()
                },
            };
            opts.validate().map_err(BackupError::Invalid)?;
            let mut options = serde_json::to_value(&opts).unwrap_or_default();
            options["test_restore"] = json!(req.test_restore || policy.test_restore);
            if let Some(z) = policy.zstd() {
                options["compression"] = z.to_options();
            }
            ("pg_dump", opts.format.as_str().to_string(), options)
        }
        TargetKind::Redis => {
            let f = req.redis_format.unwrap_or_else(|| policy.format.clone());
            let method = match f.as_str() {
                "logical" => "redis_logical",
                "rdb" => "redis_rdb",
                other => {
                    return Err(BackupError::Invalid(format!(
                        "`{other}` is not a Redis backup format (logical, rdb)."
                    )));
                }
            };
            let options = match policy.zstd() {
                Some(z) if method == "redis_logical" => json!({ "compression": z.to_options() }),
                _ => json!({}),
            };
            (method, f, options)
        }
    };
    let mut tx = state.db.begin().await?;
    let id: i64 = match sqlx::query_scalar(
        "INSERT INTO backups (target, method, format, options, status, trigger, requested_by, requested_by_name, storage, schedule_slot)
         VALUES ($1, $2, $3, $4, 'queued', $5, $6, $7, $8, $9) RETURNING id",
    )
    .bind(target_name)
    .bind(method)
    .bind(&format)
    .bind(&options)
    .bind(trigger.as_str())
    .bind(ctx.actor.id)
    .bind(&ctx.actor.name)
    .bind(&policy.storage)
    .bind(req.schedule_slot)
    .fetch_one(&mut *tx)
    .await
    {
        Ok(id) => id,
        Err(sqlx::Error::Database(d)) if d.is_unique_violation() => {
            return Err(BackupError::AlreadyScheduled);
        }
        Err(e) => return Err(e.into()),
    };
    let op = audit::start(
        &mut *tx,
        ctx,
        Entry::new("backup.create")
            .target(target_name)
            .params(json!({ "backup_id": id, "method": method, "format": format, "options": options, "trigger": trigger.as_str() })),
    )
    .await?;
    sqlx::query("UPDATE backups SET operation_id = $2 WHERE id = $1")
        .bind(id)
        .bind(op)
        .execute(&mut *tx)
        .await?;
    if let Some(reason) = req.keep.as_deref().map(str::trim) {
        if reason.is_empty() || reason.chars().count() > 2000 {
            return Err(BackupError::Invalid(
                "Say why this backup is kept (1 to 2,000 characters), or do not keep it.".into(),
            ));
        }
        let pin = super::pins::insert(&mut tx, ctx, id, reason, None).await?;
        audit::record(
            &mut *tx,
            ctx,
            Entry::new("backup.pin")
                .target(target_name)
                .params(json!({ "backup_id": id, "reason": reason }))
                .result(json!({ "pin_id": pin })),
        )
        .await?;
    }
    let (job, _) = jobs::submit_in(
        &mut tx,
        state,
        ctx,
        NewJob {
            kind: JOB_KIND,
            target: target_name,
            params: json!({ "backup_id": id }),
            operation: Some(op),
            approval: None,
            run_here: req.run_here,
        },
    )
    .await?;
    sqlx::query("UPDATE backups SET job_id = $2 WHERE id = $1")
        .bind(id)
        .bind(job)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(id)
}

/// Stops a queued or running backup, logged as `backup.cancel`: a queued one
/// ends `cancelled` at once with its job and operation; a running one stops at
/// its job's next heartbeat and ends `cancelled`, leaving nothing behind.
/// `Ok(Err(status))`: it had already ended (logged as failed).
pub async fn cancel(
    state: &AppState,
    ctx: &AuditCtx,
    id: i64,
) -> Result<Result<(), String>, BackupError> {
    let mut tx = state.db.begin().await?;
    let row: Option<(String, String, Option<i64>)> =
        sqlx::query_as("SELECT target, status, job_id FROM backups WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some((target, status, job)) = row else {
        return Err(BackupError::Invalid(format!("There is no backup #{id}.")));
    };
    let entry = Entry::new("backup.cancel")
        .target(target)
        .params(json!({ "backup_id": id }));
    if !matches!(status.as_str(), "queued" | "running") {
        audit::record(
            &mut *tx,
            ctx,
            entry.failed(format!("the backup is {status}")),
        )
        .await?;
        tx.commit().await?;
        return Ok(Err(status));
    }
    if let Some(job) = job {
        jobs::stop_in(&mut tx, job).await?;
    }
    if status == "queued" {
        sqlx::query(
            "UPDATE backups SET status = 'cancelled', finished_at = clock_timestamp(),
                    error = 'cancelled before it started'
             WHERE id = $1",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
    }
    audit::record(&mut *tx, ctx, entry).await?;
    tx.commit().await?;
    Ok(Ok(()))
}

/// Runs a backup asked for with [`BackupRequest::run_here`] in this process, to
/// its end; its row says how it ended.
pub async fn run_here(state: &AppState, id: i64, cancel: &CancellationToken) {
    let job: Option<i64> = sqlx::query_scalar("SELECT job_id FROM backups WHERE id = $1")
        .bind(id)
        .fetch_optional(&state.db)
        .await
        .ok()
        .flatten();
    match job {
        Some(job) => jobs::run_here(state, job, cancel).await,
        None => tracing::error!(backup = id, "a backup to run here has no job"),
    }
}

/// The body of a backup's job: takes the queued backup, makes and verifies its
/// artifact, and writes the end (good, failed, cancelled or interrupted) to its
/// row. Returns what the job writes to its operation.
async fn run(
    state: &AppState,
    id: i64,
    progress: &Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<Value, String> {
    let taken: Option<Backup> = sqlx::query_as(&format!(
        "UPDATE backups SET status = 'running', started_at = clock_timestamp()
         WHERE id = $1 AND status = 'queued' RETURNING {}",
        super::COLUMNS
    ))
    .bind(id)
    .fetch_optional(&state.db)
    .await
    .map_err(|e| format!("could not start backup #{id}: {e}"))?;
    let Some(backup) = taken else {
        return Err(format!("backup #{id} is not waiting to run"));
    };
    let started = std::time::Instant::now();
    let outcome = execute(state, &backup, progress, cancel).await;
    let result = finish(state, &backup, outcome, started.elapsed(), cancel).await;
    if result.is_ok()
        && let Some(target) = state.targets.get(&backup.target)
        && let Err(e) = crate::schedules::prune(state, &target).await
    {
        tracing::warn!(target = %backup.target, error = %e, "retention could not run");
    }
    result
}

/// What a finished artifact is.
struct Artifact {
    key: String,
    bytes: u64,
    sha256: String,
    /// `zstd` when dbops compressed it, with what the tool wrote.
    compression: Option<&'static str>,
    raw_bytes: u64,
    verification: serde_json::Value,
    tool_version: Option<String>,
    server_version: Option<String>,
}

async fn execute(
    state: &AppState,
    backup: &Backup,
    progress: &Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<Artifact, String> {
    let target = state
        .targets
        .get(&backup.target)
        .ok_or_else(|| format!("there is no target called {} any more", backup.target))?;
    let storage = state.storage_for(&backup.storage)?;
    match backup.method.as_str() {
        "pg_dump" => pg_backup(state, &target, storage, backup, progress, cancel).await,
        "redis_logical" | "redis_rdb" => {
            redis_backup(&target, storage, backup, progress, cancel).await
        }
        other => Err(format!("unknown backup method {other}")),
    }
}

async fn pg_backup(
    state: &AppState,
    target: &Target,
    storage: Arc<dyn Storage>,
    backup: &Backup,
    progress: &Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<Artifact, String> {
    use secrecy::ExposeSecret;
    let opts: DumpOptions = serde_json::from_value(backup.options.clone())
        .map_err(|e| format!("bad backup options: {e}"))?;
    progress.set_phase("connecting");
    let pool = target.pg().await?;
    let (server_version, server_num): (String, i32) = tokio::time::timeout(
        Duration::from_secs(15),
        sqlx::query_as(
            "SELECT current_setting('server_version'), current_setting('server_version_num')::int",
        )
        .fetch_one(&pool),
    )
    .await
    .map_err(|_| "the target did not answer within 15 s".to_string())?
    .map_err(|e| crate::targets::postgres::describe_pg_error(&target.scrub(&e.to_string())))?;
    let major = (server_num / 10000) as u32;
    let dump_tool = pg_tools::pick("pg_dump", major)?;
    let restore_tool = pg_tools::pick("pg_restore", major)?;
    let conn = PgConn::from_url(target.config.url.expose_secret()).map_err(|e| target.scrub(&e))?;
    let zstd = Zstd::from_options(&backup.options);
    let compression = zstd.map(|_| compress::ZSTD);
    let key = key_for(
        &backup.target,
        backup.id,
        &format!(
            "{}{}",
            opts.format.extension(),
            compress::extension(compression)
        ),
        Utc::now(),
    );
    // For a test restore, the dump runs in a snapshot exported by a transaction
    // that stays open, so that row counts taken in it are exactly what was dumped.
    let test_restore =
        backup.options["test_restore"] == json!(true) && opts.format != Format::Plain;
    let mut snapshot_conn = None;
    let mut snapshot_id = None;
    if test_restore {
        // Detached from the pool: if anything fails, dropping it closes the
        // connection (and its transaction) instead of returning it mid-transaction.
        let mut c = pool
            .acquire()
            .await
            .map_err(|e| target.scrub(&e.to_string()))?
            .detach();
        let id: Result<String, sqlx::Error> = async {
            sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .execute(&mut c)
                .await?;
            sqlx::query("SET LOCAL statement_timeout = 0")
                .execute(&mut c)
                .await?;
            sqlx::query_scalar("SELECT pg_export_snapshot()")
                .fetch_one(&mut c)
                .await
        }
        .await;
        let id = id.map_err(|e| {
            format!(
                "cannot export a snapshot for the test restore: {}",
                target.scrub(&e.to_string())
            )
        })?;
        snapshot_id = Some(id);
        snapshot_conn = Some(c);
    }
    let mut upload = storage.create(&key).await.map_err(|e| e.to_string())?;
    progress.set_phase("dumping");
    let dump = pg_tools::Dump {
        tool: &dump_tool,
        conn: &conn,
        opts: &opts,
        snapshot: snapshot_id.as_deref(),
        compress: zstd,
    };
    let scratch = state.config.backups.directory.join(".scratch");
    let result = match opts.format {
        Format::Directory => {
            let _ = std::fs::create_dir_all(&scratch);
            let dir = scratch.join(format!(
                "dump-{}-{}",
                backup.id,
                uuid::Uuid::new_v4().simple()
            ));
            pg_tools::dump_directory(&dump, &dir, &mut upload, progress, cancel).await
        }
        _ => pg_tools::dump_stream(&dump, &mut upload, progress, cancel).await,
    };
    let result = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = upload.abort().await;
            return Err(target.scrub(&e));
        }
    };
    if cancel.is_cancelled() {
        let _ = upload.abort().await;
        return Err("cancelled".into());
    }
    progress.set_phase("committing");
    upload.commit().await.map_err(|e| e.to_string())?;
    // From here on the artifact exists: any failure must remove it again.
    let verified = async {
        progress.set_phase("verifying");
        let stored = storage.open(&key).await.map_err(|e| e.to_string())?;
        let _ = std::fs::create_dir_all(&scratch);
        let verify_progress = Progress::new("verifying");
        let (list, bytes, sha) = match compression {
            None => {
                let mut input = stored;
                pg_tools::verify_archive(&restore_tool, opts.format, &mut input, &scratch, &verify_progress, cancel).await?
            }
            Some(_) => {
                // Decompressed on the fly for pg_restore --list; the stored
                // bytes are hashed on the way (and to their end).
                let mut input = compress::Unpacked::new(stored);
                let (list, raw, _) = pg_tools::verify_archive(&restore_tool, opts.format, &mut input, &scratch, &verify_progress, cancel).await?;
                if raw != result.raw_bytes {
                    return Err(format!("the stored backup decompresses to {raw} bytes, but pg_dump wrote {}", result.raw_bytes));
                }
                let (bytes, sha) = input.finish().await.map_err(|e| format!("reading the backup back failed: {e}"))?;
                (list, bytes, sha)
            }
        };
        if bytes != result.bytes || sha != result.sha256 {
            return Err(format!(
                "the stored backup does not match what was written ({bytes} bytes, sha256 {sha}; expected {} bytes, {})",
                result.bytes, result.sha256
            ));
        }
        Ok(list)
    }
    .await;
    let list = match verified {
        Ok(l) => l,
        Err(e) => {
            let _ = storage.delete(&key).await;
            return Err(format!("verification failed: {e}"));
        }
    };
    let test = match snapshot_conn.as_mut() {
        None => None,
        Some(snap) => {
            progress.set_phase("test restore");
            let check = TestRestore {
                target,
                conn: &conn,
                restore_tool: &restore_tool,
                opts: &opts,
                key: &key,
                compression,
                storage: storage.as_ref(),
            };
            match test_restore_check(state, &check, snap, progress, cancel).await {
                Ok(t) => Some(t),
                Err(e) => {
                    let _ = storage.delete(&key).await;
                    return Err(format!("test restore failed: {e}"));
                }
            }
        }
    };
    if let Some(c) = snapshot_conn {
        let _ = sqlx::Connection::close(c).await;
    }
    Ok(Artifact {
        key,
        bytes: result.bytes,
        sha256: result.sha256,
        compression,
        raw_bytes: result.raw_bytes,
        verification: json!({
            "method": if opts.format == Format::Plain { "complete script, checksum re-read" } else { "pg_restore --list, checksum re-read" },
            "entries": list.entries,
            "table_data": list.table_data,
            "tables": list.tables,
            "tables_dumped": result.tables,
            "test_restore": test,
            "verified_at": Utc::now().to_rfc3339(),
        }),
        tool_version: Some(format!("pg_dump {}", dump_tool.major)),
        server_version: Some(server_version),
    })
}

/// Row counts of every table visible on `conn`, by `schema.table`.
pub(crate) async fn table_counts(
    conn: &mut sqlx::PgConnection,
) -> Result<std::collections::BTreeMap<String, i64>, sqlx::Error> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
           AND n.nspname !~ '^pg_' ORDER BY 1",
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut out = std::collections::BTreeMap::new();
    for t in tables {
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {t}"))
            .fetch_one(&mut *conn)
            .await?;
        out.insert(t, n);
    }
    Ok(out)
}

/// What a test restore needs to know about the backup it checks.
struct TestRestore<'a> {
    target: &'a Target,
    conn: &'a PgConn,
    restore_tool: &'a pg_tools::Tool,
    opts: &'a DumpOptions,
    key: &'a str,
    compression: Option<&'a str>,
    storage: &'a dyn Storage,
}

/// Restores the stored backup into a scratch database on the same server, compares
/// per-table row counts with the dump's snapshot (`snap`), and drops the scratch
/// database whatever happens.
async fn test_restore_check(
    state: &AppState,
    t: &TestRestore<'_>,
    snap: &mut sqlx::PgConnection,
    progress: &Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<serde_json::Value, String> {
    use secrecy::ExposeSecret;
    use sqlx::Connection;
    let target = t.target;
    let pool = target.pg().await?;
    let scratch_db = format!("dbops_testrestore_{}", uuid::Uuid::new_v4().simple());
    let quoted = crate::state::quote_ident(&scratch_db);
    sqlx::query(&format!("CREATE DATABASE {quoted}"))
        .execute(&pool)
        .await
        .map_err(|e| {
            format!(
                "cannot create a scratch database (the target's role needs CREATEDB): {}",
                target.scrub(&e.to_string())
            )
        })?;
    let outcome = async {
        let stored = t.storage.open(t.key).await.map_err(|e| e.to_string())?;
        let mut input = compress::reader_for(stored, t.compression)?;
        let scratch = state.config.backups.directory.join(".scratch");
        let _ = std::fs::create_dir_all(&scratch);
        let into = t.conn.with_database(&scratch_db);
        let to = pg_tools::RestoreTo { tool: t.restore_tool, conn: &into, format: t.opts.format, jobs: if t.opts.format == Format::Directory { t.opts.jobs.max(2) } else { 1 }, clean: false, extra: &[], keep_owner: false };
        pg_tools::restore_archive(&to, &mut input, &scratch, progress, cancel).await?;
        let source = table_counts(snap).await.map_err(|e| target.scrub(&e.to_string()))?;
        let url = target.config.url.expose_secret().to_string();
        let opts_db = <sqlx::postgres::PgConnectOptions as std::str::FromStr>::from_str(&url)
            .map_err(|e| target.scrub(&e.to_string()))?
            .database(&scratch_db);
        let mut restored_conn = sqlx::PgConnection::connect_with(&opts_db).await.map_err(|e| target.scrub(&e.to_string()))?;
        let restored = table_counts(&mut restored_conn).await.map_err(|e| target.scrub(&e.to_string()))?;
        let _ = restored_conn.close().await;
        let mismatches: Vec<serde_json::Value> = restored
            .iter()
            .filter_map(|(t, n)| {
                let expected = source.get(t).copied().unwrap_or(-1);
                (expected != *n).then(|| json!({ "table": t, "dumped": expected, "restored": n }))
            })
            .collect();
        let rows: i64 = restored.values().sum();
        if mismatches.is_empty() {
            Ok(json!({ "tables": restored.len(), "rows": rows, "row_counts_match": true, "row_counts": restored, "database": "dropped" }))
        } else {
            Err(format!("row counts differ: {}", serde_json::Value::Array(mismatches)))
        }
    }
    .await;
    if let Err(e) = sqlx::query(&format!("DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"))
        .execute(&pool)
        .await
    {
        tracing::warn!(database = %scratch_db, error = %e, "could not drop the test-restore database");
    }
    outcome
}

async fn redis_backup(
    target: &Target,
    storage: Arc<dyn Storage>,
    backup: &Backup,
    progress: &Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<Artifact, String> {
    let ext = if backup.method == "redis_rdb" {
        "rdb"
    } else {
        "redis-export"
    };
    // The logical export is compressed by dbops when the policy says so; an RDB
    // snapshot is LZF-compressed by Redis itself and stored as it is.
    let zstd = (backup.method == "redis_logical")
        .then(|| Zstd::from_options(&backup.options))
        .flatten();
    let compression = zstd.map(|_| compress::ZSTD);
    let key = key_for(
        &backup.target,
        backup.id,
        &format!("{ext}{}", compress::extension(compression)),
        Utc::now(),
    );
    let mut upload = storage.create(&key).await.map_err(|e| e.to_string())?;
    progress.set_phase("dumping");
    let mut raw_bytes = 0u64;
    let (dumped, bytes, sha256) = if let Some(z) = zstd {
        // The export writes into one end of a pipe; the compressor reads the other.
        let (mut w, mut r) = tokio::io::duplex(256 * 1024);
        let export = async {
            let client = target.redis().await?;
            let s = redis_dump::logical_export(&client, &mut w, progress).await?;
            tokio::io::AsyncWriteExt::shutdown(&mut w)
                .await
                .map_err(|e| format!("writing the export failed: {e}"))?;
            Ok::<_, String>(json!({ "keys": s.keys, "databases": s.databases }))
        };
        let store = compress::copy_compressed(&mut r, &mut upload, z, &|_| {}, cancel);
        match tokio::try_join!(export, store) {
            Ok((stats, c)) => {
                raw_bytes = c.raw_bytes;
                (Ok(stats), c.bytes, c.sha256)
            }
            Err(e) => (Err(e), 0, String::new()),
        }
    } else {
        let mut hashing = crate::storage::HashingWriter::new(&mut upload);
        let dumped = tokio::select! {
            r = async {
                if backup.method == "redis_rdb" {
                    redis_dump::rdb_snapshot(target, &mut hashing, progress).await.map(|b| json!({ "bytes": b }))
                } else {
                    let client = target.redis().await?;
                    redis_dump::logical_export(&client, &mut hashing, progress)
                        .await
                        .map(|s| json!({ "keys": s.keys, "databases": s.databases }))
                }
            } => r,
            _ = cancel.cancelled() => Err("cancelled".to_string()),
        };
        let (bytes, sha256) = hashing.finish();
        raw_bytes = bytes;
        (dumped, bytes, sha256)
    };
    let stats = match dumped {
        Ok(s) => s,
        Err(e) => {
            let _ = upload.abort().await;
            return Err(target.scrub(&e));
        }
    };
    progress.set_phase("committing");
    upload.commit().await.map_err(|e| e.to_string())?;
    progress.set_phase("verifying");
    let verified = async {
        if compression.is_some() {
            // One read: decompressed for the export's own check, the stored
            // bytes hashed on the way.
            let mut input = compress::Unpacked::new(storage.open(&key).await.map_err(|e| e.to_string())?);
            let s = redis_dump::verify_export(&mut input).await?;
            let (size, sha) = input.finish().await.map_err(|e| format!("reading the export back failed: {e}"))?;
            if sha != sha256 || size != bytes {
                return Err("the stored backup does not match what was written".to_string());
            }
            return Ok(json!({ "method": "export trailer, zstd frame and checksum re-read", "keys": s.keys }));
        }
        let (sha, size) = crate::storage::sha256_of(storage.as_ref(), &key)
            .await
            .map_err(|e| e.to_string())?;
        if sha != sha256 || size != bytes {
            return Err("the stored backup does not match what was written".to_string());
        }
        if backup.method == "redis_logical" {
            let mut input = storage.open(&key).await.map_err(|e| e.to_string())?;
            let s = redis_dump::verify_export(&mut input).await?;
            return Ok(json!({ "method": "export trailer and checksum re-read", "keys": s.keys }));
        }
        let mut input = storage.open(&key).await.map_err(|e| e.to_string())?;
        let mut magic = [0u8; 5];
        tokio::io::AsyncReadExt::read_exact(&mut input, &mut magic)
            .await
            .map_err(|e| format!("cannot read the snapshot back: {e}"))?;
        if &magic != b"REDIS" {
            return Err("the snapshot does not start with the RDB signature".into());
        }
        Ok(json!({ "method": "RDB signature and checksum re-read" }))
    }
    .await;
    match verified {
        Ok(mut v) => {
            v["export"] = stats;
            v["verified_at"] = json!(Utc::now().to_rfc3339());
            Ok(Artifact {
                key,
                bytes,
                sha256,
                compression,
                raw_bytes,
                verification: v,
                tool_version: None,
                server_version: None,
            })
        }
        Err(e) => {
            let _ = storage.delete(&key).await;
            Err(format!("verification failed: {e}"))
        }
    }
}

/// Writes the backup's end to its row, with metrics and notifications, and
/// returns what its job writes to the operation (the job writes the
/// operation and the lease's end).
async fn finish(
    state: &AppState,
    backup: &Backup,
    outcome: Result<Artifact, String>,
    took: Duration,
    cancel: &CancellationToken,
) -> Result<Value, String> {
    let (status, error) = match &outcome {
        Ok(_) => ("good", None),
        Err(_) if state.shutdown.is_cancelled() => (
            "interrupted",
            Some("dbops was shut down while this backup ran".to_string()),
        ),
        Err(_) if cancel.is_cancelled() => ("cancelled", Some("cancelled".to_string())),
        Err(e) => ("failed", Some(e.clone())),
    };
    let art = outcome.as_ref().ok();
    let update = sqlx::query(
        "UPDATE backups SET status = $2, error = $3, finished_at = clock_timestamp(),
                storage_key = $4, bytes = $5, sha256 = $6, verification = $7, tool_version = $8, server_version = $9,
                compression = $10, raw_bytes = $11
         WHERE id = $1 AND status = 'running'",
    )
    .bind(backup.id)
    .bind(status)
    .bind(&error)
    .bind(art.map(|a| a.key.clone()))
    .bind(art.map(|a| a.bytes as i64))
    .bind(art.map(|a| a.sha256.clone()))
    .bind(art.map(|a| a.verification.clone()))
    .bind(art.and_then(|a| a.tool_version.clone()))
    .bind(art.and_then(|a| a.server_version.clone()))
    .bind(art.and_then(|a| a.compression))
    .bind(art.map(|a| a.raw_bytes as i64))
    .execute(&state.db)
    .await;
    if let Err(e) = update {
        tracing::error!(backup = backup.id, error = %e, "could not record the end of a backup");
        return Err(format!(
            "could not record the end of backup #{}: {e}",
            backup.id
        ));
    }
    let label = format!("backup #{} of {}", backup.id, backup.target);
    match (status, &error) {
        ("good", _) => {
            metrics::gauge!("dbops_backup_last_good_timestamp_seconds", "target" => backup.target.clone())
                .set(Utc::now().timestamp() as f64);
            if let Some(a) = art {
                metrics::gauge!("dbops_backup_last_good_bytes", "target" => backup.target.clone())
                    .set(a.bytes as f64);
            }
            metrics::gauge!("dbops_backup_last_duration_seconds", "target" => backup.target.clone()).set(took.as_secs_f64());
            if state.config.notifications.notify_success {
                notify::send(
                    state,
                    "backup.succeeded",
                    format!(
                        "dbops: {label} is good ({}).",
                        crate::fmt::bytes(art.map(|a| a.bytes as i64).unwrap_or(0))
                    ),
                );
            }
        }
        (s, Some(e)) => {
            metrics::counter!("dbops_backup_failures_total", "target" => backup.target.clone(), "status" => s.to_string()).increment(1);
            notify::send(state, "backup.failed", format!("dbops: {label} {s}: {e}"));
        }
        _ => {}
    }
    match (outcome, error) {
        (Ok(a), _) => Ok(
            json!({ "backup_id": backup.id, "bytes": a.bytes, "sha256": a.sha256, "seconds": took.as_secs_f64(), "verification": a.verification, "url": format!("/backups/{}", backup.id) }),
        ),
        (Err(_), e) => Err(e.unwrap_or_default()),
    }
}

/// Settles backups whose job ended without them: the job was stopped before it
/// started (`cancelled`), or its runner died and the job sweeper ended it
/// (`interrupted`; the job's operation says so). Removes their unfinished
/// artifacts. With `only` set, just that backup. Returns how many it ended.
///
/// Rows of a dbops from before backups ran as jobs (no job id) may still be run
/// by such a replica during a rolling upgrade: a running one ends only when its
/// own heartbeat is older than the lease, a queued one when nothing took it for
/// an hour (no replica of that version is left to).
pub async fn sweep(state: &AppState, only: Option<i64>) -> Result<u64, sqlx::Error> {
    let ended: Vec<(i64, String, String)> = sqlx::query_as(
        "UPDATE backups b SET finished_at = clock_timestamp(),
                status = CASE WHEN j.status = 'cancelled' THEN 'cancelled' ELSE 'interrupted' END,
                error = CASE WHEN j.status = 'cancelled' THEN coalesce(j.error, 'cancelled')
                             WHEN j.job IS NULL AND b.status = 'queued'
                             THEN 'queued by an earlier dbops version and never taken'
                             ELSE 'the dbops process running this backup stopped' END
         FROM (SELECT b2.id, j2.id AS job, j2.status, j2.error FROM backups b2 LEFT JOIN jobs j2 ON j2.id = b2.job_id
               WHERE b2.status IN ('queued', 'running') AND ($1::bigint IS NULL OR b2.id = $1)
                 AND CASE WHEN b2.job_id IS NOT NULL THEN j2.status NOT IN ('queued', 'running')
                          WHEN b2.status = 'running'
                          THEN b2.heartbeat_at < clock_timestamp() - make_interval(secs => $2)
                          ELSE b2.created_at < clock_timestamp() - interval '1 hour' END) j
         WHERE b.id = j.id AND b.status IN ('queued', 'running')
         RETURNING b.id, b.target, b.storage",
    )
    .bind(only)
    .bind(state.config.jobs.lease.as_secs_f64())
    .fetch_all(&state.db)
    .await?;
    for (id, target, storage) in &ended {
        tracing::warn!(backup = id, target = %target, "backup ended with its job");
        if storage == "local" {
            let removed = remove_local_partials(&state.config.backups.directory.join(target), *id);
            if removed > 0 {
                tracing::info!(
                    backup = id,
                    removed,
                    "removed the unfinished artifact of an interrupted backup"
                );
            }
        }
        // Unfinished S3 multipart uploads are invisible and are aborted by the
        // bucket's lifecycle rule (see docs).
    }
    if only.is_none() {
        // Scratch copies (parallel restores, directory dumps, verification) of a
        // process that died.
        let scratch = state.config.backups.directory.join(".scratch");
        let removed = tokio::task::spawn_blocking(move || pg_tools::remove_stale_scratch(&scratch))
            .await
            .unwrap_or(0);
        if removed > 0 {
            tracing::info!(removed, "removed scratch files left by a stopped dbops");
        }
    }
    Ok(ended.len() as u64)
}

/// Removes the temporary files (`.<name>-<id>.<ext>.partial-*`) an interrupted
/// backup left under `dir`. Returns how many.
fn remove_local_partials(dir: &std::path::Path, id: i64) -> u64 {
    let needle = format!("-{id}.");
    let mut removed = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                stack.push(path);
            } else if name.starts_with('.')
                && name.contains(".partial-")
                && name.contains(&needle)
                && std::fs::remove_file(&path).is_ok()
            {
                removed += 1;
            }
        }
    }
    removed
}

/// A backup of `target` taken here and now, before destructive work on it (a
/// *safety backup*): its policy's format, or `redis_format` for Redis. With
/// `for_restore` it is linked both ways with that restore (and so pinned while
/// the restore needs it) before it runs. Returns its id once it is good; an
/// error says nothing was touched.
pub async fn safety_backup(
    state: &AppState,
    target: &str,
    redis_format: Option<&str>,
    for_restore: Option<i64>,
    cancel: &CancellationToken,
) -> Result<i64, String> {
    let id = request(
        state,
        &AuditCtx::system(),
        target,
        Trigger::Person,
        BackupRequest {
            run_here: true,
            redis_format: redis_format.map(str::to_string),
            ..Default::default()
        },
    )
    .await
    .map_err(|e| format!("the safety backup could not start ({e}); nothing was touched"))?;
    if let Some(restore) = for_restore {
        let mut tx = state.db.begin().await.map_err(|e| e.to_string())?;
        sqlx::query("UPDATE restores SET safety_backup_id = $2 WHERE id = $1")
            .bind(restore)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(|e| e.to_string())?;
        sqlx::query("UPDATE backups SET safety_for_restore = $2 WHERE id = $1")
            .bind(id)
            .bind(restore)
            .execute(&mut *tx)
            .await
            .map_err(|e| e.to_string())?;
        tx.commit().await.map_err(|e| e.to_string())?;
    }
    run_here(state, id, cancel).await;
    let b = super::find(&state.db, id)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("the safety backup vanished")?;
    if b.status != "good" {
        return Err(format!(
            "the safety backup #{id} is {}: {}; nothing was touched",
            b.status,
            b.error.unwrap_or_default()
        ));
    }
    Ok(id)
}

/// Deletes backup `id` the crates.io way: the row is marked `deleted` (only if it
/// is good and nothing pins it, see [`super::pins`]) with its operations-log row
/// (`kind`) in one transaction; the file is removed after the commit. `Ok(None)`:
/// something pins it now (logged as refused). A file that cannot be removed
/// leaves the row deleted and says so (its log row is failed).
pub async fn delete_backup(
    state: &AppState,
    ctx: &AuditCtx,
    id: i64,
    by: &str,
    kind: &'static str,
) -> Result<Option<Value>, String> {
    let Some(b) = super::find(&state.db, id)
        .await
        .map_err(|e| e.to_string())?
    else {
        return Ok(None);
    };
    let entry = Entry::new(kind)
        .target(b.target.clone())
        .params(json!({ "backup_id": id, "key": b.storage_key, "bytes": b.bytes, "reason": by }));
    let mut tx = state.db.begin().await.map_err(|e| e.to_string())?;
    match super::pins::mark_deleted(&mut tx, id, by)
        .await
        .map_err(|e| e.to_string())?
    {
        Ok(()) => {}
        Err(why) => {
            drop(tx);
            let msg = format!(
                "backup #{id} is kept, so nothing was deleted: {}",
                why.join("; ")
            );
            let _ = audit::record(&state.db, ctx, entry.denied(msg.clone())).await;
            return if kind == "backup.prune" {
                Ok(None)
            } else {
                Err(msg)
            };
        }
    }
    let removed = match (&b.storage_key, state.storage_for(&b.storage)) {
        (Some(key), Ok(storage)) => Some((key.clone(), storage)),
        _ => None,
    };
    let result = json!({ "backup_id": id, "key": b.storage_key, "bytes": b.bytes });
    if removed.is_none() {
        audit::record(&mut *tx, ctx, entry.result(result.clone()))
            .await
            .map_err(|e| e.to_string())?;
        tx.commit().await.map_err(|e| e.to_string())?;
        return Ok(Some(result));
    }
    let op = audit::start(&mut *tx, ctx, entry)
        .await
        .map_err(|e| e.to_string())?;
    tx.commit().await.map_err(|e| e.to_string())?;
    let (key, storage) = removed.expect("checked");
    match storage.delete(&key).await {
        Ok(()) => {
            let _ = audit::finish(
                &state.db,
                op,
                Outcome::Succeeded,
                None,
                Some(result.clone()),
            )
            .await;
            Ok(Some(result))
        }
        Err(e) => {
            let msg = format!(
                "backup #{id} is marked deleted, but its file {key} could not be removed ({e}): remove it by hand"
            );
            let _ = audit::finish(&state.db, op, Outcome::Failed, Some(&msg), None).await;
            Err(msg)
        }
    }
}
