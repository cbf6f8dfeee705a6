//! Maintenance window pages: the list (and the form that schedules one), one
//! window with its steps (who, when, how long, outcome, output) and its
//! buttons, the printable report and its CSV; and the pipeline API.

use askama::Template;
use askama_web::WebTemplate;
use axum::{
    Form, Json,
    extract::{Path, State},
    http::{StatusCode, header},
    response::{IntoResponse, Redirect, Response},
};
use serde::Deserialize;
use serde_json::json;
use tower_sessions::Session;

use super::{Layout, flash};
use crate::{
    app::AppState,
    audit::{self, AuditCtx, Entry},
    auth::{CurrentUser, Role, roles, tokens::ApiClient},
    error::{AppError, AppResult},
    windows::{
        self, NewWindow, Person, Rollback, Runner, Step, Template as WindowTemplate, Window,
    },
};

#[derive(Template, WebTemplate)]
#[template(path = "windows/list.html")]
pub struct WindowsPage {
    layout: Layout,
    windows: Vec<Window>,
    templates: Vec<WindowTemplate>,
    targets: Vec<String>,
    can_create: bool,
    flash: Option<flash::Flash>,
}

/// `GET /windows`
pub async fn list_windows(
    State(state): State<AppState>,
    user: CurrentUser,
    session: Session,
) -> AppResult<WindowsPage> {
    Ok(WindowsPage {
        can_create: user.has(Role::Operator),
        layout: Layout::load(&state, user, "windows").await?,
        windows: windows::list(&state.db).await?,
        templates: windows::templates::all(&state.config),
        targets: state.targets.all().map(|t| t.name().to_string()).collect(),
        flash: flash::take(&session).await,
    })
}

/// The "schedule a window" form.
#[derive(Deserialize)]
pub struct NewWindowForm {
    template: String,
    /// Comma-separated, or several fields.
    #[serde(default)]
    targets: String,
    /// `YYYY-MM-DDTHH:MM` (UTC), or empty for now.
    #[serde(default)]
    planned_start: String,
    #[serde(default)]
    planned_minutes: String,
    #[serde(default)]
    health_url: String,
    #[serde(default)]
    reason: String,
}

fn parse_start(s: &str) -> Result<Option<chrono::DateTime<chrono::Utc>>, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M")
        .or_else(|_| chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M"))
        .map(|t| Some(t.and_utc()))
        .or_else(|_| {
            chrono::DateTime::parse_from_rfc3339(s).map(|t| Some(t.with_timezone(&chrono::Utc)))
        })
        .map_err(|_| format!("“{s}” is not a time: write YYYY-MM-DDTHH:MM (UTC)."))
}

/// `POST /windows`: schedules a window (and asks for its approvals). The user
/// must be an operator on every target of it.
pub async fn create_window(
    State(state): State<AppState>,
    user: CurrentUser,
    session: Session,
    ctx: AuditCtx,
    Form(form): Form<NewWindowForm>,
) -> AppResult<Redirect> {
    let targets: Vec<String> = form
        .targets
        .split([',', ' '])
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect();
    for t in &targets {
        if state.targets.get(t).is_some()
            && roles::role_on(&state, &user, t).await? < Role::Operator
        {
            let msg = format!("This needs the operator role or higher on {t}.");
            audit::record(
                &state.db,
                &ctx,
                Entry::new("window.request")
                    .target(t.clone())
                    .denied(msg.clone()),
            )
            .await?;
            return Err(AppError::Forbidden(msg));
        }
    }
    let start = match parse_start(&form.planned_start) {
        Ok(s) => s,
        Err(m) => {
            flash::error(&session, m).await;
            return Ok(Redirect::to("/windows"));
        }
    };
    let minutes = form.planned_minutes.trim().parse::<i32>().unwrap_or(60);
    let new = NewWindow {
        template: form.template,
        targets,
        planned_start: start,
        planned_minutes: minutes,
        health_url: Some(form.health_url),
        reason: form.reason,
    };
    match windows::create(&state, &ctx, &user, new).await {
        Ok(w) => {
            flash::ok(
                &session,
                if w.state == windows::state::APPROVED {
                    "The window is scheduled and needs no approval: open it when the time comes."
                } else {
                    "The window is scheduled; it waits for an approver (its requests are linked below)."
                },
            )
            .await;
            Ok(Redirect::to(&format!("/windows/{}", w.id)))
        }
        Err(windows::WindowError::Invalid(m) | windows::WindowError::Refused(m)) => {
            flash::error(&session, m).await;
            Ok(Redirect::to("/windows"))
        }
        Err(e) => Err(e.into()),
    }
}

#[derive(Template, WebTemplate)]
#[template(path = "windows/show.html")]
pub struct WindowPage {
    layout: Layout,
    w: Window,
    steps: Vec<Step>,
    /// (request id, state) of its approvals.
    approvals: Vec<(i64, String)>,
    rollback: Vec<Rollback>,
    /// The id of the manual step a person can tick now.
    tickable: Option<i64>,
    running: bool,
    can_operate: bool,
    flash: Option<flash::Flash>,
}

impl WindowPage {
    /// Whether step `id` is the manual step this user can tick now.
    fn can_tick(&self, id: &i64) -> bool {
        self.can_operate && self.tickable == Some(*id)
    }
}

async fn load(state: &AppState, id: i64) -> AppResult<(Window, Vec<Step>)> {
    let w = windows::refresh_approval(state, id).await?;
    let steps = windows::steps(&state.db, id).await?;
    Ok((w, steps))
}

/// `GET /windows/{id}`
pub async fn show_window(
    State(state): State<AppState>,
    user: CurrentUser,
    session: Session,
    Path(id): Path<i64>,
) -> AppResult<WindowPage> {
    let (w, steps) = load(&state, id).await?;
    let approvals: Vec<(i64, String)> = futures::future::join_all(
        w.approval_ids
            .iter()
            .map(|a| crate::approvals::find(&state.db, *a)),
    )
    .await
    .into_iter()
    .filter_map(|r| r.ok().flatten())
    .map(|r| (r.id, r.state))
    .collect();
    let next = steps.iter().find(|s| !s.finished());
    let tickable = next
        .filter(|s| !s.automatic && s.status == "pending" && w.state == windows::state::OPEN)
        .map(|s| s.id);
    Ok(WindowPage {
        rollback: windows::rollback(&steps),
        running: steps.iter().any(|s| s.status == "running"),
        can_operate: user.has(Role::Operator),
        layout: Layout::load(&state, user, "windows").await?,
        approvals,
        tickable,
        steps,
        w,
        flash: flash::take(&session).await,
    })
}

/// The form of a step, a close or an abort: an optional note.
#[derive(Deserialize, Default)]
pub struct NoteForm {
    #[serde(default)]
    note: String,
}

/// The route checked the user's role on the window's first target; a window
/// acts on all of its targets, so a change needs an operator on each of them
/// (refused and logged like the route's own check).
async fn operator_everywhere(
    state: &AppState,
    user: &CurrentUser,
    ctx: &AuditCtx,
    id: i64,
) -> AppResult<()> {
    let w = windows::find(&state.db, id)
        .await?
        .ok_or(AppError::NotFound)?;
    for t in &w.targets {
        if state.targets.get(t).is_some() && roles::role_on(state, user, t).await? < Role::Operator
        {
            let msg = format!(
                "This window also acts on {t}: it needs the operator role or higher there too."
            );
            audit::record(
                &state.db,
                ctx,
                Entry::new("auth.denied")
                    .target(t.clone())
                    .params(json!({ "window_id": id, "required_role": "operator" }))
                    .denied(msg.clone()),
            )
            .await?;
            return Err(AppError::Forbidden(msg));
        }
    }
    Ok(())
}

async fn done(
    session: &Session,
    id: i64,
    r: Result<String, windows::WindowError>,
) -> AppResult<Redirect> {
    match r {
        Ok(m) => flash::ok(session, m).await,
        Err(windows::WindowError::Invalid(m) | windows::WindowError::Refused(m)) => {
            flash::error(session, m).await
        }
        Err(e) => return Err(e.into()),
    }
    Ok(Redirect::to(&format!("/windows/{id}")))
}

/// `POST /windows/{id}/open`
pub async fn open_window(
    State(state): State<AppState>,
    user: CurrentUser,
    session: Session,
    ctx: AuditCtx,
    Path(id): Path<i64>,
) -> AppResult<Redirect> {
    operator_everywhere(&state, &user, &ctx, id).await?;
    let r = windows::open(&state, &ctx, id, Runner::Workers)
        .await
        .map(|_| "The window is open; its automatic steps run in order.".to_string());
    done(&session, id, r).await
}

/// `POST /windows/{id}/steps/{step}/done`: ticks a manual step with a note.
pub async fn tick_step(
    State(state): State<AppState>,
    user: CurrentUser,
    session: Session,
    ctx: AuditCtx,
    Path((id, step)): Path<(i64, i32)>,
    Form(form): Form<NoteForm>,
) -> AppResult<Redirect> {
    operator_everywhere(&state, &user, &ctx, id).await?;
    let r = windows::tick(
        &state,
        &ctx,
        id,
        &step.to_string(),
        &Person::of(&user),
        &form.note,
        Runner::Workers,
    )
    .await
    .map(|s| format!("Step {} is done.", s.position));
    done(&session, id, r).await
}

/// `POST /windows/{id}/resume`
pub async fn resume_window(
    State(state): State<AppState>,
    user: CurrentUser,
    session: Session,
    ctx: AuditCtx,
    Path(id): Path<i64>,
) -> AppResult<Redirect> {
    operator_everywhere(&state, &user, &ctx, id).await?;
    let r = windows::resume(&state, &ctx, id, Runner::Workers)
        .await
        .map(|_| "The window is open again; the failed step runs again.".to_string());
    done(&session, id, r).await
}

/// `POST /windows/{id}/close`
pub async fn close_window(
    State(state): State<AppState>,
    user: CurrentUser,
    session: Session,
    ctx: AuditCtx,
    Path(id): Path<i64>,
    Form(form): Form<NoteForm>,
) -> AppResult<Redirect> {
    operator_everywhere(&state, &user, &ctx, id).await?;
    let r = windows::close(&state, &ctx, id, &form.note)
        .await
        .map(|w| format!("The window is closed. {}", w.summary.unwrap_or_default()));
    done(&session, id, r).await
}

/// `POST /windows/{id}/abort`
pub async fn abort_window(
    State(state): State<AppState>,
    user: CurrentUser,
    session: Session,
    ctx: AuditCtx,
    Path(id): Path<i64>,
    Form(form): Form<NoteForm>,
) -> AppResult<Redirect> {
    operator_everywhere(&state, &user, &ctx, id).await?;
    let r = windows::abort(&state, &ctx, id, &form.note)
        .await
        .map(|_| "The window is aborted: the rollback paths are below.".to_string());
    done(&session, id, r).await
}

#[derive(Template, WebTemplate)]
#[template(path = "windows/report.html")]
pub struct ReportPage {
    w: Window,
    steps: Vec<Step>,
    approvals: Vec<crate::approvals::Request>,
    generated: String,
}

/// `GET /windows/{id}/report`: the printable report (no navigation).
pub async fn window_report(
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> AppResult<ReportPage> {
    let (w, steps) = load(&state, id).await?;
    let approvals = futures::future::join_all(
        w.approval_ids
            .iter()
            .map(|a| crate::approvals::find(&state.db, *a)),
    )
    .await
    .into_iter()
    .filter_map(|r| r.ok().flatten())
    .collect();
    Ok(ReportPage {
        w,
        steps,
        approvals,
        generated: crate::fmt::time(&chrono::Utc::now()),
    })
}

/// `GET /windows/{id}/report.csv`
pub async fn window_report_csv(
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> AppResult<Response> {
    let (w, steps) = load(&state, id).await?;
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"window-{id}.csv\""),
            ),
        ],
        windows::report_csv(&w, &steps),
    )
        .into_response())
}

// --- The pipeline API (token scope `windows:run`) ---------------------------------

fn api_error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({ "error": msg.into() }))).into_response()
}

fn api_window(w: &Window, steps: &[Step]) -> serde_json::Value {
    json!({
        "id": w.id, "template": w.template, "targets": w.targets, "state": w.state,
        "stop_reason": w.stop_reason, "owner": w.owner_name, "approvals": w.approval_ids,
        "planned_start": w.planned_start, "planned_minutes": w.planned_minutes,
        "opened_at": w.opened_at, "closed_at": w.closed_at, "summary": w.summary,
        "url": format!("/windows/{}", w.id),
        "steps": steps.iter().map(|s| json!({
            "position": s.position, "title": s.title, "kind": s.kind, "automatic": s.automatic,
            "status": s.status, "by": s.done_by_name, "note": s.note, "output": s.output, "error": s.error,
            "started_at": s.started_at, "finished_at": s.finished_at,
        })).collect::<Vec<_>>(),
    })
}

fn api_refusal(e: windows::WindowError) -> Response {
    match e {
        windows::WindowError::NotFound => api_error(StatusCode::NOT_FOUND, "no such window"),
        windows::WindowError::Invalid(m) => api_error(StatusCode::BAD_REQUEST, m),
        windows::WindowError::Refused(m) => api_error(StatusCode::CONFLICT, m),
        windows::WindowError::Db(d) => AppError::from(d).into_response(),
    }
}

/// What a pipeline posts to open a window.
#[derive(Deserialize)]
pub struct ApiOpen {
    template: String,
    targets: Vec<String>,
    #[serde(default)]
    planned_minutes: Option<i32>,
    #[serde(default)]
    health_url: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

/// `POST /api/v1/windows`: opens the window of this template on these targets
/// that waits to be opened, or makes one (owned by the token's creator) and
/// opens it when no approval is needed. `201` with the open window; `202` with
/// the window while it waits for approval (asking again makes no second one).
pub async fn api_open_window(
    State(state): State<AppState>,
    client: axum::Extension<ApiClient>,
    ctx: AuditCtx,
    Json(body): Json<ApiOpen>,
) -> Response {
    if body.targets.is_empty() || !body.targets.iter().all(|t| client.may_use(t)) {
        return api_error(StatusCode::NOT_FOUND, "no such target for this token");
    }
    let existing = match windows::waiting_for(&state, &body.template, &body.targets[0]).await {
        Ok(w) => w,
        Err(e) => return api_refusal(e),
    };
    let w = match existing {
        Some(w) => w,
        None => {
            let owner = match crate::auth::tokens::creator(&state.db, client.token_id).await {
                Ok(Some(u)) => u,
                Ok(None) => {
                    return api_error(StatusCode::CONFLICT, "the token's creator no longer exists");
                }
                Err(e) => return AppError::from(e).into_response(),
            };
            let new = NewWindow {
                template: body.template,
                targets: body.targets,
                planned_start: None,
                planned_minutes: body.planned_minutes.unwrap_or(60),
                health_url: body.health_url,
                reason: body
                    .reason
                    .unwrap_or_else(|| format!("deploy by {}", client.name)),
            };
            match windows::create(&state, &ctx, &owner, new).await {
                Ok(w) => w,
                Err(e) => return api_refusal(e),
            }
        }
    };
    if w.state == windows::state::REQUESTED {
        let steps = windows::steps(&state.db, w.id).await.unwrap_or_default();
        return (StatusCode::ACCEPTED, Json(api_window(&w, &steps))).into_response();
    }
    match windows::open(&state, &ctx, w.id, Runner::Workers).await {
        Ok(w) => {
            let steps = windows::steps(&state.db, w.id).await.unwrap_or_default();
            (StatusCode::CREATED, Json(api_window(&w, &steps))).into_response()
        }
        Err(e) => api_refusal(e),
    }
}

async fn api_may(state: &AppState, client: &ApiClient, id: i64) -> Result<Window, Response> {
    match windows::find(&state.db, id).await {
        Ok(Some(w)) if w.targets.iter().all(|t| client.may_use(t)) => Ok(w),
        Ok(_) => Err(api_error(StatusCode::NOT_FOUND, "no such window")),
        Err(e) => Err(AppError::from(e).into_response()),
    }
}

/// `GET /api/v1/windows/{id}`: the window and its steps, for a pipeline waiting.
pub async fn api_get_window(
    State(state): State<AppState>,
    client: axum::Extension<ApiClient>,
    Path(id): Path<i64>,
) -> Response {
    if let Err(r) = api_may(&state, &client, id).await {
        return r;
    }
    match load(&state, id).await {
        Ok((w, steps)) => Json(api_window(&w, &steps)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /api/v1/windows/{id}/steps/{step}/done` (`{"note": …, "by": …}`): the
/// step by position or title.
pub async fn api_tick_step(
    State(state): State<AppState>,
    client: axum::Extension<ApiClient>,
    ctx: AuditCtx,
    Path((id, step)): Path<(i64, String)>,
    Json(body): Json<serde_json::Value>,
) -> Response {
    if let Err(r) = api_may(&state, &client, id).await {
        return r;
    }
    let by = Person {
        id: None,
        name: body["by"]
            .as_str()
            .filter(|b| !b.trim().is_empty())
            .map(|b| format!("{} (token:{})", b.trim(), client.name))
            .unwrap_or_else(|| format!("token:{}", client.name)),
    };
    let note = body["note"].as_str().unwrap_or_default();
    match windows::tick(&state, &ctx, id, &step, &by, note, Runner::Workers).await {
        Ok(_) => api_get_window(State(state), client, Path(id)).await,
        Err(e) => api_refusal(e),
    }
}

/// `POST /api/v1/windows/{id}/close` (`{"note": …}`)
pub async fn api_close_window(
    State(state): State<AppState>,
    client: axum::Extension<ApiClient>,
    ctx: AuditCtx,
    Path(id): Path<i64>,
    Json(body): Json<serde_json::Value>,
) -> Response {
    if let Err(r) = api_may(&state, &client, id).await {
        return r;
    }
    match windows::close(&state, &ctx, id, body["note"].as_str().unwrap_or_default()).await {
        Ok(_) => api_get_window(State(state), client, Path(id)).await,
        Err(e) => api_refusal(e),
    }
}
