//! Approval pages: the lists (pending / mine / history), one request with its
//! history and the buttons its viewer may use, and the request form every gated
//! action starts from.

use std::collections::BTreeMap;

use askama::Template;
use askama_web::WebTemplate;
use axum::{
    Extension, Form,
    extract::{Path, Query, State},
    response::{IntoResponse, Redirect, Response},
};
use serde::Deserialize;
use tower_sessions::Session;

use super::{Layout, flash};
use crate::{
    app::AppState,
    approvals::{self, Decision, Request, Review, Seen, Tab, incidents::Incident},
    audit::{self, AuditCtx, OperationRow},
    auth::{CurrentUser, Role, roles::Roles},
    error::{AppError, AppResult},
};

#[derive(Deserialize)]
pub struct TabQuery {
    tab: Option<String>,
}

#[derive(Template, WebTemplate)]
#[template(path = "approvals/list.html")]
pub struct ApprovalsPage {
    layout: Layout,
    tab: &'static str,
    requests: Vec<Request>,
}

/// `GET /approvals`
pub async fn list_approvals(
    State(state): State<AppState>,
    user: CurrentUser,
    Extension(roles): Extension<Roles>,
    Query(q): Query<TabQuery>,
) -> AppResult<ApprovalsPage> {
    approvals::expire_due(&state.db).await?;
    let (tab, name) = match q.tab.as_deref() {
        Some("mine") => (Tab::Mine, "mine"),
        Some("history") => (Tab::History, "history"),
        _ => (Tab::Pending, "pending"),
    };
    let mut requests = approvals::list(&state.db, tab, user.id).await?;
    // Per-target roles: requests on targets where this user is only a viewer are
    // not theirs to see (their own ones always are).
    requests.retain(|r| {
        r.requested_by == user.id
            || roles.on_named(&state.targets, Some(&r.target)) >= Role::Operator
    });
    Ok(ApprovalsPage {
        layout: Layout::load(&state, user, "approvals").await?,
        tab: name,
        requests,
    })
}

#[derive(Template, WebTemplate)]
#[template(path = "approvals/show.html")]
pub struct ApprovalPage {
    layout: Layout,
    req: Request,
    /// The maintenance window open on the target when the request was made.
    window: Option<crate::windows::Window>,
    title: String,
    rows: Vec<OperationRow>,
    flash: Option<flash::Flash>,
    can_decide: bool,
    can_execute: bool,
    can_cancel: bool,
    own: bool,
    /// The executor must type the target's name (see `Action::confirm_name`).
    confirm_name: bool,
    /// What the action said when the request was made (`params.seen`).
    recorded: Option<Seen>,
    /// What the action says about itself now (`Action::details`): label, text,
    /// and whether it differs from what was recorded.
    live: Vec<(String, String, bool)>,
    /// Recorded labels the live view no longer has.
    gone: Vec<String>,
    /// The facts that matter differ from what was recorded: approving and
    /// running need “I have seen what changed”.
    world_changed: bool,
    /// Which facts changed, in words.
    changed_facts: String,
    /// The facts, then and now, as JSON for people.
    recorded_world: String,
    live_world: String,
    /// Why the request can no longer be approved or run at all.
    blocked: Option<String>,
    /// The job the execution handed its work to, if any.
    job: Option<crate::jobs::Job>,
    /// The target's configured notes (empty when none).
    notes: String,
    /// The viewer may review this break-glass request.
    can_review: bool,
    /// The incident this request's failure opened.
    incident: Option<Incident>,
}

/// `GET /approvals/{id}`
pub async fn show_approval(
    State(state): State<AppState>,
    user: CurrentUser,
    session: Session,
    Path(id): Path<i64>,
) -> AppResult<ApprovalPage> {
    approvals::expire_due(&state.db).await?;
    let req = approvals::find(&state.db, id)
        .await?
        .ok_or(AppError::NotFound)?;
    let title = state
        .actions
        .get(&req.kind)
        .map(|a| a.title().to_string())
        .unwrap_or_else(|| req.kind.clone());
    let confirm_name = state
        .actions
        .get(&req.kind)
        .is_some_and(|a| a.confirm_name());
    let details = async {
        match (state.actions.get(&req.kind), state.targets.get(&req.target)) {
            (Some(a), Some(t)) => a.details(&state, &t, &req.params).await,
            _ => vec![],
        }
    };
    let (details, world) = tokio::join!(details, approvals::world_now(&state, &req));
    let recorded = req.seen();
    let then = |label: &str| {
        recorded
            .as_ref()
            .and_then(|s| s.details.iter().find(|(l, _)| l == label))
            .map(|(_, t)| t.clone())
    };
    let live = details
        .iter()
        .map(|(l, t)| {
            let changed = recorded.is_some() && then(l).as_ref() != Some(t);
            (l.clone(), t.clone(), changed)
        })
        .collect();
    let gone = recorded
        .as_ref()
        .map(|s| {
            s.details
                .iter()
                .filter(|(l, _)| !details.iter().any(|(d, _)| d == l))
                .map(|(l, _)| l.clone())
                .collect()
        })
        .unwrap_or_default();
    let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_default();
    let job = crate::jobs::for_approval(&state.db, id).await?;
    let incident = approvals::incidents::for_approval(&state.db, id).await?;
    Ok(ApprovalPage {
        window: crate::windows::open_at(&state.db, &req.target, req.created_at)
            .await?
            .filter(|w| !w.approval_ids.contains(&req.id)),
        notes: target_notes(&state, &req.target),
        live,
        gone,
        world_changed: world.changed(),
        changed_facts: world.changed_facts().join(", "),
        recorded_world: world.recorded.as_ref().map(pretty).unwrap_or_default(),
        live_world: pretty(&world.live.facts),
        blocked: world.live.blocked.clone(),
        recorded,
        job,
        incident,
        can_review: req.can_review(&user),
        rows: audit::for_approval(&state.db, id, user.role).await?,
        flash: flash::take(&session).await,
        can_decide: req.can_decide(&user),
        can_execute: req.can_execute(&user),
        can_cancel: req.can_cancel(&user),
        own: req.requested_by == user.id,
        confirm_name,
        title,
        layout: Layout::load(&state, user, "approvals").await?,
        req,
    })
}

#[derive(Deserialize)]
pub struct CommentForm {
    #[serde(default)]
    comment: String,
    /// “I have seen what changed” (a checkbox: present when ticked).
    #[serde(default)]
    reconfirm: Option<String>,
}

fn back(id: i64) -> Redirect {
    Redirect::to(&format!("/approvals/{id}"))
}

/// Shows a refusal on the request's page (it is already in the operations log).
async fn after(
    session: &Session,
    id: i64,
    outcome: Result<String, approvals::ApprovalError>,
) -> AppResult<Redirect> {
    match outcome {
        Ok(msg) => flash::ok(session, msg).await,
        Err(approvals::ApprovalError::Refused(msg)) => flash::error(session, msg).await,
        Err(e) => return Err(e.into()),
    }
    Ok(back(id))
}

async fn decide(
    state: AppState,
    user: CurrentUser,
    session: Session,
    ctx: AuditCtx,
    id: i64,
    decision: Decision,
    form: CommentForm,
) -> AppResult<Redirect> {
    let reconfirm = form.reconfirm.is_some();
    let outcome =
        approvals::decide_reconfirmed(&state, &ctx, &user, id, decision, &form.comment, reconfirm)
            .await
            .map(|r| match decision {
                Decision::Approve => format!(
                    "Approved. {} can now run it (once, before {}).",
                    r.requested_by_name,
                    r.expires_at.format("%H:%M UTC")
                ),
                Decision::Reject => "Rejected. The requester sees your comment.".to_string(),
            });
    after(&session, id, outcome).await
}

/// `POST /approvals/{id}/approve`
pub async fn approve_request(
    State(state): State<AppState>,
    user: CurrentUser,
    session: Session,
    ctx: AuditCtx,
    Path(id): Path<i64>,
    Form(form): Form<CommentForm>,
) -> AppResult<Redirect> {
    decide(state, user, session, ctx, id, Decision::Approve, form).await
}

/// `POST /approvals/{id}/reject`
pub async fn reject_request(
    State(state): State<AppState>,
    user: CurrentUser,
    session: Session,
    ctx: AuditCtx,
    Path(id): Path<i64>,
    Form(form): Form<CommentForm>,
) -> AppResult<Redirect> {
    decide(state, user, session, ctx, id, Decision::Reject, form).await
}

/// `POST /approvals/{id}/cancel`
pub async fn cancel_request(
    State(state): State<AppState>,
    user: CurrentUser,
    session: Session,
    ctx: AuditCtx,
    Path(id): Path<i64>,
) -> AppResult<Redirect> {
    let outcome = approvals::cancel(&state, &ctx, &user, id)
        .await
        .map(|_| "Withdrawn. Nothing was run.".to_string());
    after(&session, id, outcome).await
}

#[derive(Deserialize)]
pub struct ReviewForm {
    /// `accept` or `flag`.
    #[serde(default)]
    verdict: String,
    #[serde(default)]
    comment: String,
}

/// `POST /approvals/{id}/review`: another approver's review of a break-glass
/// request (accept, or flag with a comment).
pub async fn review_request(
    State(state): State<AppState>,
    user: CurrentUser,
    session: Session,
    ctx: AuditCtx,
    Path(id): Path<i64>,
    Form(form): Form<ReviewForm>,
) -> AppResult<Redirect> {
    let verdict = match form.verdict.as_str() {
        "accept" => Review::Accept,
        "flag" => Review::Flag,
        _ => {
            return Err(AppError::BadRequest(
                "Choose whether to accept or to flag it.".into(),
            ));
        }
    };
    let outcome = approvals::review(&state, &ctx, &user, id, verdict, &form.comment)
        .await
        .map(|r| match verdict {
            Review::Accept => "Reviewed: accepted. It no longer waits on the overview.".to_string(),
            Review::Flag => format!(
                "Reviewed: flagged. {} and the team were told.",
                r.requested_by_name
            ),
        });
    after(&session, id, outcome).await
}

/// The flash after running a request: done, handed to a job that is still running
/// (long actions such as a restore or a delete by pattern), or failed.
fn ran_message(r: &approvals::Request, done: &str) -> String {
    if r.state == "executed" {
        done.to_string()
    } else if r.is_running() {
        "Started. It runs as a job: follow it below; this request ends executed or failed with it."
            .to_string()
    } else {
        match r.error.as_deref() {
            Some(e) if !e.is_empty() => format!("It ran and failed: {e}"),
            _ => "It ran and failed.".to_string(),
        }
    }
}

/// What the execute form sends: the target's name, typed, for actions that ask for it.
#[derive(Deserialize, Default)]
pub struct ConfirmForm {
    #[serde(default)]
    confirm_name: Option<String>,
    /// “I have seen what changed” (a checkbox: present when ticked).
    #[serde(default)]
    reconfirm: Option<String>,
}

/// `POST /approvals/{id}/execute`: runs the approved request with its stored
/// parameters; nothing from the form is used.
pub async fn execute_request(
    State(state): State<AppState>,
    user: CurrentUser,
    session: Session,
    ctx: AuditCtx,
    Path(id): Path<i64>,
    Form(form): Form<ConfirmForm>,
) -> AppResult<Redirect> {
    let confirm = form.confirm_name.as_deref();
    let reconfirm = form.reconfirm.is_some();
    let outcome = approvals::execute_with(&state, &ctx, &user, id, confirm, reconfirm)
        .await
        .map(|r| ran_message(&r, "Done."));
    after(&session, id, outcome).await
}

#[derive(Template, WebTemplate)]
#[template(path = "approvals/new.html")]
pub struct NewRequestPage {
    layout: Layout,
    target: String,
    policy: &'static str,
    kind: String,
    title: String,
    description: String,
    needs_approval: bool,
    /// Why an approver is needed whatever the policy, when that is so.
    why_always: Option<String>,
    /// The target's configured notes (empty when none).
    notes: String,
    /// The viewer may break glass here (an approver, on a target that allows it,
    /// for an action that needs a second person).
    can_break_glass: bool,
    /// The action asks whoever runs it to type the target's name.
    confirm_name: bool,
    fields: Vec<(String, String)>,
    reason: String,
    error: Option<String>,
}

/// The configured notes of a target, or nothing.
fn target_notes(state: &AppState, target: &str) -> String {
    state
        .targets
        .get(target)
        .and_then(|t| t.config.notes.clone())
        .unwrap_or_default()
}

/// The form fields that are parameters (not the reason, the CSRF token, or the
/// break-glass choice and its confirmation).
fn param_fields(form: &[(String, String)]) -> BTreeMap<String, String> {
    const NOT_PARAMS: [&str; 4] = [
        "reason",
        crate::auth::csrf::FIELD,
        "break_glass",
        "confirm_name",
    ];
    form.iter()
        .filter(|(k, _)| !NOT_PARAMS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

async fn new_page(
    state: &AppState,
    user: CurrentUser,
    target_name: &str,
    kind: &str,
    fields: BTreeMap<String, String>,
    reason: String,
    error: Option<String>,
) -> AppResult<NewRequestPage> {
    let target = state.targets.get(target_name).ok_or(AppError::NotFound)?;
    let action = state.actions.get(kind).ok_or(AppError::NotFound)?;
    // What the request would do and who must agree, decided as the request
    // itself decides it (the action may measure the target), so the page never
    // promises what will not happen.
    let (description, error, needs_approval, why_always) =
        match approvals::prepare(state, &target, action.as_ref(), &fields).await {
            Ok(p) => (
                action.describe(&p.params),
                error,
                p.needs_approval,
                p.why_always,
            ),
            Err(e) => (String::new(), Some(error.unwrap_or(e)), true, None),
        };
    Ok(NewRequestPage {
        can_break_glass: needs_approval && target.config.break_glass && user.has(Role::Approver),
        confirm_name: action.confirm_name(),
        layout: Layout::load(state, user, "approvals").await?,
        target: target_name.to_string(),
        policy: target.policy().as_str(),
        kind: kind.to_string(),
        title: action.title().to_string(),
        description,
        needs_approval,
        why_always,
        notes: target.config.notes.clone().unwrap_or_default(),
        fields: fields.into_iter().collect(),
        reason,
        error,
    })
}

/// `GET /targets/{target}/actions/{kind}?…`: what will run, and the reason field.
pub async fn new_action_request(
    State(state): State<AppState>,
    user: CurrentUser,
    Path((target, kind)): Path<(String, String)>,
    Query(query): Query<Vec<(String, String)>>,
) -> AppResult<Response> {
    let page = new_page(
        &state,
        user,
        &target,
        &kind,
        param_fields(&query),
        String::new(),
        None,
    )
    .await?;
    let status = if page.error.is_some() {
        axum::http::StatusCode::BAD_REQUEST
    } else {
        axum::http::StatusCode::OK
    };
    Ok((status, page).into_response())
}

/// `POST /targets/{target}/actions/{kind}`: makes the request. Where the policy
/// needs no approval it is approved automatically and runs at once.
pub async fn create_action_request(
    State(state): State<AppState>,
    user: CurrentUser,
    session: Session,
    ctx: AuditCtx,
    Path((target, kind)): Path<(String, String)>,
    Form(form): Form<Vec<(String, String)>>,
) -> AppResult<Response> {
    let reason = form
        .iter()
        .find(|(k, _)| k == "reason")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let field = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let break_glass = field("break_glass").is_some_and(|v| !v.is_empty());
    let confirm = field("confirm_name").map(str::to_string);
    let fields = param_fields(&form);
    let made = approvals::request_with(
        &state,
        &ctx,
        &user,
        &target,
        &kind,
        &fields,
        &reason,
        break_glass,
    )
    .await;
    match made {
        Ok(req) if req.state == "approved" => {
            let ran =
                approvals::execute_with(&state, &ctx, &user, req.id, confirm.as_deref(), false)
                    .await;
            let done = if req.break_glass {
                "Done, under break-glass: another approver must review it."
            } else {
                "Done (no approval needed on this target)."
            };
            let msg = match ran {
                Ok(r) => ran_message(&r, done),
                Err(e) => e.to_string(),
            };
            flash::ok(&session, msg).await;
            Ok(back(req.id).into_response())
        }
        Ok(req) => {
            flash::ok(
                &session,
                format!(
                    "Request #{} is waiting for an approver (someone other than you).",
                    req.id
                ),
            )
            .await;
            Ok(back(req.id).into_response())
        }
        Err(approvals::ApprovalError::Invalid(msg) | approvals::ApprovalError::Refused(msg)) => {
            let page = new_page(&state, user, &target, &kind, fields, reason, Some(msg)).await?;
            Ok((axum::http::StatusCode::BAD_REQUEST, page).into_response())
        }
        Err(e) => Err(e.into()),
    }
}
