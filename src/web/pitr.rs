//! Point-in-time recovery pages: per target the recoverable window (a timeline
//! from the oldest base backup's end to the newest stored WAL, gaps marked),
//! base backups, restore points and the recovery form; one recovery with live
//! progress, then its tables, the copy into a new database and Done.

use askama::Template;
use askama_web::WebTemplate;
use axum::{
    Form,
    extract::{Path, Query, State},
    response::{IntoResponse, Redirect, Response},
};
use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::Layout;
use crate::{
    app::AppState,
    audit::AuditCtx,
    auth::CurrentUser,
    config::TargetKind,
    error::{AppError, AppResult},
    pitr::{
        base_backups::{self, BaseBackup},
        recover::{self, Point, Recovery, Window},
        restore_points::{self, RestorePoint},
    },
};

/// A mark on the timeline, at `left` percent.
pub struct Mark {
    pub left: f64,
    pub width: f64,
    pub label: String,
}

#[derive(Template, WebTemplate)]
#[template(path = "pitr.html")]
pub struct PitrPage {
    layout: Layout,
    target: String,
    timezone: String,
    archived: bool,
    /// The lead's archive status (stream, lag, slot, server problems).
    archive: Option<crate::pitr::archive::ArchiveStatus>,
    archive_error: Option<String>,
    window: Window,
    window_text: String,
    gaps: Vec<Mark>,
    points: Vec<Mark>,
    base_backups: Vec<BaseBackup>,
    restore_points: Vec<RestorePoint>,
    recoveries: Vec<Recovery>,
    /// Prefilled "before operation #N" (from the operations log's link).
    before_operation: String,
    error: Option<String>,
    notice: Option<String>,
}

fn pct(t: DateTime<Utc>, from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    let span = (to - from).num_milliseconds().max(1) as f64;
    (((t - from).num_milliseconds() as f64 / span) * 100.0).clamp(0.0, 100.0)
}

#[derive(Deserialize, Default)]
pub struct PitrQuery {
    #[serde(default)]
    before_operation: Option<i64>,
    #[serde(default)]
    notice: Option<String>,
}

async fn page(
    state: &AppState,
    user: CurrentUser,
    target: &str,
    before_operation: String,
    error: Option<String>,
    notice: Option<String>,
) -> AppResult<PitrPage> {
    let t = state
        .targets
        .get(target)
        .filter(|t| t.kind() == TargetKind::Postgres)
        .ok_or(AppError::NotFound)?;
    let window = recover::window(state, target)
        .await
        .map_err(AppError::BadRequest)?;
    let rps = restore_points::list(&state.db, target, 50).await?;
    let (mut gaps, mut points) = (vec![], vec![]);
    if let (Some(from), Some(to)) = (window.from, window.to)
        && from < to
    {
        for g in &window.gaps {
            let l = pct(g.after, from, to);
            gaps.push(Mark {
                left: l,
                width: (pct(g.before, from, to) - l).max(0.5),
                label: format!("WAL {} to {} missing", g.from(), g.to()),
            });
        }
        for p in rps
            .iter()
            .filter(|p| p.created_at >= from && p.created_at <= to)
        {
            points.push(Mark {
                left: pct(p.created_at, from, to),
                width: 0.0,
                label: p.name.clone(),
            });
        }
    }
    let (archive, archive_error) = if t.config.archive.is_some() {
        match crate::pitr::archive::status(state, &t, true).await {
            Ok(a) => (Some(a), None),
            Err(e) => (None, Some(e)),
        }
    } else {
        (None, None)
    };
    Ok(PitrPage {
        archive,
        archive_error,
        layout: Layout::load(state, user, "backups").await?,
        target: target.to_string(),
        timezone: t.config.backup.timezone.clone(),
        archived: t.config.archive.is_some(),
        window_text: window.describe(),
        window,
        gaps,
        points,
        base_backups: base_backups::list(&state.db, target, 30).await?,
        restore_points: rps,
        recoveries: recover::list(&state.db, target, 20).await?,
        before_operation,
        error,
        notice,
    })
}

/// `GET /targets/{target}/pitr`
pub async fn show_pitr(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(target): Path<String>,
    Query(q): Query<PitrQuery>,
) -> AppResult<Response> {
    let before = q
        .before_operation
        .map(|n| n.to_string())
        .unwrap_or_default();
    Ok(page(&state, user, &target, before, None, q.notice)
        .await?
        .into_response())
}

/// `POST /targets/{target}/pitr/base-backups`: queues a base backup.
pub async fn take_base_backup(
    State(state): State<AppState>,
    user: CurrentUser,
    ctx: AuditCtx,
    Path(target): Path<String>,
) -> AppResult<Response> {
    match base_backups::request(
        &state,
        &ctx,
        &target,
        base_backups::Trigger::Person,
        None,
        false,
    )
    .await
    {
        Ok((id, _)) => Ok(Redirect::to(&format!(
            "/targets/{target}/pitr?notice=Base+backup+%23{id}+is+queued"
        ))
        .into_response()),
        Err(base_backups::RequestError::Db(e)) => Err(e.into()),
        Err(e) => Ok(page(
            &state,
            user,
            &target,
            String::new(),
            Some(e.to_string()),
            None,
        )
        .await?
        .into_response()),
    }
}

#[derive(Deserialize, Default)]
pub struct RecoverForm {
    /// `time`, `restore_point` or `operation`.
    #[serde(default)]
    kind: String,
    #[serde(default)]
    time: String,
    /// `utc` or `local` (the target's backup time zone).
    #[serde(default)]
    zone: String,
    #[serde(default)]
    restore_point: String,
    #[serde(default)]
    operation: String,
}

/// `POST /targets/{target}/pitr/recoveries`: checks the point and queues the
/// recovery; a refusal (outside the window, a gap) re-shows the page with why.
pub async fn start_recovery(
    State(state): State<AppState>,
    user: CurrentUser,
    ctx: AuditCtx,
    Path(target): Path<String>,
    Form(form): Form<RecoverForm>,
) -> AppResult<Response> {
    let t = state
        .targets
        .get(&target)
        .filter(|t| t.kind() == TargetKind::Postgres)
        .ok_or(AppError::NotFound)?;
    let tz = if form.zone == "utc" {
        "UTC".to_string()
    } else {
        t.config.backup.timezone.clone()
    };
    let point = match form.kind.as_str() {
        "time" => recover::parse_time(form.time.trim(), &tz).map(Point::Time),
        "restore_point" if !form.restore_point.trim().is_empty() => {
            Ok(Point::RestorePoint(form.restore_point.trim().to_string()))
        }
        "operation" => form
            .operation
            .trim()
            .trim_start_matches('#')
            .parse()
            .map(Point::BeforeOperation)
            .map_err(|_| format!("“{}” is not an operation number", form.operation.trim())),
        _ => Err("Choose a time, a restore point or an operation to recover to.".to_string()),
    };
    let result = match point {
        Ok(p) => recover::request(&state, &ctx, &target, &p, false).await,
        Err(e) => {
            let _ = crate::audit::record(
                &state.db,
                &ctx,
                crate::audit::Entry::new(recover::JOB_KIND)
                    .target(target.clone())
                    .failed(e.clone()),
            )
            .await;
            Err(e)
        }
    };
    match result {
        Ok((id, _)) => {
            Ok(Redirect::to(&format!("/targets/{target}/pitr/recoveries/{id}")).into_response())
        }
        Err(e) => Ok(
            page(&state, user, &target, form.operation.clone(), Some(e), None)
                .await?
                .into_response(),
        ),
    }
}

#[derive(Template, WebTemplate)]
#[template(path = "pitr_recovery.html")]
pub struct RecoveryPage {
    layout: Layout,
    r: Recovery,
    job: Option<crate::jobs::Job>,
    tables: Vec<(String, String, i64)>,
    databases: Vec<String>,
    targets: Vec<String>,
    error: Option<String>,
    notice: Option<String>,
}

#[derive(Template, WebTemplate)]
#[template(path = "pitr_progress.html")]
pub struct ProgressPart {
    r: Recovery,
    job: Option<crate::jobs::Job>,
}

async fn find_recovery(state: &AppState, target: &str, id: i64) -> AppResult<Recovery> {
    recover::find(&state.db, id)
        .await?
        .filter(|r| r.target == target)
        .ok_or(AppError::NotFound)
}

async fn recovery_page(
    state: &AppState,
    user: CurrentUser,
    r: Recovery,
    error: Option<String>,
    notice: Option<String>,
) -> AppResult<RecoveryPage> {
    let job = match r.job_id {
        Some(j) => crate::jobs::find(&state.db, j).await?,
        None => None,
    };
    let (tables, error) = if r.status == "ready" {
        match recover::tables(&r).await {
            Ok(t) => (t, error),
            Err(e) => (vec![], error.or(Some(e))),
        }
    } else {
        (vec![], error)
    };
    let mut databases: Vec<String> = tables.iter().map(|t| t.0.clone()).collect();
    databases.dedup();
    Ok(RecoveryPage {
        layout: Layout::load(state, user, "backups").await?,
        targets: state
            .targets
            .all()
            .filter(|t| t.kind() == TargetKind::Postgres)
            .map(|t| t.name().to_string())
            .collect(),
        r,
        job,
        tables,
        databases,
        error,
        notice,
    })
}

#[derive(Deserialize, Default)]
pub struct NoticeQuery {
    #[serde(default)]
    notice: Option<String>,
}

/// `GET /targets/{target}/pitr/recoveries/{id}`
pub async fn show_recovery(
    State(state): State<AppState>,
    user: CurrentUser,
    Path((target, id)): Path<(String, i64)>,
    Query(q): Query<NoticeQuery>,
) -> AppResult<Response> {
    let r = find_recovery(&state, &target, id).await?;
    Ok(recovery_page(&state, user, r, None, q.notice)
        .await?
        .into_response())
}

/// `GET /targets/{target}/pitr/recoveries/{id}/progress`: the live part (htmx
/// polls it while the recovery runs; once it has ended the part asks for the
/// whole page again, which stops the polling).
pub async fn recovery_progress(
    State(state): State<AppState>,
    _user: CurrentUser,
    Path((target, id)): Path<(String, i64)>,
) -> AppResult<Response> {
    let r = find_recovery(&state, &target, id).await?;
    let job = match r.job_id {
        Some(j) => crate::jobs::find(&state.db, j).await?,
        None => None,
    };
    if !matches!(r.status.as_str(), "queued" | "recovering") {
        let mut resp = ProgressPart { r, job }.into_response();
        resp.headers_mut()
            .insert("HX-Refresh", axum::http::HeaderValue::from_static("true"));
        return Ok(resp);
    }
    Ok(ProgressPart { r, job }.into_response())
}

#[derive(Deserialize, Default)]
pub struct CopyForm {
    #[serde(default)]
    database: String,
    #[serde(default)]
    tables: String,
    #[serde(default)]
    into: String,
    #[serde(default)]
    new_database: String,
}

/// `POST /targets/{target}/pitr/recoveries/{id}/copy`: a recovered database (or
/// some of its tables) into a NEW database on a PostgreSQL target.
pub async fn copy_recovered(
    State(state): State<AppState>,
    user: CurrentUser,
    ctx: AuditCtx,
    Path((target, id)): Path<(String, i64)>,
    Form(form): Form<CopyForm>,
) -> AppResult<Response> {
    let r = find_recovery(&state, &target, id).await?;
    let tables: Vec<String> = form
        .tables
        .split([',', '\n', ' '])
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect();
    let into = if form.into.is_empty() {
        target.clone()
    } else {
        form.into.clone()
    };
    match recover::request_copy(
        &state,
        &ctx,
        id,
        form.database.trim(),
        &tables,
        &into,
        form.new_database.trim(),
        false,
    )
    .await
    {
        Ok(job) => Ok(Redirect::to(&format!("/jobs/{job}")).into_response()),
        Err(e) => Ok(recovery_page(&state, user, r, Some(e), None)
            .await?
            .into_response()),
    }
}

/// `POST /targets/{target}/pitr/recoveries/{id}/done`: removes the scratch server.
pub async fn recovery_done(
    State(state): State<AppState>,
    user: CurrentUser,
    ctx: AuditCtx,
    Path((target, id)): Path<(String, i64)>,
) -> AppResult<Response> {
    let r = find_recovery(&state, &target, id).await?;
    match recover::remove(&state, &ctx, id, "done").await {
        Ok(()) => Ok(Redirect::to(&format!(
            "/targets/{target}/pitr/recoveries/{id}?notice=The+scratch+server+is+removed"
        ))
        .into_response()),
        Err(e) => Ok(recovery_page(&state, user, r, Some(e), None)
            .await?
            .into_response()),
    }
}

#[derive(Deserialize, Default)]
pub struct PinForm {
    #[serde(default)]
    reason: String,
}

/// `POST /targets/{target}/pitr/base-backups/{id}/pin`: keeps a base backup
/// (and the WAL from its start) out of retention, with a reason.
pub async fn pin_base_backup(
    State(state): State<AppState>,
    user: CurrentUser,
    ctx: AuditCtx,
    Path((target, id)): Path<(String, i64)>,
    Form(form): Form<PinForm>,
) -> AppResult<Response> {
    pin_or_unpin(state, user, ctx, target, id, Some(form.reason)).await
}

/// `POST /targets/{target}/pitr/base-backups/{id}/unpin`
pub async fn unpin_base_backup(
    State(state): State<AppState>,
    user: CurrentUser,
    ctx: AuditCtx,
    Path((target, id)): Path<(String, i64)>,
) -> AppResult<Response> {
    pin_or_unpin(state, user, ctx, target, id, None).await
}

async fn pin_or_unpin(
    state: AppState,
    user: CurrentUser,
    ctx: AuditCtx,
    target: String,
    id: i64,
    reason: Option<String>,
) -> AppResult<Response> {
    let notice = if reason.is_some() {
        format!("Base backup #{id} is pinned: retention keeps it and the WAL from its start")
    } else {
        format!("Base backup #{id} is unpinned: retention may delete it")
    };
    match base_backups::pin(&state, &ctx, &target, id, reason.as_deref()).await {
        Ok(()) => {
            let q: String = url::form_urlencoded::Serializer::new(String::new())
                .append_pair("notice", &notice)
                .finish();
            Ok(Redirect::to(&format!("/targets/{target}/pitr?{q}#base-backups")).into_response())
        }
        Err(e) => {
            let page = page(&state, user, &target, String::new(), Some(e), None).await?;
            Ok((axum::http::StatusCode::BAD_REQUEST, page).into_response())
        }
    }
}
