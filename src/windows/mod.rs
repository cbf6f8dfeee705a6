//! Maintenance windows (issue 20): the runbooks' checklists as guided, recorded
//! change windows.
//!
//! A window is made from a [`templates::Template`] for some targets, with a
//! planned start and duration and an owner. It needs approval like a
//! destructive action when any target's policy says so: one `window.gate`
//! request per target goes through [`crate::approvals`] (approved at once where
//! no second person is needed). Once approved it is opened; its steps then go in
//! order: an automatic step runs as a `window.step` job ([`run::StepJob`]), a
//! manual one waits for a person to tick it with a note. A failing automatic
//! step stops the window with the reason; a stopped window is resumed (the step
//! is tried again) or aborted, and the page then offers the rollback (the pinned
//! backup, the restore point). A window can't close while a step it started
//! runs; closing announces the close with a summary. Every step is in the
//! operations log; [`report_csv`] is the change-management report.
//!
//! Over 600 lines: the window's state machine (request, approval, open, the steps'
//! order, stop, resume, close, abort, overrun) and its SQL are read together here;
//! the steps' own work is in [`run`], the templates in [`templates`].

pub mod gate;
pub mod run;
pub mod templates;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::{PgExecutor, PgPool};

use crate::{
    approvals,
    audit::{self, AuditCtx, Entry},
    auth::{CurrentUser, Role},
    jobs::{self, NewJob},
    notify,
    state::AppState,
};
pub use templates::{StepKind, Template};

/// Why a window step was refused, as a sentence for the page.
#[derive(Debug, thiserror::Error)]
pub enum WindowError {
    #[error("There is no such window.")]
    NotFound,
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

impl From<approvals::ApprovalError> for WindowError {
    fn from(e: approvals::ApprovalError) -> Self {
        match e {
            approvals::ApprovalError::Db(d) => WindowError::Db(d),
            approvals::ApprovalError::NotFound => WindowError::NotFound,
            other => WindowError::Refused(other.to_string()),
        }
    }
}

impl From<WindowError> for crate::error::AppError {
    fn from(e: WindowError) -> Self {
        use crate::error::AppError;
        match e {
            WindowError::NotFound => AppError::NotFound,
            WindowError::Invalid(m) => AppError::BadRequest(m),
            WindowError::Refused(m) => AppError::Conflict(m),
            WindowError::Db(d) => d.into(),
        }
    }
}

/// The state of a window.
pub mod state {
    /// Waiting for approvers.
    pub const REQUESTED: &str = "requested";
    /// Approved (or needing no approval); not opened yet.
    pub const APPROVED: &str = "approved";
    pub const OPEN: &str = "open";
    /// An automatic step failed; resume or abort.
    pub const STOPPED: &str = "stopped";
    pub const CLOSED: &str = "closed";
    pub const ABORTED: &str = "aborted";
    /// An approval was rejected, cancelled or expired.
    pub const REJECTED: &str = "rejected";
}

/// A row of `maintenance_windows`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Window {
    pub id: i64,
    pub template: String,
    pub title: String,
    pub target: String,
    pub targets: Vec<String>,
    pub reason: String,
    pub planned_start: DateTime<Utc>,
    pub planned_minutes: i32,
    pub owner_id: Option<i64>,
    pub owner_name: String,
    pub health_url: Option<String>,
    pub state: String,
    pub stop_reason: Option<String>,
    pub approval_ids: Vec<i64>,
    pub opened_at: Option<DateTime<Utc>>,
    pub opened_by_name: Option<String>,
    pub closed_at: Option<DateTime<Utc>>,
    pub closed_by_name: Option<String>,
    pub summary: Option<String>,
    pub overrun_notified_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

const COLUMNS: &str = "id, template, title, target, targets, reason, planned_start, planned_minutes, owner_id, \
                       owner_name, health_url, state, stop_reason, approval_ids, opened_at, opened_by_name, \
                       closed_at, closed_by_name, summary, overrun_notified_at, created_at";

impl Window {
    /// Open or stopped: shown as a banner.
    pub fn is_live(&self) -> bool {
        matches!(self.state.as_str(), state::OPEN | state::STOPPED)
    }

    pub fn planned_end(&self) -> DateTime<Utc> {
        self.opened_at.unwrap_or(self.planned_start)
            + chrono::Duration::minutes(i64::from(self.planned_minutes))
    }

    /// Open longer than planned.
    pub fn overrunning(&self) -> bool {
        self.is_live() && self.opened_at.is_some() && Utc::now() > self.planned_end()
    }

    /// How long it was (or has been) open.
    pub fn duration(&self) -> String {
        match self.opened_at {
            Some(start) => crate::fmt::elapsed(start, self.closed_at),
            None => String::new(),
        }
    }

    pub fn targets_text(&self) -> String {
        self.targets.join(", ")
    }
}

/// A row of `maintenance_window_steps`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Step {
    pub id: i64,
    pub window_id: i64,
    pub position: i32,
    pub kind: String,
    pub title: String,
    pub automatic: bool,
    pub config: Value,
    /// `pending`, `running`, `done`, `failed` or `skipped`.
    pub status: String,
    pub job_id: Option<i64>,
    pub done_by: Option<i64>,
    pub done_by_name: Option<String>,
    pub note: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub output: Option<Value>,
    pub error: Option<String>,
}

const STEP_COLUMNS: &str = "id, window_id, position, kind, title, automatic, config, status, job_id, done_by, \
                            done_by_name, note, started_at, finished_at, output, error";

impl Step {
    pub fn kind(&self) -> StepKind {
        StepKind::parse(&self.kind).unwrap_or(StepKind::Manual)
    }

    pub fn finished(&self) -> bool {
        matches!(self.status.as_str(), "done" | "skipped")
    }

    pub fn duration(&self) -> String {
        match self.started_at {
            Some(s) => crate::fmt::elapsed(s, self.finished_at),
            None => String::new(),
        }
    }

    /// The output as short text for the page and the report.
    pub fn output_text(&self) -> String {
        match &self.output {
            None => String::new(),
            Some(v) => v
                .get("summary")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string()),
        }
    }

    pub fn output_pretty(&self) -> String {
        self.output
            .as_ref()
            .and_then(|v| serde_json::to_string_pretty(v).ok())
            .unwrap_or_default()
    }
}

pub async fn find(db: impl PgExecutor<'_>, id: i64) -> Result<Option<Window>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM maintenance_windows WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(db)
    .await
}

/// The newest windows (200 at most).
pub async fn list(db: &PgPool) -> Result<Vec<Window>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM maintenance_windows ORDER BY id DESC LIMIT 200"
    ))
    .fetch_all(db)
    .await
}

/// Windows open or stopped now (the overview's banner).
pub async fn live(db: &PgPool) -> Result<Vec<Window>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM maintenance_windows WHERE state IN ('open', 'stopped') ORDER BY id"
    ))
    .fetch_all(db)
    .await
}

pub async fn steps(db: impl PgExecutor<'_>, window: i64) -> Result<Vec<Step>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {STEP_COLUMNS} FROM maintenance_window_steps WHERE window_id = $1 ORDER BY position"
    ))
    .bind(window)
    .fetch_all(db)
    .await
}

pub async fn find_step(db: impl PgExecutor<'_>, id: i64) -> Result<Option<Step>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {STEP_COLUMNS} FROM maintenance_window_steps WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(db)
    .await
}

/// What a person (or pipeline) asks for.
#[derive(Debug, Clone)]
pub struct NewWindow {
    pub template: String,
    pub targets: Vec<String>,
    /// `None`: now.
    pub planned_start: Option<DateTime<Utc>>,
    pub planned_minutes: i32,
    pub health_url: Option<String>,
    pub reason: String,
}

fn entry(kind: &'static str, w: &Window) -> Entry {
    Entry::new(kind)
        .target(w.target.clone())
        .params(json!({ "window_id": w.id, "template": w.template, "targets": w.targets }))
}

/// Makes a window: its row and steps, then one `window.gate` approval request per
/// target (approved at once where the target's policy needs no second person).
/// The window is `approved` when every request is, else `requested`.
pub async fn create(
    state: &AppState,
    ctx: &AuditCtx,
    owner: &CurrentUser,
    new: NewWindow,
) -> Result<Window, WindowError> {
    let refuse = |msg: String| async {
        audit::record(
            &state.db,
            ctx,
            Entry::new("window.request")
                .params(json!({ "template": new.template, "targets": new.targets }))
                .failed(msg.clone()),
        )
        .await?;
        Err::<Window, _>(WindowError::Invalid(msg))
    };
    let Some(template) = templates::find(&state.config, &new.template) else {
        let names: Vec<String> = templates::all(&state.config)
            .into_iter()
            .map(|t| t.name)
            .collect();
        return refuse(format!(
            "There is no template called {}; there are: {}.",
            new.template,
            names.join(", ")
        ))
        .await;
    };
    let mut targets: Vec<String> = vec![];
    for t in &new.targets {
        let t = t.trim();
        if t.is_empty() || targets.iter().any(|x| x == t) {
            continue;
        }
        if state.targets.get(t).is_none() {
            return refuse(format!("There is no target called {t}.")).await;
        }
        targets.push(t.to_string());
    }
    if targets.is_empty() {
        return refuse("Name at least one target.".into()).await;
    }
    if !(1..=10080).contains(&new.planned_minutes) {
        return refuse("The planned duration is 1 minute to 7 days.".into()).await;
    }
    let reason = new.reason.trim();
    if reason.is_empty() {
        return refuse("Say what this window is for: the reason is required.".into()).await;
    }
    if reason.chars().count() > 2000 {
        return refuse("The reason is too long (2,000 characters at most).".into()).await;
    }
    let health_url = new
        .health_url
        .as_deref()
        .map(str::trim)
        .filter(|u| !u.is_empty());
    if let Some(u) = health_url
        && !url::Url::parse(u).is_ok_and(|p| matches!(p.scheme(), "http" | "https"))
    {
        return refuse(format!("“{u}” is not an http(s) URL.")).await;
    }
    let mut tx = state.db.begin().await?;
    let w: Window = sqlx::query_as(&format!(
        "INSERT INTO maintenance_windows (template, title, target, targets, reason, planned_start, planned_minutes,
                                          owner_id, owner_name, health_url, state)
         VALUES ($1, $2, $3, $4, $5, coalesce($6, now()), $7, $8, $9, $10, 'requested')
         RETURNING {COLUMNS}"
    ))
    .bind(&template.name)
    .bind(&template.title)
    .bind(&targets[0])
    .bind(&targets)
    .bind(reason)
    .bind(new.planned_start)
    .bind(new.planned_minutes)
    .bind(owner.id)
    .bind(&owner.username)
    .bind(health_url)
    .fetch_one(&mut *tx)
    .await?;
    for (i, s) in template.steps.iter().enumerate() {
        sqlx::query(
            "INSERT INTO maintenance_window_steps (window_id, position, kind, title, automatic, config)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(w.id)
        .bind(i as i32 + 1)
        .bind(s.kind.as_str())
        .bind(&s.title)
        .bind(s.kind.automatic())
        .bind(&s.config)
        .execute(&mut *tx)
        .await?;
    }
    audit::record(
        &mut *tx,
        ctx,
        entry("window.request", &w).result(json!({
            "planned_start": w.planned_start, "planned_minutes": w.planned_minutes,
            "owner": w.owner_name, "reason": w.reason,
        })),
    )
    .await?;
    tx.commit().await?;
    let form = std::collections::BTreeMap::from([("window".to_string(), w.id.to_string())]);
    let mut ids = vec![];
    for t in &targets {
        let why = format!("maintenance window #{}: {reason}", w.id);
        let req = approvals::request(state, ctx, owner, t, gate::KIND, &form, &why).await?;
        ids.push(req.id);
    }
    sqlx::query("UPDATE maintenance_windows SET approval_ids = $2 WHERE id = $1")
        .bind(w.id)
        .bind(&ids)
        .execute(&state.db)
        .await?;
    refresh_approval(state, w.id).await?;
    find(&state.db, w.id).await?.ok_or(WindowError::NotFound)
}

/// Follows the window's approval requests: all approved → `approved`; any
/// rejected, cancelled or expired → `rejected`. Returns the window.
pub async fn refresh_approval(state: &AppState, id: i64) -> Result<Window, WindowError> {
    approvals::expire_due(&state.db).await?;
    let w = find(&state.db, id).await?.ok_or(WindowError::NotFound)?;
    if w.state != state::REQUESTED {
        return Ok(w);
    }
    let states: Vec<String> =
        sqlx::query_scalar("SELECT state FROM approval_requests WHERE id = ANY($1)")
            .bind(&w.approval_ids)
            .fetch_all(&state.db)
            .await?;
    let new = if states.len() == w.approval_ids.len()
        && !states.is_empty()
        && states.iter().all(|s| s == "approved")
    {
        state::APPROVED
    } else if states
        .iter()
        .any(|s| matches!(s.as_str(), "rejected" | "cancelled" | "expired"))
    {
        state::REJECTED
    } else {
        return Ok(w);
    };
    sqlx::query("UPDATE maintenance_windows SET state = $2 WHERE id = $1 AND state = 'requested'")
        .bind(id)
        .bind(new)
        .execute(&state.db)
        .await?;
    find(&state.db, id).await?.ok_or(WindowError::NotFound)
}

/// The window that was open on `target` at `at` (a gated action requested
/// inside it links to it).
pub async fn open_at(
    db: &PgPool,
    target: &str,
    at: DateTime<Utc>,
) -> Result<Option<Window>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM maintenance_windows
         WHERE $1 = ANY(targets) AND opened_at <= $2 AND (closed_at IS NULL OR closed_at >= $2)
         ORDER BY id DESC LIMIT 1"
    ))
    .bind(target)
    .bind(at)
    .fetch_optional(db)
    .await
}

/// The window of `template` covering `target` that waits to be opened: the
/// newest approved one, else the newest still waiting for approval (a pipeline
/// opens what people approved, and asking again makes no second window).
pub async fn waiting_for(
    state: &AppState,
    template: &str,
    target: &str,
) -> Result<Option<Window>, WindowError> {
    let ids: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM maintenance_windows WHERE template = $1 AND $2 = ANY(targets)
           AND state IN ('requested', 'approved') ORDER BY id DESC",
    )
    .bind(template)
    .bind(target)
    .fetch_all(&state.db)
    .await?;
    let mut requested = None;
    for id in ids {
        let w = refresh_approval(state, id).await?;
        if w.state == state::APPROVED {
            return Ok(Some(w));
        }
        if w.state == state::REQUESTED && requested.is_none() {
            requested = Some(w);
        }
    }
    Ok(requested)
}

/// The owner as the approvals code takes them (the requester of the window's
/// requests, who may run them).
async fn owner_of(state: &AppState, w: &Window) -> Result<CurrentUser, WindowError> {
    let id = w
        .owner_id
        .ok_or_else(|| WindowError::Refused("This window's owner no longer exists.".into()))?;
    let u = crate::auth::users::find(&state.db, id)
        .await?
        .ok_or_else(|| WindowError::Refused("This window's owner no longer exists.".into()))?;
    Ok(CurrentUser {
        id,
        username: w.owner_name.clone(),
        role: u.role(),
        csrf_token: String::new(),
    })
}

/// Who a step or a close is recorded for.
#[derive(Debug, Clone)]
pub struct Person {
    pub id: Option<i64>,
    pub name: String,
}

impl Person {
    pub fn of(user: &CurrentUser) -> Person {
        Person {
            id: Some(user.id),
            name: user.username.clone(),
        }
    }

    /// The actor of an operations-log context (`cli:alice`, a token's name).
    pub fn of_ctx(ctx: &AuditCtx) -> Person {
        Person {
            id: ctx.actor.id,
            name: ctx.actor.name.clone().unwrap_or_else(|| "dbops".into()),
        }
    }
}

/// How automatic steps run: by the job workers (the console), or here in this
/// process (the command line, which waits for them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runner {
    Workers,
    Here,
}

/// Opens an approved window: runs (executes, once) its approval requests, marks
/// it open and starts its first automatic steps.
pub async fn open(
    state: &AppState,
    ctx: &AuditCtx,
    id: i64,
    runner: Runner,
) -> Result<Window, WindowError> {
    let w = refresh_approval(state, id).await?;
    let refusal = match w.state.as_str() {
        state::APPROVED => None,
        state::REQUESTED => Some(format!(
            "Window #{id} is waiting for approval (requests {}).",
            w.approval_ids
                .iter()
                .map(|i| format!("#{i}"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
        other => Some(format!("Window #{id} is {other}: it cannot be opened.")),
    };
    if let Some(msg) = refusal {
        audit::record(&state.db, ctx, entry("window.open", &w).denied(msg.clone())).await?;
        return Err(WindowError::Refused(msg));
    }
    let owner = owner_of(state, &w).await?;
    for a in &w.approval_ids {
        if let Err(e) = approvals::execute(state, ctx, &owner, *a).await {
            let msg = format!("The approval of window #{id} could not be used: {e}");
            audit::record(&state.db, ctx, entry("window.open", &w).failed(msg.clone())).await?;
            return Err(WindowError::Refused(msg));
        }
    }
    let by = Person::of_ctx(ctx);
    let mut tx = state.db.begin().await?;
    let opened = sqlx::query(
        "UPDATE maintenance_windows SET state = 'open', opened_at = clock_timestamp(), opened_by_name = $2
         WHERE id = $1 AND state = 'approved'",
    )
    .bind(id)
    .bind(&by.name)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if opened == 0 {
        return Err(WindowError::Refused(format!(
            "Window #{id} was opened by someone else just now."
        )));
    }
    audit::record(&mut *tx, ctx, entry("window.open", &w)).await?;
    tx.commit().await?;
    advance(state, ctx, id, runner).await?;
    find(&state.db, id).await?.ok_or(WindowError::NotFound)
}

/// The next step to do: the first not done or skipped.
fn next_step(steps: &[Step]) -> Option<&Step> {
    steps.iter().find(|s| !s.finished())
}

/// Starts the next automatic step if the window is open and the step before is
/// done. With [`Runner::Here`] it runs the automatic steps here, one after the
/// other, until a manual step (or a failure, or the close announcement) is next.
/// Returns the step id started last, if any.
pub async fn advance(
    state: &AppState,
    ctx: &AuditCtx,
    id: i64,
    runner: Runner,
) -> Result<Option<i64>, WindowError> {
    let mut last = None;
    loop {
        let Some((step, job)) = start_next(state, ctx, id, runner).await? else {
            return Ok(last);
        };
        last = Some(step);
        match runner {
            Runner::Workers => return Ok(last),
            Runner::Here => {
                jobs::run_here(state, job, &state.shutdown.child_token()).await;
                let s = find_step(&state.db, step).await?;
                if s.is_none_or(|s| s.status != "done" && s.status != "skipped") {
                    return Ok(last);
                }
            }
        }
    }
}

/// Claims the next step when it is automatic and pending (not the close
/// announcement, which runs at close) and submits its job. Returns (step, job).
async fn start_next(
    state: &AppState,
    ctx: &AuditCtx,
    id: i64,
    runner: Runner,
) -> Result<Option<(i64, i64)>, WindowError> {
    let mut tx = state.db.begin().await?;
    let w: Option<Window> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM maintenance_windows WHERE id = $1 FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(w) = w else {
        return Err(WindowError::NotFound);
    };
    if w.state != state::OPEN {
        return Ok(None);
    }
    let all = steps(&mut *tx, id).await?;
    let Some(next) = next_step(&all) else {
        return Ok(None);
    };
    if !next.automatic || next.status != "pending" || next.kind() == StepKind::AnnounceClose {
        return Ok(None);
    }
    let (job, _) = jobs::submit_in(
        &mut tx,
        state,
        ctx,
        NewJob {
            kind: run::JOB_KIND,
            target: &w.target,
            params: json!({
                "window_id": id, "step_id": next.id, "position": next.position,
                "step": next.kind, "title": next.title, "chain": runner == Runner::Workers,
            }),
            operation: None,
            approval: None,
            run_here: runner == Runner::Here,
        },
    )
    .await?;
    sqlx::query(
        "UPDATE maintenance_window_steps SET status = 'running', started_at = clock_timestamp(), job_id = $2
         WHERE id = $1",
    )
    .bind(next.id)
    .bind(job)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some((next.id, job)))
}

/// Ends a step the job ran: its outcome on the step; a failure stops the window
/// with the reason (logged and announced).
pub async fn finish_step(
    state: &AppState,
    ctx: &AuditCtx,
    step: &Step,
    outcome: &Result<Value, String>,
) -> Result<(), sqlx::Error> {
    let (status, output, error) = match outcome {
        Ok(v) if v.get("skipped").is_some() => ("skipped", Some(v.clone()), None),
        Ok(v) => ("done", Some(v.clone()), None),
        Err(e) => ("failed", None, Some(e.clone())),
    };
    sqlx::query(
        "UPDATE maintenance_window_steps SET status = $2, output = $3, error = $4, finished_at = clock_timestamp()
         WHERE id = $1",
    )
    .bind(step.id)
    .bind(status)
    .bind(&output)
    .bind(&error)
    .execute(&state.db)
    .await?;
    if let Some(e) = error {
        stop(state, ctx, step, &e).await?;
    }
    Ok(())
}

/// Stops a window after its step failed.
async fn stop(
    state: &AppState,
    ctx: &AuditCtx,
    step: &Step,
    error: &str,
) -> Result<(), sqlx::Error> {
    let reason = format!("Step {} ({}) failed: {error}", step.position, step.title);
    let mut tx = state.db.begin().await?;
    let w: Option<Window> = sqlx::query_as(&format!(
        "UPDATE maintenance_windows SET state = 'stopped', stop_reason = $2
         WHERE id = $1 AND state = 'open' RETURNING {COLUMNS}"
    ))
    .bind(step.window_id)
    .bind(&reason)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(w) = w else {
        return Ok(());
    };
    audit::record(
        &mut *tx,
        ctx,
        entry("window.stop", &w).failed(reason.clone()),
    )
    .await?;
    tx.commit().await?;
    notify::send(
        state,
        "window.stopped",
        format!(
            "dbops: maintenance window #{} ({} on {}) STOPPED — {reason} Resume or abort it: /windows/{}",
            w.id,
            w.title,
            w.targets_text(),
            w.id
        ),
    );
    Ok(())
}

/// Ticks a manual step (the next one of an open window), by `by` with a note;
/// logged as `window.tick`; then starts what follows.
pub async fn tick(
    state: &AppState,
    ctx: &AuditCtx,
    id: i64,
    step_ref: &str,
    by: &Person,
    note: &str,
    runner: Runner,
) -> Result<Step, WindowError> {
    let w = find(&state.db, id).await?.ok_or(WindowError::NotFound)?;
    let all = steps(&state.db, id).await?;
    let step = find_ref(&all, step_ref)?;
    let note = note.trim();
    let refusal = if w.state != state::OPEN {
        Some(format!(
            "Window #{id} is {}: steps are ticked only while it is open.",
            w.state
        ))
    } else if step.automatic {
        Some(format!(
            "Step {} ({}) is automatic: dbops runs it.",
            step.position, step.title
        ))
    } else if step.status != "pending" {
        Some(format!(
            "Step {} ({}) is already {}.",
            step.position, step.title, step.status
        ))
    } else if next_step(&all).map(|n| n.id) != Some(step.id) {
        let n = next_step(&all).expect("a pending step exists");
        Some(format!(
            "Step {} ({}) comes first{}.",
            n.position,
            n.title,
            if n.status == "running" {
                " and is running"
            } else {
                ""
            }
        ))
    } else if note.chars().count() > 2000 {
        Some("The note is too long (2,000 characters at most).".into())
    } else {
        None
    };
    let log = Entry::new("window.tick")
        .target(w.target.clone())
        .params(json!({
            "window_id": id, "step": step.position, "title": step.title, "note": note,
        }));
    if let Some(msg) = refusal {
        audit::record(&state.db, ctx, log.denied(msg.clone())).await?;
        return Err(WindowError::Refused(msg));
    }
    let mut tx = state.db.begin().await?;
    let done: Option<Step> = sqlx::query_as(&format!(
        "UPDATE maintenance_window_steps SET status = 'done', done_by = $2, done_by_name = $3, note = $4,
                started_at = coalesce(started_at, clock_timestamp()), finished_at = clock_timestamp()
         WHERE id = $1 AND status = 'pending' RETURNING {STEP_COLUMNS}"
    ))
    .bind(step.id)
    .bind(by.id)
    .bind(&by.name)
    .bind((!note.is_empty()).then_some(note))
    .fetch_optional(&mut *tx)
    .await?;
    let Some(done) = done else {
        return Err(WindowError::Refused(
            "Someone ticked this step just now.".into(),
        ));
    };
    audit::record(&mut *tx, ctx, log.result(json!({ "done_by": by.name }))).await?;
    tx.commit().await?;
    advance(state, ctx, id, runner).await?;
    Ok(done)
}

/// A step by position (`5`) or by title (exact, case-insensitive).
fn find_ref<'a>(all: &'a [Step], r: &str) -> Result<&'a Step, WindowError> {
    let r = r.trim();
    let found = match r.parse::<i32>() {
        Ok(n) => all.iter().find(|s| s.position == n),
        Err(_) => all.iter().find(|s| s.title.eq_ignore_ascii_case(r)),
    };
    found.ok_or_else(|| WindowError::Invalid(format!("This window has no step “{r}”.")))
}

/// Resumes a stopped window: its failed step is tried again.
pub async fn resume(
    state: &AppState,
    ctx: &AuditCtx,
    id: i64,
    runner: Runner,
) -> Result<Window, WindowError> {
    let w = find(&state.db, id).await?.ok_or(WindowError::NotFound)?;
    if w.state != state::STOPPED {
        let msg = format!(
            "Window #{id} is {}: only a stopped window is resumed.",
            w.state
        );
        audit::record(
            &state.db,
            ctx,
            entry("window.resume", &w).denied(msg.clone()),
        )
        .await?;
        return Err(WindowError::Refused(msg));
    }
    let mut tx = state.db.begin().await?;
    sqlx::query(
        "UPDATE maintenance_window_steps SET status = 'pending', error = NULL, output = NULL, started_at = NULL,
                finished_at = NULL, job_id = NULL
         WHERE window_id = $1 AND status = 'failed'",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE maintenance_windows SET state = 'open', stop_reason = NULL WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    audit::record(
        &mut *tx,
        ctx,
        entry("window.resume", &w).result(json!({ "stopped_because": w.stop_reason })),
    )
    .await?;
    tx.commit().await?;
    advance(state, ctx, id, runner).await?;
    find(&state.db, id).await?.ok_or(WindowError::NotFound)
}

/// The one-line summary of a window's steps.
fn summarise(w: &Window, all: &[Step], outcome: &str) -> String {
    let count = |s: &str| all.iter().filter(|x| x.status == s).count();
    format!(
        "{outcome} after {}: {} of {} steps done, {} skipped, {} failed.",
        w.duration(),
        count("done"),
        all.len(),
        count("skipped"),
        count("failed")
    )
}

/// Closes an open window: refused while a step it started runs; steps not
/// done are recorded as skipped; the close is announced with a summary (the
/// template's close step). Logged as `window.close`.
pub async fn close(
    state: &AppState,
    ctx: &AuditCtx,
    id: i64,
    note: &str,
) -> Result<Window, WindowError> {
    end(state, ctx, id, note, false).await
}

/// Aborts an open, stopped or not yet opened window: like a close, announced as
/// an abort; the window's page then offers the rollback.
pub async fn abort(
    state: &AppState,
    ctx: &AuditCtx,
    id: i64,
    note: &str,
) -> Result<Window, WindowError> {
    end(state, ctx, id, note, true).await
}

async fn end(
    state: &AppState,
    ctx: &AuditCtx,
    id: i64,
    note: &str,
    aborting: bool,
) -> Result<Window, WindowError> {
    let kind = if aborting {
        "window.abort"
    } else {
        "window.close"
    };
    let w = find(&state.db, id).await?.ok_or(WindowError::NotFound)?;
    let all = steps(&state.db, id).await?;
    let allowed: &[&str] = if aborting {
        &[
            state::OPEN,
            state::STOPPED,
            state::REQUESTED,
            state::APPROVED,
        ]
    } else {
        &[state::OPEN]
    };
    let refusal = if !allowed.contains(&w.state.as_str()) {
        Some(format!(
            "Window #{id} is {}: it cannot be {}.",
            w.state,
            if aborting { "aborted" } else { "closed" }
        ))
    } else if let Some(s) = all.iter().find(|s| s.status == "running") {
        Some(format!(
            "Step {} ({}) is running: the window can't {} until it ends (or is stopped on its job's page).",
            s.position,
            s.title,
            if aborting { "be aborted" } else { "close" }
        ))
    } else if note.chars().count() > 2000 {
        Some("The note is too long (2,000 characters at most).".into())
    } else {
        None
    };
    if let Some(msg) = refusal {
        audit::record(&state.db, ctx, entry(kind, &w).denied(msg.clone())).await?;
        return Err(WindowError::Refused(msg));
    }
    let by = Person::of_ctx(ctx);
    let outcome = if aborting { "Aborted" } else { "Closed" };
    let was_open = w.opened_at.is_some();
    // Steps not done become skipped; the close announcement is sent now.
    let mut tx = state.db.begin().await?;
    let new_state = if aborting {
        state::ABORTED
    } else {
        state::CLOSED
    };
    let ended: Option<Window> = sqlx::query_as(&format!(
        "UPDATE maintenance_windows SET state = $2, closed_at = clock_timestamp(), closed_by_name = $3
         WHERE id = $1 AND state = $4 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(new_state)
    .bind(&by.name)
    .bind(&w.state)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(ended) = ended else {
        return Err(WindowError::Refused(format!(
            "Window #{id} changed just now; look again."
        )));
    };
    sqlx::query(
        "UPDATE maintenance_window_steps SET status = 'skipped', finished_at = clock_timestamp(),
                note = coalesce(note, $2)
         WHERE window_id = $1 AND status = 'pending' AND kind <> 'announce_close'",
    )
    .bind(id)
    .bind(if aborting {
        "not done: the window was aborted"
    } else {
        "not done when the window closed"
    })
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    let all = steps(&state.db, id).await?;
    let mut summary = summarise(&ended, &all, outcome);
    if !note.trim().is_empty() {
        summary.push_str(&format!(" Note: {}", note.trim()));
    }
    // The template's close step: announce with the summary.
    let announce = all
        .iter()
        .find(|s| s.kind() == StepKind::AnnounceClose && s.status == "pending");
    let text = format!(
        "dbops: maintenance window #{} ({} on {}) {} by {}. {summary}{}",
        ended.id,
        ended.title,
        ended.targets_text(),
        outcome.to_lowercase(),
        by.name,
        if aborting {
            format!(" Rollback: /windows/{}#rollback", ended.id)
        } else {
            String::new()
        }
    );
    if let Some(step) = announce {
        let sent = if was_open {
            run::announce(state, "window.closed", &text).await
        } else {
            Ok(json!({ "skipped": "the window was never opened" }))
        };
        let (status, output, error) = match &sent {
            Ok(v) if v.get("skipped").is_some() => ("skipped", Some(v.clone()), None),
            Ok(v) => ("done", Some(v.clone()), None),
            Err(e) => ("failed", None, Some(e.clone())),
        };
        sqlx::query(
            "UPDATE maintenance_window_steps SET status = $2, output = $3, error = $4, done_by_name = $5,
                    started_at = clock_timestamp(), finished_at = clock_timestamp()
             WHERE id = $1",
        )
        .bind(step.id)
        .bind(status)
        .bind(&output)
        .bind(&error)
        .bind(&by.name)
        .execute(&state.db)
        .await?;
    } else if was_open {
        notify::send(state, "window.closed", text);
    }
    let all = steps(&state.db, id).await?;
    let summary = {
        let mut s = summarise(&ended, &all, outcome);
        if !note.trim().is_empty() {
            s.push_str(&format!(" Note: {}", note.trim()));
        }
        s
    };
    let mut tx = state.db.begin().await?;
    sqlx::query("UPDATE maintenance_windows SET summary = $2 WHERE id = $1")
        .bind(id)
        .bind(&summary)
        .execute(&mut *tx)
        .await?;
    audit::record(
        &mut *tx,
        ctx,
        entry(kind, &ended).result(json!({ "summary": summary, "rollback": rollback(&all) })),
    )
    .await?;
    tx.commit().await?;
    find(&state.db, id).await?.ok_or(WindowError::NotFound)
}

/// One way back: a label and the page that starts it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Rollback {
    pub target: String,
    pub label: String,
    pub url: String,
}

/// The rollback paths a window's steps made: the pinned backups (their page
/// has the restore) and the restore points (the recovery form).
pub fn rollback(all: &[Step]) -> Vec<Rollback> {
    let mut out = vec![];
    for s in all.iter().filter(|s| s.status == "done") {
        let Some(items) = s
            .output
            .as_ref()
            .and_then(|o| o.get("targets"))
            .and_then(Value::as_array)
        else {
            continue;
        };
        for it in items {
            let target = it["target"].as_str().unwrap_or_default().to_string();
            match s.kind() {
                StepKind::Backup => {
                    if let Some(b) = it["backup_id"].as_i64() {
                        out.push(Rollback {
                            label: format!(
                                "Restore backup #{b} of {target} (pinned for this window)"
                            ),
                            url: format!("/backups/{b}"),
                            target,
                        });
                    }
                }
                StepKind::RestorePoint => {
                    if let Some(op) = it["before_operation"].as_i64() {
                        out.push(Rollback {
                            label: format!(
                                "Recover {target} to the restore point {}",
                                it["name"].as_str().unwrap_or_default()
                            ),
                            url: format!("/targets/{target}/pitr?before_operation={op}"),
                            target,
                        });
                    }
                }
                _ => {}
            }
        }
    }
    out
}

/// Sends the overrun notice of every live window past its planned end (once per
/// window), and settles steps whose job ended without them (a dbops that
/// stopped mid-step): such a step fails and stops its window. For the periodic
/// scheduler ([`crate::actions::periodic`]).
pub async fn tick_periodic(state: &AppState) -> Result<(), String> {
    let ctx = AuditCtx::system();
    let e = |e: sqlx::Error| format!("maintenance windows: {e}");
    let over: Vec<Window> = sqlx::query_as(&format!(
        "UPDATE maintenance_windows SET overrun_notified_at = clock_timestamp()
         WHERE state IN ('open', 'stopped') AND overrun_notified_at IS NULL
           AND opened_at + make_interval(mins => planned_minutes) < now()
         RETURNING {COLUMNS}"
    ))
    .fetch_all(&state.db)
    .await
    .map_err(e)?;
    for w in over {
        let text = format!(
            "dbops: maintenance window #{} ({} on {}) has overrun: planned {} min from {}, open for {} (owner {}).",
            w.id,
            w.title,
            w.targets_text(),
            w.planned_minutes,
            crate::fmt::time(&w.opened_at.unwrap_or(w.planned_start)),
            w.duration(),
            w.owner_name
        );
        audit::record(
            &state.db,
            &ctx,
            entry("window.overrun", &w)
                .result(json!({ "planned_minutes": w.planned_minutes, "open_for": w.duration() })),
        )
        .await
        .map_err(e)?;
        notify::send(state, "window.overrun", text);
    }
    let orphans: Vec<Step> = sqlx::query_as(&format!(
        "SELECT {} FROM maintenance_window_steps s JOIN jobs j ON j.id = s.job_id
         WHERE s.status = 'running' AND j.status NOT IN ('queued', 'running')",
        STEP_COLUMNS
            .split(", ")
            .map(|c| format!("s.{c}"))
            .collect::<Vec<_>>()
            .join(", ")
    ))
    .fetch_all(&state.db)
    .await
    .map_err(e)?;
    for s in orphans {
        finish_step(
            state,
            &ctx,
            &s,
            &Err("its job ended without finishing the step (dbops stopped?)".into()),
        )
        .await
        .map_err(e)?;
    }
    Ok(())
}

/// The window report as CSV: the window's facts, then one line per step (who,
/// when, how long, outcome, output) — for change management.
pub fn report_csv(w: &Window, all: &[Step]) -> String {
    fn field(s: &str) -> String {
        // Spreadsheet formulas are not run from a report.
        let s = if s.starts_with(['=', '+', '-', '@']) {
            format!("'{s}")
        } else {
            s.to_string()
        };
        format!("\"{}\"", s.replace('"', "\"\""))
    }
    let t = |d: &Option<DateTime<Utc>>| d.map(|d| d.to_rfc3339()).unwrap_or_default();
    let mut out = String::new();
    out.push_str("window,template,targets,owner,state,reason,planned_start,planned_minutes,opened_at,closed_at,summary\n");
    out.push_str(
        &[
            w.id.to_string(),
            field(&w.template),
            field(&w.targets_text()),
            field(&w.owner_name),
            w.state.clone(),
            field(&w.reason),
            w.planned_start.to_rfc3339(),
            w.planned_minutes.to_string(),
            t(&w.opened_at),
            t(&w.closed_at),
            field(w.summary.as_deref().unwrap_or_default()),
        ]
        .join(","),
    );
    out.push_str("\n\nstep,title,kind,automatic,status,by,started_at,finished_at,duration,note,output,error\n");
    for s in all {
        out.push_str(
            &[
                s.position.to_string(),
                field(&s.title),
                s.kind.clone(),
                s.automatic.to_string(),
                s.status.clone(),
                field(
                    s.done_by_name
                        .as_deref()
                        .unwrap_or(if s.automatic { "dbops" } else { "" }),
                ),
                t(&s.started_at),
                t(&s.finished_at),
                field(&s.duration()),
                field(s.note.as_deref().unwrap_or_default()),
                field(&s.output_text()),
                field(s.error.as_deref().unwrap_or_default()),
            ]
            .join(","),
        );
        out.push('\n');
    }
    out
}

/// Whether `user` may tick steps, open and close windows on `w` (operator on
/// its first target; the route checks that, this is for the page's buttons).
pub fn can_operate(user: &CurrentUser) -> bool {
    user.has(Role::Operator)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window() -> Window {
        Window {
            id: 7,
            template: "marketplace".into(),
            title: "t".into(),
            target: "app".into(),
            targets: vec!["app".into(), "cache".into()],
            reason: "say \"hi\"".into(),
            planned_start: Utc::now(),
            planned_minutes: 30,
            owner_id: None,
            owner_name: "=cmd|' /C calc'!A0".into(),
            health_url: None,
            state: "closed".into(),
            stop_reason: None,
            approval_ids: vec![],
            opened_at: None,
            opened_by_name: None,
            closed_at: None,
            closed_by_name: None,
            summary: None,
            overrun_notified_at: None,
            created_at: Utc::now(),
        }
    }

    #[test]
    fn the_csv_report_quotes_text_and_never_starts_a_cell_with_a_formula() {
        let csv = report_csv(&window(), &[]);
        assert!(csv.contains("\"say \"\"hi\"\"\""), "{csv}");
        assert!(csv.contains("\"'=cmd"), "{csv}");
        assert!(csv.contains("\"app, cache\""), "{csv}");
    }

    #[test]
    fn rollback_lists_the_pinned_backups_and_the_restore_points() {
        let step = |kind: &str, output: Value| Step {
            id: 1,
            window_id: 7,
            position: 1,
            kind: kind.into(),
            title: String::new(),
            automatic: true,
            config: json!({}),
            status: "done".into(),
            job_id: None,
            done_by: None,
            done_by_name: None,
            note: None,
            started_at: None,
            finished_at: None,
            output: Some(output),
            error: None,
        };
        let r = rollback(&[
            step(
                "backup",
                json!({ "targets": [{ "target": "app", "backup_id": 12 }] }),
            ),
            step(
                "restore_point",
                json!({ "targets": [{ "target": "app", "name": "dbops-op-9", "before_operation": 9 }] }),
            ),
        ]);
        assert_eq!(r[0].url, "/backups/12");
        assert_eq!(r[1].url, "/targets/app/pitr?before_operation=9");
    }
}
