//! Backup pages: history across targets and per target (with charts, schedule,
//! objective and retention preview), one backup with live progress, starting,
//! cancelling and downloading; and the pipeline API.
//!
//! Over 600 lines: the backup pages (history, per target, one backup, progress,
//! cancel, download, the API) share the query and access rules of one capability.

use askama::Template;
use askama_web::WebTemplate;
use axum::{
    Form, Json,
    body::Body,
    extract::{Path, Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Redirect, Response},
};
use chrono::Utc;
use serde::Deserialize;
use serde_json::json;
use tower_sessions::Session;

use super::{Layout, chart, flash, fmt};
use crate::{
    app::AppState,
    audit::{self, AuditCtx, Entry},
    auth::{CurrentUser, Role, tokens::ApiClient},
    backups::{
        self, Backup,
        run::{self, BackupRequest, Trigger},
    },
    config::TargetKind,
    error::{AppError, AppResult},
    pg_tools::{DumpOptions, Format},
};

#[derive(Deserialize, Default)]
pub struct HistoryQuery {
    #[serde(default)]
    target: String,
    #[serde(default)]
    status: String,
}

#[derive(Template, WebTemplate)]
#[template(path = "backups/list.html")]
pub struct BackupsPage {
    layout: Layout,
    backups: Vec<Backup>,
    targets: Vec<String>,
    q: HistoryQuery,
}

const STATUSES: [&str; 7] = [
    "queued",
    "running",
    "good",
    "failed",
    "interrupted",
    "cancelled",
    "deleted",
];

/// `GET /backups`: every target's history.
pub async fn list_backups(
    State(state): State<AppState>,
    user: CurrentUser,
    Query(q): Query<HistoryQuery>,
) -> AppResult<BackupsPage> {
    let target = (!q.target.is_empty()).then_some(q.target.as_str());
    let status = STATUSES.iter().find(|s| **s == q.status).copied();
    let backups = backups::list(&state.db, target, status, 200).await?;
    Ok(BackupsPage {
        layout: Layout::load(&state, user, "backups").await?,
        backups,
        targets: state.targets.all().map(|t| t.name().to_string()).collect(),
        q,
    })
}

/// Sorting and the retention what-if on a target's page.
#[derive(Deserialize, Default)]
pub struct TargetQuery {
    #[serde(default)]
    sort: String,
    keep_last: Option<u32>,
    daily: Option<u32>,
    weekly: Option<u32>,
    monthly: Option<u32>,
}

#[derive(Template, WebTemplate)]
#[template(path = "backups/target.html")]
pub struct TargetBackupsPage {
    layout: Layout,
    target: String,
    kind: &'static str,
    policy: &'static str,
    schedule: String,
    next_runs: Vec<String>,
    objective: String,
    newest_good: String,
    overdue: bool,
    format: String,
    storage: String,
    retention: String,
    retention_note: Option<String>,
    would_delete: Vec<i64>,
    preview: Option<String>,
    policy_numbers: [u32; 4],
    sort: String,
    backups: Vec<Backup>,
    size_chart: String,
    duration_chart: String,
    can_start: bool,
    flash: Option<flash::Flash>,
}

/// `GET /targets/{target}/backups`
pub async fn target_backups(
    State(state): State<AppState>,
    user: CurrentUser,
    session: Session,
    Path(name): Path<String>,
    Query(q): Query<TargetQuery>,
) -> AppResult<TargetBackupsPage> {
    let target = state.targets.get(&name).ok_or(AppError::NotFound)?;
    let p = &target.config.backup;
    let mut backups = backups::list(&state.db, Some(&name), None, 200).await?;
    // What a policy change would delete (the policy itself lives in the config file).
    let what_if = match (q.keep_last, q.daily, q.weekly, q.monthly) {
        (None, None, None, None) => None,
        (k, d, w, m) => Some(crate::schedules::Policy {
            keep_last: k.unwrap_or(p.keep_last),
            daily: d.unwrap_or(p.daily),
            weekly: w.unwrap_or(p.weekly),
            monthly: m.unwrap_or(p.monthly),
        }),
    };
    let preview = match what_if {
        None => None,
        Some(policy) => Some(
            match crate::schedules::retention_plan(&state, &target, Some(policy)).await {
                Ok(plan) => match (&plan.held_back, plan.delete.is_empty()) {
                    (Some(why), _) => why.clone(),
                    (None, true) => "With that policy nothing would be deleted now.".to_string(),
                    (None, false) => format!(
                        "With that policy the next prune would delete {} backup(s): {}.",
                        plan.delete.len(),
                        plan.delete
                            .iter()
                            .map(|id| format!("#{id}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                },
                Err(e) => e,
            },
        ),
    };
    let (schedule, next_runs) = match &p.schedule {
        Some(expr) => match crate::schedules::Schedule::parse(expr, &p.timezone) {
            Ok(s) => (
                format!("{expr} ({})", p.timezone),
                s.next_n(Utc::now(), 3).iter().map(fmt::time).collect(),
            ),
            Err(e) => (format!("{expr}: {e}"), vec![]),
        },
        None => ("none (on demand only)".into(), vec![]),
    };
    let newest = backups
        .iter()
        .filter(|b| b.status == "good")
        .filter_map(|b| b.finished_at)
        .max();
    let objective = chrono::Duration::from_std(p.objective).unwrap_or(chrono::Duration::hours(26));
    let overdue = newest.is_none_or(|t| Utc::now() - t > objective);
    let plan = crate::schedules::retention_plan(&state, &target, None)
        .await
        .map_err(|e| AppError::Internal(anyhow::anyhow!(e)))?;
    let mut good: Vec<&Backup> = backups.iter().filter(|b| b.status == "good").collect();
    good.reverse();
    let label = |b: &Backup| {
        b.finished_at
            .map(|t| t.format("%m-%d %H:%M").to_string())
            .unwrap_or_default()
    };
    let size_points: Vec<(String, f64)> = good
        .iter()
        .map(|b| (label(b), b.bytes.unwrap_or(0) as f64))
        .collect();
    let duration_points: Vec<(String, f64)> = good
        .iter()
        .map(|b| (label(b), b.seconds().unwrap_or(0.0)))
        .collect();
    match q.sort.as_str() {
        "size" => backups.sort_by_key(|b| std::cmp::Reverse(b.bytes.unwrap_or(-1))),
        "duration" => backups.sort_by(|a, b| {
            b.seconds()
                .unwrap_or(-1.0)
                .total_cmp(&a.seconds().unwrap_or(-1.0))
        }),
        _ => {}
    }
    Ok(TargetBackupsPage {
        can_start: user.has(Role::Operator),
        flash: flash::take(&session).await,
        layout: Layout::load(&state, user, "backups").await?,
        target: name.clone(),
        kind: target.kind().as_str(),
        policy: target.policy().as_str(),
        schedule,
        next_runs,
        objective: format!("a good backup at most {} h old", objective.num_hours()),
        newest_good: newest
            .map(|t| format!("{} ({})", fmt::time(&t), fmt::ago(&t)))
            .unwrap_or_else(|| "none yet".into()),
        overdue,
        format: p.format.clone(),
        storage: state
            .storage_for(&p.storage)
            .map(|s| s.describe())
            .unwrap_or_else(|e| e),
        retention: format!(
            "keep the last {}, {} daily, {} weekly, {} monthly",
            p.keep_last, p.daily, p.weekly, p.monthly
        ),
        retention_note: plan.held_back.clone(),
        would_delete: plan.delete.clone(),
        preview,
        policy_numbers: [p.keep_last, p.daily, p.weekly, p.monthly],
        sort: q.sort.clone(),
        backups,
        size_chart: chart::line("Size of good backups", &size_points, |v| {
            fmt::bytes(v as i64)
        }),
        duration_chart: chart::line("Duration of good backups", &duration_points, |v| {
            if v < 10.0 {
                format!("{v:.1} s")
            } else {
                format!("{v:.0} s")
            }
        }),
    })
}

/// The "back up now" form.
#[derive(Deserialize, Default)]
pub struct StartForm {
    #[serde(default)]
    format: String,
    /// Text, so that an emptied field gets a sentence instead of a rejection.
    #[serde(default)]
    jobs: String,
    #[serde(default)]
    schema_only: Option<String>,
    #[serde(default)]
    data_only: Option<String>,
    #[serde(default)]
    no_owner: Option<String>,
    #[serde(default)]
    schemas: String,
    #[serde(default)]
    exclude_schemas: String,
    #[serde(default)]
    tables: String,
    #[serde(default)]
    exclude_tables: String,
    /// "Keep this backup": taken pinned, with this reason.
    #[serde(default)]
    keep: Option<String>,
    #[serde(default)]
    keep_reason: String,
}

fn patterns(s: &str) -> Vec<String> {
    s.split([',', '\n'])
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect()
}

impl StartForm {
    fn request(&self, kind: TargetKind) -> Result<BackupRequest, String> {
        let keep = match (self.keep.is_some(), self.keep_reason.trim()) {
            (false, _) => None,
            (true, "") => {
                return Err(
                    "Say why this backup is kept: the reason is required to keep it.".into(),
                );
            }
            (true, r) => Some(r.to_string()),
        };
        self.request_unkept(kind)
            .map(|r| BackupRequest { keep, ..r })
    }

    fn request_unkept(&self, kind: TargetKind) -> Result<BackupRequest, String> {
        match kind {
            TargetKind::Redis => Ok(BackupRequest {
                redis_format: (!self.format.is_empty()).then(|| self.format.clone()),
                ..Default::default()
            }),
            TargetKind::Postgres if self.format.is_empty() => Ok(BackupRequest::default()),
            TargetKind::Postgres => {
                let format = Format::parse(&self.format)
                    .ok_or_else(|| format!("“{}” is not a dump format.", self.format))?;
                let opts = DumpOptions {
                    format,
                    jobs: if format == Format::Directory {
                        match self.jobs.trim() {
                            "" => 2,
                            j => j
                                .parse()
                                .map_err(|_| format!("“{j}” is not a number of parallel jobs."))?,
                        }
                    } else {
                        1
                    },
                    schema_only: self.schema_only.is_some(),
                    data_only: self.data_only.is_some(),
                    no_owner: self.no_owner.is_some(),
                    schemas: patterns(&self.schemas),
                    exclude_schemas: patterns(&self.exclude_schemas),
                    tables: patterns(&self.tables),
                    exclude_tables: patterns(&self.exclude_tables),
                };
                opts.validate()?;
                Ok(BackupRequest {
                    options: Some(opts),
                    ..Default::default()
                })
            }
        }
    }
}

/// `POST /targets/{target}/backups`: queues a backup now.
pub async fn start_backup(
    State(state): State<AppState>,
    session: Session,
    ctx: AuditCtx,
    Path(name): Path<String>,
    Form(form): Form<StartForm>,
) -> AppResult<Redirect> {
    let target = state.targets.get(&name).ok_or(AppError::NotFound)?;
    let back = format!("/targets/{name}/backups");
    let req = match form.request(target.kind()) {
        Ok(r) => r,
        Err(msg) => {
            audit::record(
                &state.db,
                &ctx,
                Entry::new("backup.create")
                    .target(name.clone())
                    .failed(msg.clone()),
            )
            .await?;
            flash::error(&session, msg).await;
            return Ok(Redirect::to(&back));
        }
    };
    match run::request(&state, &ctx, &name, Trigger::Person, req).await {
        Ok(id) => Ok(Redirect::to(&format!("/backups/{id}"))),
        Err(backups::BackupError::Invalid(msg)) => {
            audit::record(
                &state.db,
                &ctx,
                Entry::new("backup.create")
                    .target(name.clone())
                    .failed(msg.clone()),
            )
            .await?;
            flash::error(&session, msg).await;
            Ok(Redirect::to(&back))
        }
        Err(e) => Err(e.into()),
    }
}

#[derive(Template, WebTemplate)]
#[template(path = "backups/show.html")]
pub struct BackupPage {
    layout: Layout,
    b: Backup,
    verification: String,
    options: String,
    can_download: bool,
    can_delete: bool,
    can_restore: bool,
    restores: Vec<crate::restores::Restore>,
    /// Why it must not be deleted now (pins, requests, restores).
    kept_because: Vec<String>,
    /// The people's pins, to release.
    pins: Vec<backups::pins::Pin>,
    can_pin: bool,
    flash: Option<flash::Flash>,
}

/// `GET /backups/{id}`
pub async fn show_backup(
    State(state): State<AppState>,
    user: CurrentUser,
    session: Session,
    Path(id): Path<i64>,
) -> AppResult<BackupPage> {
    let b = backups::find(&state.db, id)
        .await?
        .ok_or(AppError::NotFound)?;
    Ok(BackupPage {
        can_download: user.has(Role::Operator) && b.status == "good",
        can_delete: user.has(Role::Operator) && b.status == "good",
        can_restore: user.has(Role::Operator) && b.status == "good",
        restores: crate::restores::for_backup(&state.db, id).await?,
        kept_because: backups::pins::reasons(&state.db, id).await?,
        pins: backups::pins::of_backup(&state.db, id).await?,
        can_pin: user.has(Role::Operator)
            && matches!(b.status.as_str(), "good" | "queued" | "running"),
        verification: b
            .verification
            .as_ref()
            .map(|v| serde_json::to_string_pretty(v).unwrap_or_default())
            .unwrap_or_default(),
        options: serde_json::to_string_pretty(&b.options).unwrap_or_default(),
        flash: flash::take(&session).await,
        layout: Layout::load(&state, user, "backups").await?,
        b,
    })
}

#[derive(Template, WebTemplate)]
#[template(path = "backups/_progress.html")]
pub struct ProgressPartial {
    b: Backup,
}

/// `GET /backups/{id}/progress`: the live part of a backup's page (htmx polls it
/// while the backup is queued or running; it stops polling once it ends).
pub async fn backup_progress(
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> AppResult<Response> {
    let b = backups::find(&state.db, id)
        .await?
        .ok_or(AppError::NotFound)?;
    let done = !b.is_active();
    let mut res = ProgressPartial { b }.into_response();
    if done {
        // Reload the whole page once, to show the result and the buttons.
        res.headers_mut()
            .insert("hx-refresh", header::HeaderValue::from_static("true"));
    }
    Ok(res)
}

/// `POST /backups/{id}/cancel`
pub async fn cancel_backup(
    State(state): State<AppState>,
    session: Session,
    ctx: AuditCtx,
    Path(id): Path<i64>,
) -> AppResult<Redirect> {
    backups::find(&state.db, id)
        .await?
        .ok_or(AppError::NotFound)?;
    match backups::run::cancel(&state, &ctx, id).await? {
        Ok(()) => {
            flash::ok(
                &session,
                "Cancelling: the backup stops and leaves nothing behind.",
            )
            .await
        }
        Err(status) => {
            flash::error(
                &session,
                format!("This backup is {status}: there is nothing to cancel."),
            )
            .await
        }
    }
    Ok(Redirect::to(&format!("/backups/{id}")))
}

/// `GET /backups/{id}/download`: the artifact, streamed; logged.
pub async fn download_backup(
    State(state): State<AppState>,
    ctx: AuditCtx,
    Path(id): Path<i64>,
) -> AppResult<Response> {
    let b = backups::find(&state.db, id)
        .await?
        .ok_or(AppError::NotFound)?;
    let entry = Entry::new("backup.download")
        .target(b.target.clone())
        .params(json!({ "backup_id": id, "bytes": b.bytes }));
    let (Some(key), "good") = (b.storage_key.clone(), b.status.as_str()) else {
        audit::record(
            &state.db,
            &ctx,
            entry.failed(format!("the backup is {}", b.status)),
        )
        .await?;
        return Err(AppError::Conflict(format!(
            "Backup #{id} is {}: there is nothing to download.",
            b.status
        )));
    };
    let storage = state
        .storage_for(&b.storage)
        .map_err(AppError::Unavailable)?;
    let reader = match storage.open(&key).await {
        Ok(r) => r,
        Err(e) => {
            audit::record(&state.db, &ctx, entry.failed(e.to_string())).await?;
            return Err(AppError::Unavailable(format!(
                "The backup file cannot be read: {e}"
            )));
        }
    };
    audit::record(&state.db, &ctx, entry).await?;
    let name = key.rsplit('/').next().unwrap_or("backup").to_string();
    let mut res = Body::from_stream(tokio_util::io::ReaderStream::new(reader)).into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = header::HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    if let Some(bytes) = b.bytes {
        h.insert(header::CONTENT_LENGTH, bytes.into());
    }
    if let Some(sha) = &b.sha256
        && let Ok(v) = header::HeaderValue::from_str(sha)
    {
        h.insert("x-checksum-sha256", v);
    }
    Ok(res)
}

/// `POST /api/v1/targets/{target}/backups` (token scope `backup:create`): queues a
/// backup with the target's policy. Answers `202` with the backup's id and where to
/// poll.
pub async fn api_start_backup(
    State(state): State<AppState>,
    client: axum::Extension<ApiClient>,
    ctx: AuditCtx,
    Path(name): Path<String>,
) -> Response {
    if !client.may_use(&name) || state.targets.get(&name).is_none() {
        let _ = audit::record(
            &state.db,
            &ctx,
            Entry::new("backup.create")
                .target(name.clone())
                .denied("the token is not for this target"),
        )
        .await;
        return (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": format!("no target {name} for this token") })),
        )
            .into_response();
    }
    match run::request(&state, &ctx, &name, Trigger::Api, BackupRequest::default()).await {
        Ok(id) => (
            StatusCode::ACCEPTED,
            Json(json!({ "id": id, "status": "queued", "url": format!("/api/v1/backups/{id}") })),
        )
            .into_response(),
        Err(e) => (
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": e.to_string() })),
        )
            .into_response(),
    }
}

/// `GET /api/v1/backups/{id}` (token scope `backup:read`): a backup's state, for a
/// pipeline waiting on it.
pub async fn api_get_backup(
    State(state): State<AppState>,
    client: axum::Extension<ApiClient>,
    Path(id): Path<i64>,
) -> Response {
    match backups::find(&state.db, id).await {
        Ok(Some(b)) if client.may_use(&b.target) => Json(json!({
            "id": b.id, "target": b.target, "status": b.status, "phase": b.phase,
            "bytes": b.bytes, "sha256": b.sha256, "error": b.error,
            "started_at": b.started_at, "finished_at": b.finished_at,
        }))
        .into_response(),
        Ok(_) => (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": "no such backup" })),
        )
            .into_response(),
        Err(e) => AppError::from(e).into_response(),
    }
}

/// The "keep this backup" form.
#[derive(Deserialize)]
pub struct PinForm {
    #[serde(default)]
    reason: String,
    /// `YYYY-MM-DD` (UTC, end of that day), or empty for no expiry.
    #[serde(default)]
    until: String,
}

/// A date typed as `YYYY-MM-DD`: the end of that day, UTC.
fn end_of_day(s: &str) -> Result<Option<chrono::DateTime<chrono::Utc>>, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(23, 59, 59))
        .map(|t| Some(t.and_utc()))
        .ok_or_else(|| format!("“{s}” is not a date: write it as YYYY-MM-DD, or leave it empty."))
}

/// `POST /backups/{id}/pin`: keeps a backup (retention and deletion leave it)
/// with a reason and an optional expiry.
pub async fn pin_backup(
    State(state): State<AppState>,
    session: Session,
    ctx: AuditCtx,
    Path(id): Path<i64>,
    Form(form): Form<PinForm>,
) -> AppResult<Redirect> {
    let back = format!("/backups/{id}");
    backups::find(&state.db, id)
        .await?
        .ok_or(AppError::NotFound)?;
    let until = match end_of_day(&form.until) {
        Ok(u) => u,
        Err(msg) => {
            audit::record(
                &state.db,
                &ctx,
                Entry::new("backup.pin")
                    .params(json!({ "backup_id": id }))
                    .failed(msg.clone()),
            )
            .await?;
            flash::error(&session, msg).await;
            return Ok(Redirect::to(&back));
        }
    };
    match backups::pins::pin(&state.db, &ctx, id, &form.reason, until).await {
        Ok(_) => flash::ok(&session, "Kept: retention and deletion leave this backup alone until the pin is released or expires.").await,
        Err(backups::pins::PinError::Refused(m)) => flash::error(&session, m).await,
        Err(backups::pins::PinError::Db(e)) => return Err(e.into()),
    }
    Ok(Redirect::to(&back))
}

/// `POST /backups/{id}/pins/{pin}/release`
pub async fn release_pin(
    State(state): State<AppState>,
    session: Session,
    ctx: AuditCtx,
    Path((id, pin)): Path<(i64, i64)>,
) -> AppResult<Redirect> {
    match backups::pins::release(&state.db, &ctx, id, pin).await {
        Ok(()) => flash::ok(&session, "The pin is released.").await,
        Err(backups::pins::PinError::Refused(m)) => flash::error(&session, m).await,
        Err(backups::pins::PinError::Db(e)) => return Err(e.into()),
    }
    Ok(Redirect::to(&format!("/backups/{id}")))
}
