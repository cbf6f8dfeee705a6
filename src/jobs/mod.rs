//! The one runtime for long-running work: backups, restores (PostgreSQL and
//! Redis), a report computed over a big catalog, a bulk delete in Redis, a VACUUM
//! FULL, the long part of an approved action.
//!
//! A capability implements [`JobKind`] and lists it in [`crate::actions::job_kinds`];
//! [`submit`] (or [`hand_off`], from an approved action) writes the job's row, its
//! operations-log row and a durable queue entry in one transaction. A worker in any
//! dbops replica runs it ([`run`]): the runner saves the job's [`Progress`] to its
//! row every second (which is also its lease), turns a Stop request into
//! cancellation, and writes the outcome to the row, the operation and, for a
//! handed-off action, the approval request. Jobs whose runner died are ended
//! `interrupted` by [`sweep`]. A kind may declare how many of it run at once
//! ([`JobKind::limit`]); a job over the limit waits in its worker for a place.
//! Capability tables (`backups`, `restores`) keep only their own facts, keyed
//! by job id: the lease, progress and Stop live here.
//!
//! Periodic work (schedules, sweeps, report refreshes) runs on [`scheduler`].
//!
//! Over 600 lines: the one job runtime: submit, claim with a lease, heartbeat,
//! progress, cancel, finish and sweep work on one table and must agree with each
//! other.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub mod progress;
pub mod scheduler;

use crate::{
    approvals::ExecCtx,
    audit::{self, AuditCtx, Entry, Outcome},
    error::AppError,
    state::AppState,
    targets::Target,
};
pub use progress::Progress;

/// What a job's body gets.
pub struct JobCtx {
    pub state: AppState,
    /// The row as it was when the job started.
    pub job: Job,
    pub target: Arc<Target>,
    /// Saved to the job's row every second; pages read it from there.
    pub progress: Arc<Progress>,
    /// Cancelled by the Stop button and at shutdown: check it between batches.
    pub cancel: CancellationToken,
}

/// One kind of job.
pub trait JobKind: Send + Sync + 'static {
    /// The dotted kind, also the operations-log kind of the job
    /// (`redis.memory_by_prefix`).
    fn kind(&self) -> &'static str;
    /// A short title for lists and headings ("Memory by prefix").
    fn title(&self) -> &'static str;
    /// Runs the job; returns a result kept on the job's row, or an error sentence.
    fn run<'a>(&'a self, ctx: &'a JobCtx) -> BoxFuture<'a, Result<Value, String>>;
    /// The page that shows a finished job's result (`None`: the job page shows
    /// it as JSON).
    fn result_url(&self, _job: &Job) -> Option<String> {
        None
    }
    /// The page of what this job works on, from the moment it is queued (a
    /// backup's or a restore's own page), as (label, url).
    fn subject(&self, _job: &Job) -> Option<(String, String)> {
        None
    }
    /// How many jobs of this kind may run at once (across every replica).
    fn limit(&self, _state: &AppState) -> Limit {
        Limit::default()
    }
    /// The notification event of a failed job of this kind; `None` when the kind
    /// sends its own (with more to say than the runner knows).
    fn failure_event(&self) -> Option<&'static str> {
        Some("job.failed")
    }
}

/// At most this many jobs of a kind running at once; `None`: no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limit {
    /// On one target.
    pub per_target: Option<u32>,
    /// On all targets together.
    pub overall: Option<u32>,
}

impl Limit {
    fn is_none(&self) -> bool {
        self.per_target.is_none() && self.overall.is_none()
    }
}

/// `host:pid` of this process, as written to a running job's row.
pub fn runner_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    format!("{host}:{}", std::process::id())
}

/// Every registered job kind, by kind.
#[derive(Clone, Default)]
pub struct JobRegistry {
    kinds: BTreeMap<&'static str, Arc<dyn JobKind>>,
}

impl JobRegistry {
    pub fn new(kinds: Vec<Arc<dyn JobKind>>) -> JobRegistry {
        let mut map = BTreeMap::new();
        for k in kinds {
            let previous = map.insert(k.kind(), k);
            assert!(previous.is_none(), "a job kind is registered twice");
        }
        JobRegistry { kinds: map }
    }

    pub fn get(&self, kind: &str) -> Option<Arc<dyn JobKind>> {
        self.kinds.get(kind).cloned()
    }
}

/// A job's row.
#[derive(Debug, Clone, sqlx::FromRow, Serialize)]
pub struct Job {
    pub id: i64,
    pub kind: String,
    pub target: String,
    pub params: Value,
    /// `queued`, `running`, `succeeded`, `failed`, `cancelled` or `interrupted`.
    pub status: String,
    pub phase: Option<String>,
    pub done: i64,
    pub total: i64,
    pub bytes: i64,
    pub result: Option<Value>,
    pub error: Option<String>,
    pub cancel_requested: bool,
    pub requested_by: Option<i64>,
    pub requested_by_name: Option<String>,
    pub operation_id: Option<i64>,
    pub approval_id: Option<i64>,
    pub runner: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub heartbeat_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str = "id, kind, target, params, status, phase, done, total, bytes, result, error,
    cancel_requested, requested_by, requested_by_name, operation_id, approval_id, runner,
    created_at, started_at, finished_at, heartbeat_at";

impl Job {
    pub fn is_active(&self) -> bool {
        matches!(self.status.as_str(), "queued" | "running")
    }

    /// Percent done, when the total is known.
    pub fn percent(&self) -> Option<i64> {
        (self.total > 0).then(|| (self.done.min(self.total) * 100) / self.total)
    }

    /// How long it ran (or has been running).
    pub fn duration(&self) -> String {
        let Some(start) = self.started_at else {
            return String::new();
        };
        crate::fmt::elapsed(start, self.finished_at)
    }

    /// The page a job's result names (`result.url`), if any.
    pub fn outcome_url(&self) -> Option<&str> {
        self.result.as_ref()?.get("url")?.as_str()
    }

    pub fn result_pretty(&self) -> String {
        self.result
            .as_ref()
            .and_then(|r| serde_json::to_string_pretty(r).ok())
            .unwrap_or_default()
    }
}

/// The job's input in the queue: just its id (everything else is in its row).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobInput {
    pub job_id: i64,
}

/// The underway task that runs jobs.
#[derive(Clone)]
pub struct JobTask {
    pub state: AppState,
}

/// The queue jobs live in.
///
/// A new name with the one runtime: a replica of an earlier version keeps
/// taking from `dbops-jobs` during a rolling upgrade, and would fail a kind it
/// does not know (a backup); it never sees this queue. This version drains
/// [`LEGACY_QUEUE`] too, so nothing an earlier replica queued is stranded.
pub const QUEUE: &str = "dbops-work";

/// The queue of dbops versions before the one runtime (see [`QUEUE`]).
pub const LEGACY_QUEUE: &str = "dbops-jobs";

impl underway::Task for JobTask {
    type Input = JobInput;
    type Output = ();

    async fn execute(
        &self,
        _tx: sqlx::Transaction<'_, sqlx::Postgres>,
        input: JobInput,
    ) -> underway::task::Result<()> {
        let cancel = self.state.shutdown.child_token();
        if run(&self.state, input.job_id, &cancel).await {
            Ok(())
        } else {
            // Still queued: another worker (or version) takes it later.
            Err(underway::task::Error::Retryable(format!(
                "job #{} is still queued",
                input.job_id
            )))
        }
    }

    /// A job is never run twice: a failed job is a `failed` row, and running it
    /// again is a new decision for a person. The queue offers a job again only
    /// while its row is still `queued` (it waited for a place under its kind's
    /// limit, dbops stopped, or a replica did not know its kind): at most a
    /// minute apart, for about a day; a job whose runner died is offered once
    /// more, only to find its row no longer `queued`.
    fn retry_policy(&self) -> underway::task::RetryPolicy {
        underway::task::RetryPolicy::builder()
            .max_attempts(1500)
            .initial_interval_ms(2_000)
            .max_interval_ms(60_000)
            .backoff_coefficient(2.0)
            .build()
    }

    fn timeout(&self) -> jiff::Span {
        jiff::Span::new().hours(24)
    }

    fn heartbeat(&self) -> jiff::Span {
        jiff::Span::new().seconds(30)
    }
}

/// A job to queue.
pub struct NewJob<'a> {
    /// A registered kind.
    pub kind: &'static str,
    pub target: &'a str,
    pub params: Value,
    /// The operation this job ends (an approved action's), or `None` to start
    /// one of the job's kind.
    pub operation: Option<i64>,
    /// The approval request that ends with this job.
    pub approval: Option<i64>,
    /// Run by the caller in this process ([`run_here`]) instead of a worker: the
    /// row starts `running` under this process (its lease), with no queue entry.
    /// For work that must happen now, inside other work (a safety backup before
    /// a restore) or in a command that waits (`dbops backup run --wait`).
    pub run_here: bool,
}

/// Queues a job inside the caller's transaction (so a capability's own row, the
/// job and its operation commit together). Returns the job's id and its
/// operation's id.
pub async fn submit_in(
    tx: &mut sqlx::PgConnection,
    state: &AppState,
    ctx: &AuditCtx,
    new: NewJob<'_>,
) -> Result<(i64, i64), sqlx::Error> {
    if state.job_kinds.get(new.kind).is_none() {
        return Err(sqlx::Error::Protocol(format!(
            "{} is not a registered job kind",
            new.kind
        )));
    }
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO jobs (kind, target, params, status, requested_by, requested_by_name, approval_id,
                           started_at, heartbeat_at, runner, phase)
         SELECT $1, $2, $3, CASE WHEN $7 THEN 'running' ELSE 'queued' END, $4, $5, $6,
                CASE WHEN $7 THEN clock_timestamp() END, CASE WHEN $7 THEN clock_timestamp() END,
                CASE WHEN $7 THEN $8 END, CASE WHEN $7 THEN 'starting' END
         RETURNING id",
    )
    .bind(new.kind)
    .bind(new.target)
    .bind(&new.params)
    .bind(ctx.actor.id)
    .bind(&ctx.actor.name)
    .bind(new.approval)
    .bind(new.run_here)
    .bind(runner_name())
    .fetch_one(&mut *tx)
    .await?;
    let op = match new.operation {
        Some(op) => op,
        None => {
            let mut params = new.params.clone();
            if let Value::Object(m) = &mut params {
                m.insert("job_id".into(), json!(id));
            }
            audit::start(
                &mut *tx,
                ctx,
                Entry::new(new.kind).target(new.target).params(params),
            )
            .await?
        }
    };
    sqlx::query("UPDATE jobs SET operation_id = $2 WHERE id = $1")
        .bind(id)
        .bind(op)
        .execute(&mut *tx)
        .await?;
    if new.run_here {
        return Ok((id, op));
    }
    state
        .job_queue
        .enqueue(
            &mut *tx,
            &JobTask {
                state: state.clone(),
            },
            &JobInput { job_id: id },
        )
        .await
        .map_err(|e| sqlx::Error::Protocol(format!("could not queue the job: {e}")))?;
    Ok((id, op))
}

async fn insert(state: &AppState, ctx: &AuditCtx, new: NewJob<'_>) -> Result<i64, sqlx::Error> {
    let mut tx = state.db.begin().await?;
    let (id, _) = submit_in(&mut tx, state, ctx, new).await?;
    tx.commit().await?;
    Ok(id)
}

/// Queues a job of `kind` on `target`: its row, its operations-log row (running)
/// and the durable queue entry, in one transaction. Not gated: callers submit only
/// non-destructive work, after their own checks. Returns the job's id.
pub async fn submit(
    state: &AppState,
    ctx: &AuditCtx,
    kind: &str,
    target: &str,
    params: Value,
) -> Result<i64, AppError> {
    let k = state.job_kinds.get(kind).ok_or_else(|| {
        AppError::Internal(anyhow::anyhow!("{kind} is not a registered job kind"))
    })?;
    if state.targets.get(target).is_none() {
        return Err(AppError::NotFound);
    }
    Ok(insert(
        state,
        ctx,
        NewJob {
            kind: k.kind(),
            target,
            params,
            operation: None,
            approval: None,
            run_here: false,
        },
    )
    .await?)
}

/// For an approved action whose work is long: queues it as a job of `kind`, linked
/// to the approval request and to the action's operations-log row (which the job
/// ends). Return its answer from [`crate::approvals::Action::execute`]: the request
/// stays "running" and ends executed or failed with the job.
pub async fn hand_off(ctx: &ExecCtx, kind: &str, params: Value) -> Result<Value, String> {
    let k = ctx
        .state
        .job_kinds
        .get(kind)
        .ok_or_else(|| format!("{kind} is not a registered job kind"))?;
    let id = insert(
        &ctx.state,
        &ctx.audit,
        NewJob {
            kind: k.kind(),
            target: ctx.target.name(),
            params,
            operation: Some(ctx.operation),
            approval: Some(ctx.approval),
            run_here: false,
        },
    )
    .await
    .map_err(|e| format!("could not queue the job: {e}"))?;
    Ok(json!({ HANDED_OFF: id }))
}

/// The key of an executor's answer that says its work continues as a job.
pub const HANDED_OFF: &str = "handed_off_to_job";

/// The job an executor's answer handed its work to, if it did.
pub fn handed_off(result: &Value) -> Option<i64> {
    result.get(HANDED_OFF).and_then(Value::as_i64)
}

pub async fn find(db: &PgPool, id: i64) -> Result<Option<Job>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM jobs WHERE id = $1"))
        .bind(id)
        .fetch_optional(db)
        .await
}

/// The newest job of `kind` on `target`.
pub async fn latest(db: &PgPool, kind: &str, target: &str) -> Result<Option<Job>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM jobs WHERE kind = $1 AND target = $2 ORDER BY id DESC LIMIT 1"
    ))
    .bind(kind)
    .bind(target)
    .fetch_optional(db)
    .await
}

/// The job an approved request handed its work to.
pub async fn for_approval(db: &PgPool, approval: i64) -> Result<Option<Job>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM jobs WHERE approval_id = $1 ORDER BY id DESC LIMIT 1"
    ))
    .bind(approval)
    .fetch_optional(db)
    .await
}

/// The newest jobs (the jobs page).
pub async fn recent(db: &PgPool, limit: i64) -> Result<Vec<Job>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM jobs ORDER BY id DESC LIMIT $1"
    ))
    .bind(limit)
    .fetch_all(db)
    .await
}

/// Asks a queued or running job to stop: a queued one ends `cancelled` at once; a
/// running one stops at its next check (within a second or two) and ends
/// `cancelled`. Logged either way. Returns whether there was anything to stop.
pub async fn request_cancel(state: &AppState, ctx: &AuditCtx, id: i64) -> Result<bool, AppError> {
    let mut tx = state.db.begin().await?;
    let job = stop_in(&mut tx, id).await?.ok_or(AppError::NotFound)?;
    let entry = Entry::new("job.cancel")
        .target(job.target.clone())
        .params(json!({ "job_id": id, "kind": job.kind }));
    let stopped = job.is_active();
    let entry = if stopped {
        entry
    } else {
        entry.denied(format!("job #{id} has already ended ({})", job.status))
    };
    audit::record(&mut *tx, ctx, entry).await?;
    tx.commit().await?;
    Ok(stopped)
}

/// Stops job `id` inside the caller's transaction (a capability's own Stop logs
/// its own kind): a queued job ends `cancelled` with its operation and approval;
/// a running one is asked to stop. Returns the job as it was (`None`: no such
/// job); it was stopped when it was active.
pub async fn stop_in(tx: &mut sqlx::PgConnection, id: i64) -> Result<Option<Job>, sqlx::Error> {
    let job: Option<Job> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM jobs WHERE id = $1 FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(job) = job else {
        return Ok(None);
    };
    if job.status == "queued" {
        sqlx::query(
            "UPDATE jobs SET status = 'cancelled', finished_at = clock_timestamp(),
                    error = 'stopped before it started', cancel_requested = true
             WHERE id = $1",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if let Some(op) = job.operation_id {
            audit::finish(
                &mut *tx,
                op,
                Outcome::Cancelled,
                Some("stopped before it started"),
                None,
            )
            .await?;
        }
        end_approval(&mut *tx, &job, Err("stopped before it started")).await?;
    } else if job.status == "running" {
        sqlx::query("UPDATE jobs SET cancel_requested = true WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
    }
    Ok(Some(job))
}

/// Ends the approval request a job was handed off from, with the job.
async fn end_approval(
    tx: &mut sqlx::PgConnection,
    job: &Job,
    outcome: Result<&Value, &str>,
) -> Result<(), sqlx::Error> {
    let Some(approval) = job.approval_id else {
        return Ok(());
    };
    let (state, error, result) = match outcome {
        Ok(v) => ("executed", None, Some(v.clone())),
        Err(e) => ("failed", Some(e.to_string()), None),
    };
    sqlx::query(
        "UPDATE approval_requests SET state = $2, finished_at = clock_timestamp(), error = $3, result = $4
         WHERE id = $1 AND state = 'approved'",
    )
    .bind(approval)
    .bind(state)
    .bind(error)
    .bind(result)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Runs a queued job to its end. Never panics and never returns an error: every
/// outcome is written to the job's row, its operation and its approval. Returns
/// `false` only when the job is still queued: it waited for a place under its
/// kind's [`Limit`] long enough (or dbops is stopping), or its kind is one this
/// dbops does not know (the queue offers it again).
pub async fn run(state: &AppState, id: i64, cancel: &CancellationToken) -> bool {
    // A job over its kind's limit waits here a little, then gives its worker
    // back (other kinds must not starve behind ten scheduled backups) and is
    // offered again by the queue within a minute.
    let give_back = tokio::time::Instant::now() + Duration::from_secs(20);
    let job = loop {
        match take(state, id).await {
            Ok(Taken::Job(job)) => break *job,
            Ok(Taken::NotQueued) => return true,
            Ok(Taken::Unknown) => return false,
            Ok(Taken::Wait) if tokio::time::Instant::now() >= give_back => return false,
            Ok(Taken::Wait) => {}
            Err(e) => {
                tracing::error!(job = id, error = %e, "could not start a job");
                return true;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = cancel.cancelled() => return false,
        }
    };
    run_taken(state, job, cancel).await;
    true
}

/// Runs a job submitted with [`NewJob::run_here`] in this process, to its end.
pub async fn run_here(state: &AppState, id: i64, cancel: &CancellationToken) {
    let job: Option<Job> = match sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM jobs WHERE id = $1 AND status = 'running' AND runner = $2"
    ))
    .bind(id)
    .bind(runner_name())
    .fetch_optional(&state.db)
    .await
    {
        Ok(j) => j,
        Err(e) => {
            tracing::error!(job = id, error = %e, "could not start a job");
            return;
        }
    };
    match job {
        Some(job) => run_taken(state, job, cancel).await,
        None => tracing::error!(
            job = id,
            "a job to run here is not running under this process"
        ),
    }
}

enum Taken {
    Job(Box<Job>),
    NotQueued,
    /// Its kind's limit is reached: try again shortly.
    Wait,
    /// A kind this process does not know: leave it to one that does.
    Unknown,
}

/// Takes a queued job (its row becomes `running` under this process) if its
/// kind's limit has room; the limit is counted under a lock per kind, so two
/// replicas can't both take the last place.
async fn take(state: &AppState, id: i64) -> Result<Taken, sqlx::Error> {
    let mut tx = state.db.begin().await?;
    let queued: Option<(String, String)> =
        sqlx::query_as("SELECT kind, target FROM jobs WHERE id = $1 AND status = 'queued'")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some((kind, target)) = queued else {
        return Ok(Taken::NotQueued);
    };
    let Some(known) = state.job_kinds.get(&kind) else {
        // A kind of a newer dbops (during a rolling upgrade): left queued for a
        // replica that knows it.
        tracing::warn!(job = id, kind = %kind, "a job of a kind this dbops does not know is left queued");
        return Ok(Taken::Unknown);
    };
    let limit = known.limit(state);
    if !limit.is_none() {
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('dbops.jobs.limit'), hashtext($1))")
            .bind(&kind)
            .execute(&mut *tx)
            .await?;
        let (overall, here): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE target = $2) FROM jobs
             WHERE kind = $1 AND status = 'running'",
        )
        .bind(&kind)
        .bind(&target)
        .fetch_one(&mut *tx)
        .await?;
        let full = |n: i64, max: Option<u32>| max.is_some_and(|m| n >= i64::from(m));
        if full(overall, limit.overall) || full(here, limit.per_target) {
            return Ok(Taken::Wait);
        }
    }
    let job: Option<Job> = sqlx::query_as(&format!(
        "UPDATE jobs SET status = 'running', started_at = clock_timestamp(),
                heartbeat_at = clock_timestamp(), runner = $2, phase = 'starting'
         WHERE id = $1 AND status = 'queued' RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(runner_name())
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(job.map_or(Taken::NotQueued, |j| Taken::Job(Box::new(j))))
}

/// Runs a job whose row this process has made `running`.
async fn run_taken(state: &AppState, job: Job, cancel: &CancellationToken) {
    let id = job.id;
    let progress = Arc::new(Progress::new("starting"));
    let cancel = cancel.child_token();
    let beat = tokio::spawn(heartbeat(
        state.clone(),
        id,
        progress.clone(),
        cancel.clone(),
    ));
    let outcome = match (
        state.job_kinds.get(&job.kind),
        state.targets.get(&job.target),
    ) {
        (None, _) => Err(format!("{} is not a job this dbops knows", job.kind)),
        (_, None) => Err(format!("there is no target called {} any more", job.target)),
        (Some(kind), Some(target)) => {
            let ctx = JobCtx {
                state: state.clone(),
                job: job.clone(),
                target,
                progress: progress.clone(),
                cancel: cancel.clone(),
            };
            // A panic in a job body is a failed job, not a dead worker.
            let body = std::panic::AssertUnwindSafe(kind.run(&ctx));
            match futures::FutureExt::catch_unwind(body).await {
                Ok(r) => r,
                Err(_) => Err("the job stopped on an internal error (see the server log)".into()),
            }
        }
    };
    beat.abort();
    finish(state, &job, &progress, &cancel, outcome).await;
}

/// Every second: progress into the row (which is also the lease), and a Stop
/// request into cancellation.
async fn heartbeat(state: AppState, id: i64, progress: Arc<Progress>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        match sqlx::query_scalar::<_, bool>(
            "UPDATE jobs SET heartbeat_at = clock_timestamp(), phase = $2, done = $3, total = $4, bytes = $5
             WHERE id = $1 AND status = 'running' RETURNING cancel_requested",
        )
        .bind(id)
        .bind(progress.phase())
        .bind(progress.items() as i64)
        .bind(progress.items_total() as i64)
        .bind(progress.bytes() as i64)
        .fetch_optional(&state.db)
        .await
        {
            Ok(Some(true)) => cancel.cancel(),
            Ok(_) => {}
            Err(e) => tracing::warn!(job = id, error = %e, "could not record job progress"),
        }
    }
}

async fn finish(
    state: &AppState,
    job: &Job,
    progress: &Progress,
    cancel: &CancellationToken,
    outcome: Result<Value, String>,
) {
    let stop_requested: bool =
        sqlx::query_scalar("SELECT cancel_requested FROM jobs WHERE id = $1")
            .bind(job.id)
            .fetch_one(&state.db)
            .await
            .unwrap_or(false);
    let (status, op_outcome, error) = match &outcome {
        Ok(_) => ("succeeded", Outcome::Succeeded, None),
        Err(e) if cancel.is_cancelled() && stop_requested => (
            "cancelled",
            Outcome::Cancelled,
            Some(format!("stopped by a person: {e}")),
        ),
        Err(e) if cancel.is_cancelled() => (
            "interrupted",
            Outcome::Interrupted,
            Some(format!("dbops was stopping: {e}")),
        ),
        Err(e) => ("failed", Outcome::Failed, Some(e.clone())),
    };
    let result = outcome.as_ref().ok().cloned();
    let write = async {
        let mut tx = state.db.begin().await?;
        sqlx::query(
            "UPDATE jobs SET status = $2, finished_at = clock_timestamp(), phase = NULL, error = $3,
                    result = $4, done = $5, total = $6, bytes = $7
             WHERE id = $1 AND status = 'running'",
        )
        .bind(job.id)
        .bind(status)
        .bind(&error)
        .bind(&result)
        .bind(progress.items() as i64)
        .bind(progress.items_total() as i64)
        .bind(progress.bytes() as i64)
        .execute(&mut *tx)
        .await?;
        if let Some(op) = job.operation_id {
            audit::finish(&mut *tx, op, op_outcome, error.as_deref(), result.clone()).await?;
        }
        let approval_outcome = match (&result, &error) {
            (Some(r), _) => Ok(r),
            (None, e) => Err(e.as_deref().unwrap_or("failed")),
        };
        end_approval(&mut tx, job, approval_outcome).await?;
        tx.commit().await
    };
    if let Err(e) = write.await {
        tracing::error!(job = job.id, error = %e, "could not record the end of a job");
    }
    if job.approval_id.is_some() {
        // An approved action ended: its record is signed outside the database.
        let st = state.clone();
        tokio::spawn(async move { crate::audit::checkpoint::checkpoint_now(&st, false).await });
    }
    match &error {
        None => {
            tracing::info!(job = job.id, kind = %job.kind, target = %job.target, "job succeeded")
        }
        Some(e) => {
            tracing::warn!(job = job.id, kind = %job.kind, target = %job.target, status, error = %e, "job ended");
            let event = state
                .job_kinds
                .get(&job.kind)
                .map_or(Some("job.failed"), |k| k.failure_event());
            if status == "failed"
                && let Some(event) = event
            {
                crate::notify::send(
                    state,
                    event,
                    format!(
                        "dbops: job #{} ({} on {}) failed: {e}",
                        job.id, job.kind, job.target
                    ),
                );
            }
        }
    }
}

/// Ends jobs whose runner stopped sending heartbeats (`stale` ago or more) as
/// `interrupted`, with their operations and approvals. Returns how many.
pub async fn sweep(state: &AppState, stale: Duration) -> Result<u64, sqlx::Error> {
    let mut tx = state.db.begin().await?;
    let ended: Vec<Job> = sqlx::query_as(&format!(
        "UPDATE jobs SET status = 'interrupted', finished_at = clock_timestamp(), phase = NULL,
                error = 'the dbops process running this job stopped (no heartbeat since ' ||
                        to_char(heartbeat_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || ' UTC)'
         WHERE status = 'running' AND heartbeat_at < clock_timestamp() - make_interval(secs => $1)
         RETURNING {COLUMNS}"
    ))
    .bind(stale.as_secs_f64())
    .fetch_all(&mut *tx)
    .await?;
    for job in &ended {
        tracing::warn!(job = job.id, kind = %job.kind, target = %job.target, "job interrupted: its runner stopped");
        if let Some(op) = job.operation_id {
            audit::finish(
                &mut *tx,
                op,
                Outcome::Interrupted,
                Some("the dbops process running this job stopped"),
                None,
            )
            .await?;
        }
        end_approval(
            &mut tx,
            job,
            Err("dbops stopped while this was running; check the target before asking again"),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(ended.len() as u64)
}

/// The worker that runs queued jobs in this process.
pub struct Worker {
    task: tokio::task::JoinHandle<()>,
    token: CancellationToken,
}

impl Worker {
    /// Stops taking new jobs and waits (briefly) for running ones to end.
    pub async fn stop(self) {
        self.token.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), self.task).await;
    }
}

/// Starts the job worker (any replica may take any job); with `[jobs] workers =
/// 0`, none (the worker then only waits to be stopped).
pub fn start_worker(state: &AppState) -> Worker {
    let token = CancellationToken::new();
    if state.config.jobs.workers == 0 {
        return Worker {
            task: tokio::spawn(async {}),
            token,
        };
    }
    let mut worker = underway::Worker::new(
        state.job_queue.clone(),
        JobTask {
            state: state.clone(),
        },
    );
    worker.set_concurrency_limit(state.config.jobs.workers);
    worker.set_shutdown_token(token.clone());
    let st = state.clone();
    let legacy_token = token.clone();
    let task = tokio::spawn(async move {
        // Jobs an earlier version queued, one at a time beside the rest.
        let legacy = async {
            let queue = underway::Queue::builder()
                .name(LEGACY_QUEUE)
                .pool(st.db.clone())
                .build()
                .await;
            match queue {
                Ok(q) => {
                    let mut w = underway::Worker::new(
                        std::sync::Arc::new(q),
                        JobTask { state: st.clone() },
                    );
                    w.set_concurrency_limit(1);
                    w.set_shutdown_token(legacy_token);
                    if let Err(e) = w.run_every(jiff::Span::new().seconds(5)).await {
                        tracing::error!(error = %e, "the worker of the earlier job queue stopped");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not open the earlier job queue"),
            }
        };
        let current = async {
            if let Err(e) = worker.run_every(jiff::Span::new().seconds(1)).await {
                tracing::error!(error = %e, "the job worker stopped");
            }
        };
        tokio::join!(current, legacy);
    });
    Worker { task, token }
}
