//! Base backups of an archived target: `pg_basebackup -Ft -D - -X none
//! --checkpoint=fast` streamed through SHA-256 into the target's archive storage
//! as one tar (the WAL it needs comes from the archive), recorded in
//! `base_backups`, and verified before it counts: the stored tar is read back
//! (its checksum re-checked), unpacked into a scratch directory and checked file
//! by file against its backup manifest with `pg_verifybackup --no-parse-wal`
//! (PostgreSQL 15's `pg_verifybackup` reads only a plain directory; the WAL
//! positions come from the manifest and `backup_label` and must agree with what
//! `pg_basebackup -v` printed).
//!
//! With `-D -`, `pg_basebackup` writes one tar to stdout only when the server
//! has no tablespace besides the default ones: a server with extra tablespaces
//! is refused with a sentence saying so.
//!
//! Retention ([`prune`]) keeps `keep_base_backups` good ones per target; an older
//! one is deleted (row marked `deleted`, tar removed) unless an open recovery
//! uses it, and the WAL segments older than the oldest kept base backup's start
//! (needed by no recovery any more) are deleted with it.
//!
//! Over 600 lines: a base backup's request, schedule, run (pg_basebackup through
//! storage), verification, retention with pins and sweep share its row and its
//! storage layout.

use std::{path::Path, process::Stdio, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;
use tokio_util::sync::CancellationToken;

use super::Lsn;
use crate::{
    audit::{self, AuditCtx, Entry},
    config::TargetKind,
    jobs::{self, Job, JobCtx, JobKind, Limit, NewJob, Progress},
    pg_tools::{self, PgConn},
    state::AppState,
    targets::Target,
};

/// The job kind of base backups.
pub const JOB_KIND: &str = "pitr.base_backup";

/// One row of `base_backups`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct BaseBackup {
    pub id: i64,
    pub target: String,
    pub job_id: Option<i64>,
    pub operation_id: Option<i64>,
    pub status: String,
    pub trigger: String,
    pub requested_by_name: Option<String>,
    pub system_identifier: Option<String>,
    pub timeline: Option<i32>,
    pub start_lsn: Option<i64>,
    pub end_lsn: Option<i64>,
    pub server_version: Option<String>,
    pub storage: String,
    pub storage_key: Option<String>,
    pub bytes: Option<i64>,
    pub sha256: Option<String>,
    pub verification: Option<Value>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub deleted_at: Option<DateTime<Utc>>,
    /// A person's pin: retention keeps it (see [`pin`]).
    pub pinned_reason: Option<String>,
    pub pinned_by_name: Option<String>,
    pub pinned_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str = "id, target, job_id, operation_id, status, trigger, requested_by_name, system_identifier, \
     timeline, start_lsn, end_lsn, server_version, storage, storage_key, bytes, sha256, verification, error, \
     created_at, started_at, finished_at, deleted_at, pinned_reason, pinned_by_name, pinned_at";

impl BaseBackup {
    pub fn start(&self) -> Option<Lsn> {
        self.start_lsn.map(Lsn::from_i64)
    }
    pub fn end(&self) -> Option<Lsn> {
        self.end_lsn.map(Lsn::from_i64)
    }
    pub fn start_text(&self) -> String {
        self.start().map(|l| l.to_string()).unwrap_or_default()
    }
    pub fn end_text(&self) -> String {
        self.end().map(|l| l.to_string()).unwrap_or_default()
    }
    pub fn size(&self) -> String {
        self.bytes.map(crate::fmt::bytes).unwrap_or_default()
    }
    /// What the verification said, in words.
    pub fn verified(&self) -> String {
        self.verification
            .as_ref()
            .and_then(|v| v["summary"].as_str())
            .unwrap_or("")
            .to_string()
    }
    pub fn is_active(&self) -> bool {
        matches!(self.status.as_str(), "queued" | "running")
    }
}

pub async fn find(db: &sqlx::PgPool, id: i64) -> Result<Option<BaseBackup>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM base_backups WHERE id = $1"))
        .bind(id)
        .fetch_optional(db)
        .await
}

/// A target's base backups, newest first (deleted ones too, marked).
pub async fn list(
    db: &sqlx::PgPool,
    target: &str,
    limit: i64,
) -> Result<Vec<BaseBackup>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM base_backups WHERE target = $1 ORDER BY id DESC LIMIT $2"
    ))
    .bind(target)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// A target's good base backups, oldest first.
pub async fn good(db: &sqlx::PgPool, target: &str) -> Result<Vec<BaseBackup>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM base_backups WHERE target = $1 AND status = 'good' ORDER BY end_lsn, id"
    ))
    .bind(target)
    .fetch_all(db)
    .await
}

/// Base backups as jobs: one at a time per target (a second would only make the
/// server checkpoint twice).
pub struct BaseBackupJob;

impl JobKind for BaseBackupJob {
    fn kind(&self) -> &'static str {
        JOB_KIND
    }

    fn title(&self) -> &'static str {
        "Base backup"
    }

    fn run<'a>(&'a self, ctx: &'a JobCtx) -> BoxFuture<'a, Result<Value, String>> {
        Box::pin(async move {
            let id = ctx.job.params["base_backup_id"]
                .as_i64()
                .ok_or("the job names no base backup")?;
            run(&ctx.state, &ctx.target, id, &ctx.progress, &ctx.cancel).await
        })
    }

    fn subject(&self, job: &Job) -> Option<(String, String)> {
        Some((
            format!("base backup #{}", job.params["base_backup_id"].as_i64()?),
            format!("/targets/{}/pitr", job.target),
        ))
    }

    fn result_url(&self, job: &Job) -> Option<String> {
        Some(format!("/targets/{}/pitr", job.target))
    }

    fn limit(&self, _state: &AppState) -> Limit {
        Limit {
            per_target: Some(1),
            overall: None,
        }
    }
}

/// Who asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Person,
    Schedule,
    Cli,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Person => "person",
            Trigger::Schedule => "schedule",
            Trigger::Cli => "cli",
        }
    }
}

/// Why a base backup was not queued.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("{0}")]
    Refused(String),
    /// The scheduled instant already has its base backup.
    #[error("already scheduled")]
    AlreadyScheduled,
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// Queues a base backup of `target` (its row, job and `pitr.base_backup`
/// operation in one transaction); with `run_here` the job runs in the caller
/// (`dbops basebackup run --wait`). A refusal is logged. Returns its id.
pub async fn request(
    state: &AppState,
    ctx: &AuditCtx,
    target: &str,
    trigger: Trigger,
    schedule_slot: Option<DateTime<Utc>>,
    run_here: bool,
) -> Result<(i64, i64), RequestError> {
    let archive = state
        .targets
        .get(target)
        .filter(|t| t.kind() == TargetKind::Postgres)
        .and_then(|t| t.config.archive.clone());
    let Some(archive) = archive else {
        let msg = format!(
            "{target} is not a PostgreSQL target with [postgres.archive]: base backups are for point-in-time recovery, which needs the WAL archive"
        );
        audit::record(
            &state.db,
            ctx,
            Entry::new(JOB_KIND).target(target).failed(msg.clone()),
        )
        .await?;
        return Err(RequestError::Refused(msg));
    };
    let mut tx = state.db.begin().await?;
    let id: i64 = match sqlx::query_scalar(
        "INSERT INTO base_backups (target, status, trigger, requested_by_name, storage, schedule_slot)
         VALUES ($1, 'queued', $2, $3, $4, $5) RETURNING id",
    )
    .bind(target)
    .bind(trigger.as_str())
    .bind(&ctx.actor.name)
    .bind(&archive.storage)
    .bind(schedule_slot)
    .fetch_one(&mut *tx)
    .await
    {
        Ok(id) => id,
        Err(sqlx::Error::Database(d)) if d.is_unique_violation() => {
            return Err(RequestError::AlreadyScheduled);
        }
        Err(e) => return Err(e.into()),
    };
    let (job, op) = jobs::submit_in(
        &mut tx,
        state,
        ctx,
        NewJob {
            kind: JOB_KIND,
            target,
            params: json!({ "base_backup_id": id, "trigger": trigger.as_str() }),
            operation: None,
            approval: None,
            run_here,
        },
    )
    .await?;
    sqlx::query("UPDATE base_backups SET job_id = $2, operation_id = $3 WHERE id = $1")
        .bind(id)
        .bind(job)
        .bind(op)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok((id, job))
}

/// Queues the scheduled base backups due in `(from, to]` (`base_backup_schedule`,
/// in the backup policy's time zone); each instant once, however many replicas tick.
pub async fn schedule_tick(state: &AppState, from: DateTime<Utc>, to: DateTime<Utc>) {
    for target in state.targets.all() {
        let Some(archive) = target.config.archive.as_ref().filter(|a| a.enabled) else {
            continue;
        };
        let Some(slot) = archive
            .base_backup_schedule
            .as_deref()
            .and_then(|e| crate::schedules::Schedule::parse(e, &target.config.backup.timezone).ok())
            .and_then(|s| s.due_between(from, to))
        else {
            continue;
        };
        match request(
            state,
            &AuditCtx::system(),
            target.name(),
            Trigger::Schedule,
            Some(slot),
            false,
        )
        .await
        {
            Ok((id, _)) => {
                tracing::info!(target = target.name(), base_backup = id, %slot, "scheduled base backup queued")
            }
            Err(RequestError::AlreadyScheduled) => {}
            Err(e) => {
                tracing::error!(target = target.name(), error = %e, "could not queue a scheduled base backup")
            }
        }
    }
}

/// The storage key of base backup `id`.
fn key_for(target: &str, sysid: &str, id: i64, now: DateTime<Utc>) -> String {
    format!(
        "{target}/base/{sysid}/{target}-base-{}-{id}.tar",
        now.format("%Y%m%dT%H%M%SZ")
    )
}

/// What `pg_basebackup -v` printed about the WAL it needs.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Printed {
    pub start: Option<Lsn>,
    pub timeline: Option<u32>,
    pub end: Option<Lsn>,
}

/// Reads `pg_basebackup: write-ahead log start point: 0/2000028 on timeline 1`
/// and `… end point: 0/2000100`.
pub fn parse_verbose(text: &str) -> Printed {
    let mut p = Printed::default();
    for line in text.lines() {
        if let Some(rest) = line.split("write-ahead log start point: ").nth(1) {
            let mut words = rest.split_whitespace();
            p.start = words.next().and_then(Lsn::parse);
            p.timeline = rest
                .split("on timeline ")
                .nth(1)
                .and_then(|t| t.trim().parse().ok());
        } else if let Some(rest) = line.split("write-ahead log end point: ").nth(1) {
            p.end = rest.split_whitespace().next().and_then(Lsn::parse);
        }
    }
    p
}

/// The body of a base backup's job.
async fn run(
    state: &AppState,
    target: &Target,
    id: i64,
    progress: &Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<Value, String> {
    let taken: Option<BaseBackup> = sqlx::query_as(&format!(
        "UPDATE base_backups SET status = 'running', started_at = clock_timestamp()
         WHERE id = $1 AND status = 'queued' RETURNING {COLUMNS}"
    ))
    .bind(id)
    .fetch_optional(&state.db)
    .await
    .map_err(|e| format!("could not start base backup #{id}: {e}"))?;
    let Some(bb) = taken else {
        return Err(format!("base backup #{id} is not waiting to run"));
    };
    let outcome = take(state, target, &bb, progress, cancel).await;
    match outcome {
        Ok(done) => {
            sqlx::query(
                "UPDATE base_backups SET status = 'good', system_identifier = $2, timeline = $3, start_lsn = $4,
                        end_lsn = $5, server_version = $6, storage_key = $7, bytes = $8, sha256 = $9,
                        verification = $10, finished_at = $11
                 WHERE id = $1",
            )
            .bind(id)
            .bind(&done.sysid)
            .bind(done.timeline as i32)
            .bind(done.start.as_i64())
            .bind(done.end.as_i64())
            .bind(&done.server_version)
            .bind(&done.key)
            .bind(done.bytes as i64)
            .bind(&done.sha256)
            .bind(&done.verification)
            .bind(done.ended_at)
            .execute(&state.db)
            .await
            .map_err(|e| format!("could not record base backup #{id}: {e}"))?;
            let pruned = match prune(state, target).await {
                Ok(n) => json!(n),
                Err(e) => {
                    tracing::warn!(target = target.name(), error = %e, "base backup retention could not run");
                    json!({ "error": e })
                }
            };
            Ok(json!({
                "base_backup_id": id, "key": done.key, "bytes": done.bytes, "sha256": done.sha256,
                "system_identifier": done.sysid, "timeline": done.timeline,
                "start_lsn": done.start.to_string(), "end_lsn": done.end.to_string(),
                "verification": done.verification, "pruned": pruned,
                "url": format!("/targets/{}/pitr", target.name()),
            }))
        }
        Err(e) => {
            let status = if cancel.is_cancelled() {
                "cancelled"
            } else {
                "failed"
            };
            let _ = sqlx::query(
                "UPDATE base_backups SET status = $2, error = $3, finished_at = clock_timestamp() WHERE id = $1",
            )
            .bind(id)
            .bind(status)
            .bind(&e)
            .execute(&state.db)
            .await;
            Err(e)
        }
    }
}

struct Done {
    sysid: String,
    timeline: u32,
    start: Lsn,
    end: Lsn,
    server_version: String,
    key: String,
    bytes: u64,
    sha256: String,
    verification: Value,
    ended_at: DateTime<Utc>,
}

async fn take(
    state: &AppState,
    target: &Target,
    bb: &BaseBackup,
    progress: &Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<Done, String> {
    use secrecy::ExposeSecret;
    progress.set_phase("connecting");
    let pool = target.pg().await?;
    let (server_version, num, sysid): (String, i32, String) = tokio::time::timeout(
        Duration::from_secs(15),
        sqlx::query_as(
            "SELECT current_setting('server_version'), current_setting('server_version_num')::int,
                    (SELECT system_identifier::text FROM pg_control_system())",
        )
        .fetch_one(&pool),
    )
    .await
    .map_err(|_| "the target did not answer within 15 s".to_string())?
    .map_err(|e| crate::targets::postgres::describe_pg_error(&target.scrub(&e.to_string())))?;
    let extra: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_tablespace WHERE spcname NOT IN ('pg_default', 'pg_global')",
    )
    .fetch_one(&pool)
    .await
    .map_err(|e| target.scrub(&e.to_string()))?;
    if extra > 0 {
        return Err(format!(
            "the server has {extra} tablespace(s) besides pg_default: pg_basebackup can stream only a single-tablespace server as one tar (`-D -`); dbops does not take base backups of servers with extra tablespaces"
        ));
    }
    let tool = pg_tools::pick("pg_basebackup", (num / 10000) as u32)?;
    let conn = PgConn::from_url(target.config.url.expose_secret()).map_err(|e| target.scrub(&e))?;
    let storage = state.storage_for(&bb.storage)?;
    let key = key_for(target.name(), &sysid, bb.id, Utc::now());

    progress.set_phase("copying");
    let (mut cmd, _pass) = tool.command(&conn)?;
    cmd.args([
        "-D",
        "-",
        "-Ft",
        "-X",
        "none",
        "--checkpoint=fast",
        "--verbose",
        "--no-password",
    ])
    .arg(format!("--label=dbops base backup #{}", bb.id))
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", tool.path.display()))?;
    let mut stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    let stderr_task = tokio::spawn(async move {
        let mut all = String::new();
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            if all.len() < 64 * 1024 {
                all.push_str(&l);
                all.push('\n');
            }
        }
        all
    });
    let mut upload = storage.create(&key).await.map_err(|e| e.to_string())?;
    let copied = pg_tools::copy_hashed(&mut stdout, &mut upload, progress, cancel).await;
    let status = match &copied {
        Ok(_) => child.wait().await.map_err(|e| e.to_string()),
        Err(_) => {
            let _ = child.kill().await;
            Err("stopped".into())
        }
    };
    let ended_at = Utc::now();
    let text = stderr_task.await.unwrap_or_default();
    let (bytes, sha256) = match (copied, status) {
        (Ok(c), Ok(s)) if s.success() => c,
        (Err(e), _) => {
            let _ = upload.abort().await;
            return Err(format!("the base backup could not be stored: {e}"));
        }
        _ => {
            let _ = upload.abort().await;
            return Err(explain(&target.scrub(&text)));
        }
    };
    upload
        .commit()
        .await
        .map_err(|e| format!("the base backup could not be stored: {e}"))?;
    let printed = parse_verbose(&text);

    progress.set_phase("verifying");
    let (verification, start, end, timeline) = match verify(
        state, &storage, &key, &sha256, &tool, &printed, progress, cancel,
    )
    .await
    {
        Ok(v) => v,
        Err(e) => {
            let _ = storage.delete(&key).await;
            return Err(format!(
                "the base backup failed its verification, so it was deleted: {e}"
            ));
        }
    };
    Ok(Done {
        sysid,
        timeline,
        start,
        end,
        server_version,
        key,
        bytes,
        sha256,
        verification,
        ended_at,
    })
}

/// `pg_basebackup`'s stderr in words.
fn explain(stderr: &str) -> String {
    let l = stderr.to_lowercase();
    if l.contains("must be superuser or replication role")
        || l.contains("permission denied to start wal sender")
        || l.contains("replication privilege")
    {
        return format!(
            "pg_basebackup failed: the target's role lacks REPLICATION (ALTER ROLE … REPLICATION) ({})",
            stderr.trim()
        );
    }
    if l.contains("no pg_hba.conf entry for replication") {
        return format!(
            "pg_basebackup failed: pg_hba.conf has no `replication` line for the dbops machine ({})",
            stderr.trim()
        );
    }
    if l.contains("can only write single tablespace to stdout") {
        return "pg_basebackup failed: the server has extra tablespaces, which cannot be streamed as one tar".into();
    }
    pg_tools::explain("pg_basebackup", stderr)
}

/// Reads the stored tar back (re-checking its checksum), unpacks it into a
/// scratch directory and checks it with `pg_verifybackup --no-parse-wal` against
/// its manifest. The WAL positions the backup needs come from the manifest's
/// `WAL-Ranges` (`backup_label` must agree; so must `pg_basebackup -v`, which
/// prints them only in some modes). Returns the verification, start, end and
/// timeline.
#[allow(clippy::too_many_arguments)]
async fn verify(
    state: &AppState,
    storage: &Arc<dyn crate::storage::Storage>,
    key: &str,
    sha256: &str,
    tool: &pg_tools::Tool,
    printed: &Printed,
    progress: &Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<(Value, Lsn, Lsn, u32), String> {
    let began = std::time::Instant::now();
    let dir = super::scratch::ScratchDir::create(state, "verify")?;
    let (bytes, got) =
        super::scratch::unpack(storage.as_ref(), key, dir.path(), progress, cancel).await?;
    if got != sha256 {
        return Err(format!(
            "the stored tar does not match the checksum taken while writing it (wrote {sha256}, read {got})"
        ));
    }
    let manifest = std::fs::read_to_string(dir.path().join("backup_manifest"))
        .map_err(|e| format!("the tar holds no backup_manifest ({e})"))?;
    let manifest: Value = serde_json::from_str(&manifest)
        .map_err(|e| format!("backup_manifest is not JSON ({e})"))?;
    let range = &manifest["WAL-Ranges"][0];
    let m_start = range["Start-LSN"].as_str().and_then(Lsn::parse);
    let m_end = range["End-LSN"].as_str().and_then(Lsn::parse);
    let m_tli = range["Timeline"].as_u64();
    let (Some(start), Some(end), Some(timeline)) =
        (m_start, m_end, m_tli.and_then(|t| u32::try_from(t).ok()))
    else {
        return Err(format!("the manifest has no readable WAL range: {range}"));
    };
    if end < start
        || printed.start.is_some_and(|p| p != start)
        || printed.end.is_some_and(|p| p != end)
        || printed.timeline.is_some_and(|p| p != timeline)
    {
        return Err(format!(
            "the manifest's WAL range ({start} to {end} on timeline {timeline}) is not what pg_basebackup printed ({printed:?})"
        ));
    }
    let label = std::fs::read_to_string(dir.path().join("backup_label"))
        .map_err(|e| format!("the tar holds no backup_label ({e})"))?;
    let label_start = label
        .lines()
        .find_map(|l| l.strip_prefix("START WAL LOCATION: "))
        .and_then(|r| r.split_whitespace().next())
        .and_then(Lsn::parse);
    if label_start != Some(start) {
        return Err(format!(
            "backup_label's start ({label_start:?}) is not what pg_basebackup printed ({start})"
        ));
    }
    let verifier = tool.path.with_file_name("pg_verifybackup");
    let out = crate::process::tool_command(&verifier)
        .arg("--no-parse-wal")
        .arg("--quiet")
        .arg(dir.path())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("cannot run {}: {e}", verifier.display()))?;
    if !out.status.success() {
        return Err(format!(
            "pg_verifybackup found problems: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .take(8)
                .collect::<Vec<_>>()
                .join(" / ")
        ));
    }
    let files = manifest["Files"].as_array().map_or(0, Vec::len);
    let v = json!({
        "method": "pg_verifybackup --no-parse-wal on the unpacked tar",
        "files": files,
        "bytes_read": bytes,
        "checksum": "re-read and matched",
        "seconds": began.elapsed().as_secs_f64(),
        "summary": format!("{files} files match the manifest (pg_verifybackup); checksum re-read"),
        "verified_at": Utc::now(),
    });
    Ok((v, start, end, timeline))
}

/// Retention: keeps `keep_base_backups` good base backups of `target` (newest);
/// older ones are deleted unless an open recovery uses them, and the WAL no kept
/// base backup needs (segments ending before the oldest kept one's start) with
/// them. Every deletion is logged (`pitr.base_backup.prune`). Returns how many
/// base backups were deleted.
pub async fn prune(state: &AppState, target: &Target) -> Result<u64, String> {
    let Some(archive) = target.config.archive.as_ref() else {
        return Ok(0);
    };
    let keep = archive.keep_base_backups.max(1) as usize;
    let mut all = good(&state.db, target.name())
        .await
        .map_err(|e| e.to_string())?;
    all.reverse(); // newest first
    if all.len() <= keep {
        return Ok(0);
    }
    let mut deleted = 0;
    for bb in &all[keep..] {
        let done: Option<String> = sqlx::query_scalar(
            "UPDATE base_backups SET status = 'deleted', deleted_at = now()
             WHERE id = $1 AND status = 'good' AND pinned_at IS NULL
               AND NOT EXISTS (SELECT 1 FROM recoveries r WHERE r.base_backup_id = $1
                               AND r.status IN ('queued', 'recovering', 'ready'))
             RETURNING storage_key",
        )
        .bind(bb.id)
        .fetch_optional(&state.db)
        .await
        .map_err(|e| e.to_string())?;
        let entry = Entry::new("pitr.base_backup.prune")
            .target(target.name())
            .params(json!({ "base_backup_id": bb.id, "key": bb.storage_key, "keep": keep }));
        let Some(key) = done else {
            // A pin is a person's standing decision: skipped quietly. An open
            // recovery is worth a line in the log.
            if bb.pinned_at.is_none() {
                let _ = audit::record(
                    &state.db,
                    &AuditCtx::system(),
                    entry.denied("an open recovery uses it"),
                )
                .await;
            }
            continue;
        };
        let removed = state.storage_for(&bb.storage)?.delete(&key).await;
        let entry = match removed {
            Ok(()) => entry,
            Err(e) => entry.failed(format!(
                "the row is deleted but {key} could not be removed: {e}"
            )),
        };
        let _ = audit::record(&state.db, &AuditCtx::system(), entry).await;
        deleted += 1;
    }
    // The WAL needed by nobody: before the oldest base backup still kept (or
    // used by an open recovery), per server.
    let oldest: Vec<(String, i64)> = sqlx::query_as(
        "SELECT system_identifier, min(start_lsn) FROM base_backups
         WHERE target = $1 AND status = 'good' AND system_identifier IS NOT NULL GROUP BY system_identifier",
    )
    .bind(target.name())
    .fetch_all(&state.db)
    .await
    .map_err(|e| e.to_string())?;
    if deleted > 0 {
        for (sysid, start) in oldest {
            let gone = super::segments::delete_before(
                &state.db,
                target.name(),
                &sysid,
                Lsn::from_i64(start),
            )
            .await
            .map_err(|e| e.to_string())?;
            if gone.is_empty() {
                continue;
            }
            let mut failed = vec![];
            for s in &gone {
                if let Err(e) = state.storage_for(&s.storage)?.delete(&s.storage_key).await {
                    failed.push(format!("{}: {e}", s.storage_key));
                }
            }
            let entry = Entry::new("pitr.wal.prune")
                .target(target.name())
                .params(json!({
                    "system_identifier": sysid, "before_lsn": Lsn::from_i64(start).to_string(),
                    "segments": gone.len(), "bytes": gone.iter().map(|s| s.size_bytes).sum::<i64>(),
                }));
            let entry = if failed.is_empty() {
                entry
            } else {
                entry.failed(format!("not removed from storage: {}", failed.join("; ")))
            };
            let _ = audit::record(&state.db, &AuditCtx::system(), entry).await;
        }
    }
    Ok(deleted)
}

/// Pins (a reason) or unpins (`None`) good base backup `id` of `target`, logged
/// as `pitr.base_backup.pin` / `.unpin`. A pinned base backup is never deleted
/// by retention, and neither is the WAL from its start on.
pub async fn pin(
    state: &AppState,
    ctx: &AuditCtx,
    target: &str,
    id: i64,
    reason: Option<&str>,
) -> Result<(), String> {
    let kind = if reason.is_some() {
        "pitr.base_backup.pin"
    } else {
        "pitr.base_backup.unpin"
    };
    let entry = Entry::new(kind)
        .target(target)
        .params(json!({ "base_backup_id": id, "reason": reason }));
    let refuse = |msg: String| async {
        let _ = audit::record(&state.db, ctx, entry.clone().denied(msg.clone())).await;
        Err::<(), String>(msg)
    };
    if let Some(r) = reason
        && (r.trim().is_empty() || r.len() > 2000)
    {
        return refuse("Say why it must be kept (1 to 2000 characters).".into()).await;
    }
    let changed = sqlx::query(
        "UPDATE base_backups SET pinned_reason = $3, pinned_by_name = CASE WHEN $3 IS NULL THEN NULL ELSE $4 END,
                pinned_at = CASE WHEN $3 IS NULL THEN NULL ELSE now() END
         WHERE id = $1 AND target = $2 AND status = 'good'",
    )
    .bind(id)
    .bind(target)
    .bind(reason.map(str::trim))
    .bind(&ctx.actor.name)
    .execute(&state.db)
    .await
    .map_err(|e| e.to_string())?;
    if changed.rows_affected() == 0 {
        return refuse(format!("{target} has no good base backup #{id}.")).await;
    }
    audit::record(&state.db, ctx, entry)
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Ends base backups whose job ended without them (its runner died).
pub async fn sweep(state: &AppState) -> Result<u64, sqlx::Error> {
    let n = sqlx::query(
        "UPDATE base_backups b SET status = 'interrupted', finished_at = clock_timestamp(),
                error = coalesce(j.error, 'the dbops process running this base backup stopped')
         FROM jobs j WHERE j.id = b.job_id AND b.status IN ('queued', 'running')
           AND j.status NOT IN ('queued', 'running')",
    )
    .execute(&state.db)
    .await?
    .rows_affected();
    Ok(n)
}

/// Whether `dir` looks like an unpacked base backup (for tests and the CLI).
pub fn looks_unpacked(dir: &Path) -> bool {
    dir.join("backup_label").exists() && dir.join("global").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_pg_basebackup_prints() {
        let text = "pg_basebackup: initiating base backup, waiting for checkpoint to complete\n\
                    pg_basebackup: checkpoint completed\n\
                    pg_basebackup: write-ahead log start point: 0/2000028 on timeline 1\n\
                    pg_basebackup: write-ahead log end point: 0/2000138\n\
                    pg_basebackup: base backup completed\n";
        let p = parse_verbose(text);
        assert_eq!(p.start, Lsn::parse("0/2000028"));
        assert_eq!(p.timeline, Some(1));
        assert_eq!(p.end, Lsn::parse("0/2000138"));
        assert_eq!(
            parse_verbose("pg_basebackup: error: connection refused"),
            Printed::default()
        );
    }
}
