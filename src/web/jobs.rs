//! Job pages: the newest jobs, one job with live progress (phase, items done of
//! total) and a Stop button, then its outcome or a link to the page that shows it.

use askama::Template;
use askama_web::WebTemplate;
use axum::{
    extract::{Path, State},
    http::header,
    response::{IntoResponse, Redirect, Response},
};
use tower_sessions::Session;

use super::{Layout, flash};
use crate::{
    app::AppState,
    audit::AuditCtx,
    auth::{CurrentUser, Role},
    error::{AppError, AppResult},
    jobs::{self, Job},
};

#[derive(Template, WebTemplate)]
#[template(path = "jobs/list.html")]
pub struct JobsPage {
    layout: Layout,
    jobs: Vec<Job>,
}

#[derive(Template, WebTemplate)]
#[template(path = "jobs/show.html")]
pub struct JobPage {
    layout: Layout,
    job: Job,
    title: &'static str,
    result_url: Option<String>,
    /// What the job works on: (label, its page).
    subject: Option<(String, String)>,
    can_stop: bool,
    flash: Option<flash::Flash>,
    /// Why the result and error are not shown to this reader (the operations
    /// log's rule, [`crate::audit::details_role`]).
    hidden: Option<String>,
}

#[derive(Template, WebTemplate)]
#[template(path = "jobs/_progress.html")]
pub struct ProgressPartial {
    job: Job,
}

/// `GET /jobs`
pub async fn list_jobs(State(state): State<AppState>, user: CurrentUser) -> AppResult<JobsPage> {
    Ok(JobsPage {
        layout: Layout::load(&state, user, "jobs").await?,
        jobs: jobs::recent(&state.db, 100).await?,
    })
}

/// `GET /jobs/{id}`
pub async fn show_job(
    State(state): State<AppState>,
    user: CurrentUser,
    session: Session,
    Path(id): Path<i64>,
) -> AppResult<JobPage> {
    let mut job = jobs::find(&state.db, id).await?.ok_or(AppError::NotFound)?;
    let hidden = (!crate::audit::details_visible(&job.kind, user.role))
        .then(|| crate::audit::hidden_marker(&job.kind, user.role));
    if hidden.is_some() {
        job.result = None;
        job.error = None;
    }
    let kind = state.job_kinds.get(&job.kind);
    let result_url = kind
        .as_ref()
        .filter(|_| job.status == "succeeded")
        .and_then(|k| k.result_url(&job));
    let subject = kind.as_ref().and_then(|k| k.subject(&job));
    Ok(JobPage {
        subject,
        can_stop: job.is_active() && user.has(Role::Operator),
        title: kind.map(|k| k.title()).unwrap_or("Job"),
        layout: Layout::load(&state, user, "jobs").await?,
        job,
        result_url,
        flash: flash::take(&session).await,
        hidden,
    })
}

/// `GET /jobs/{id}/progress`: the part of the page that refreshes itself; once
/// the job has ended, the whole page reloads to show the outcome.
pub async fn job_progress(
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> AppResult<Response> {
    let job = jobs::find(&state.db, id).await?.ok_or(AppError::NotFound)?;
    let done = !job.is_active();
    let mut res = ProgressPartial { job }.into_response();
    if done {
        res.headers_mut()
            .insert("hx-refresh", header::HeaderValue::from_static("true"));
    }
    Ok(res)
}

/// `POST /jobs/{id}/cancel`: the Stop button.
pub async fn cancel_job(
    State(state): State<AppState>,
    session: Session,
    ctx: AuditCtx,
    Path(id): Path<i64>,
) -> AppResult<Redirect> {
    if jobs::request_cancel(&state, &ctx, id).await? {
        flash::ok(&session, "Stopping: the job ends at its next step.").await;
    } else {
        flash::error(&session, "This job has already ended.").await;
    }
    Ok(Redirect::to(&format!("/jobs/{id}")))
}
