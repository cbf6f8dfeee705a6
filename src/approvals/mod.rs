//! Approvals (PRODUCT C9): the one mechanism every destructive action goes
//! through.
//!
//! A request records who asks for which [`Action`] on which target with exactly
//! which parameters (canonical JSON and its SHA-256) and why. An approver other than
//! the requester approves or rejects it; an approved request runs exactly once,
//! before it expires, with exactly the stored parameters — the executor takes only
//! the request id. Where the target's policy needs no approval the request is
//! approved automatically, so the log reads the same way. The database enforces the
//! state machine and refuses self-approval (see the migration); every step is an
//! operations-log row carrying the request id.
//!
//! Over 600 lines: the request's whole state machine (request, approve or reject,
//! re-confirm a changed world, execute once, expire, break-glass review) is one set
//! of rules on one table, kept together so every path checks the same things.

pub mod action;
pub mod incidents;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::{PgExecutor, PgPool};

pub use action::{Action, ActionRegistry, Assessment, ExecCtx, Severity, World, needs_approval};

use crate::{
    audit::{self, AuditCtx, Entry, Outcome},
    auth::{CurrentUser, Role, roles},
    notify,
    state::AppState,
    targets::Target,
};

/// A row of `approval_requests`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Request {
    pub id: i64,
    pub kind: String,
    pub target: String,
    pub params: Value,
    pub params_hash: Vec<u8>,
    pub summary: String,
    pub reason: String,
    pub requested_by: i64,
    pub requested_by_name: String,
    pub state: String,
    pub auto_approved: bool,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub decided_by: Option<i64>,
    pub decided_by_name: Option<String>,
    pub decided_at: Option<DateTime<Utc>>,
    pub decision_comment: Option<String>,
    pub executed_by: Option<i64>,
    pub executed_by_name: Option<String>,
    pub execution_started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
    pub result: Option<Value>,
    /// Made and approved at once by an approver on a target that allows it
    /// (an incident); reviewed afterwards by another approver.
    pub break_glass: bool,
    pub reviewed_by: Option<i64>,
    pub reviewed_by_name: Option<String>,
    pub reviewed_at: Option<DateTime<Utc>>,
    /// `accepted` or `flagged`.
    pub review: Option<String>,
    pub review_comment: Option<String>,
}

/// What the requester's page showed and what mattered when the request was made
/// (`params.seen`): stored inside the parameters, so the hash and the database's
/// immutability cover it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Seen {
    pub at: DateTime<Utc>,
    /// [`Action::details`] then: label and text pairs.
    pub details: Vec<(String, String)>,
    /// [`Action::world`]'s facts then.
    pub world: Value,
}

/// The key of the parameters that holds [`Seen`].
pub const SEEN: &str = "seen";

impl Request {
    /// What was recorded when the request was made (`None` for requests made
    /// before dbops recorded it).
    pub fn seen(&self) -> Option<Seen> {
        serde_json::from_value(self.params.get(SEEN)?.clone()).ok()
    }

    /// A break-glass request nobody has reviewed yet.
    pub fn needs_review(&self) -> bool {
        self.break_glass && self.reviewed_by.is_none()
    }

    /// May `user` review this break-glass request? (Another approver than the
    /// one who invoked it.)
    pub fn can_review(&self, user: &CurrentUser) -> bool {
        self.needs_review() && user.has(Role::Approver) && user.id != self.requested_by
    }

    /// The first 16 hex digits of the parameters' hash, for people to compare.
    pub fn hash_prefix(&self) -> String {
        hex::encode(&self.params_hash).chars().take(16).collect()
    }

    pub fn is_running(&self) -> bool {
        self.state == "approved" && self.execution_started_at.is_some()
    }

    /// May `user` approve or reject this request?
    pub fn can_decide(&self, user: &CurrentUser) -> bool {
        self.state == "pending" && user.has(Role::Approver) && user.id != self.requested_by
    }

    /// May `user` run this request now?
    pub fn can_execute(&self, user: &CurrentUser) -> bool {
        self.state == "approved"
            && self.execution_started_at.is_none()
            && self.expires_at > Utc::now()
            && (user.id == self.requested_by || user.has(Role::Approver))
    }

    /// May `user` withdraw this request?
    pub fn can_cancel(&self, user: &CurrentUser) -> bool {
        matches!(self.state.as_str(), "pending" | "approved")
            && self.execution_started_at.is_none()
            && (user.id == self.requested_by || user.has(Role::Admin))
    }

    pub fn params_pretty(&self) -> String {
        serde_json::to_string_pretty(&self.params).unwrap_or_default()
    }

    pub fn result_pretty(&self) -> String {
        self.result
            .as_ref()
            .map(|r| serde_json::to_string_pretty(r).unwrap_or_default())
            .unwrap_or_default()
    }
}

/// Why a step was refused, as a sentence for the page.
#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    #[error("There is no such request.")]
    NotFound,
    #[error("There is no target called {0}.")]
    UnknownTarget(String),
    #[error("{0} is not an action dbops knows.")]
    UnknownAction(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

impl From<ApprovalError> for crate::error::AppError {
    fn from(e: ApprovalError) -> Self {
        use crate::error::AppError;
        match e {
            ApprovalError::NotFound => AppError::NotFound,
            ApprovalError::UnknownTarget(_)
            | ApprovalError::UnknownAction(_)
            | ApprovalError::Invalid(_) => AppError::BadRequest(e.to_string()),
            ApprovalError::Refused(m) => AppError::Conflict(m),
            ApprovalError::Db(d) => d.into(),
        }
    }
}

const COLUMNS: &str = "id, kind, target, params, params_hash, summary, reason, requested_by, requested_by_name, \
                       state, auto_approved, created_at, expires_at, decided_by, decided_by_name, decided_at, \
                       decision_comment, executed_by, executed_by_name, execution_started_at, finished_at, \
                       error, result, break_glass, reviewed_by, reviewed_by_name, reviewed_at, review, \
                       review_comment";

/// The hash of canonical parameters (serde_json writes object keys sorted).
pub fn params_hash(params: &Value) -> Vec<u8> {
    Sha256::digest(serde_json::to_vec(params).unwrap_or_default()).to_vec()
}

pub async fn find(db: impl PgExecutor<'_>, id: i64) -> Result<Option<Request>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM approval_requests WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(db)
    .await
}

/// Which requests a list shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tab {
    Pending,
    Mine,
    History,
}

/// Up to 200 requests of a tab, newest first.
pub async fn list(db: &PgPool, tab: Tab, user_id: i64) -> Result<Vec<Request>, sqlx::Error> {
    let filter = match tab {
        Tab::Pending => "state = 'pending'",
        Tab::Mine => "requested_by = $1",
        Tab::History => "state NOT IN ('pending')",
    };
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM approval_requests WHERE {filter} AND $1 = $1 ORDER BY id DESC LIMIT 200"
    ))
    .bind(user_id)
    .fetch_all(db)
    .await
}

/// Pending requests `user` could decide (for the count in the navigation): on
/// the targets where they are an approver.
pub async fn pending_for(state: &AppState, user: &CurrentUser) -> Result<i64, sqlx::Error> {
    // The user's roles everywhere (the page's own role may be a target's lower one).
    let global = crate::auth::users::find(&state.db, user.id)
        .await?
        .map_or(user.role, |u| u.role());
    let all = roles::load(&state.db, user.id, global).await?;
    if all.highest() < Role::Approver {
        return Ok(0);
    }
    let per_target: Vec<(String, i64)> = sqlx::query_as(
        "SELECT target, count(*) FROM approval_requests
         WHERE state = 'pending' AND requested_by <> $1 AND expires_at > now() GROUP BY target",
    )
    .bind(user.id)
    .fetch_all(&state.db)
    .await?;
    Ok(per_target
        .into_iter()
        .filter(|(target, _)| all.on_named(&state.targets, Some(target)) >= Role::Approver)
        .map(|(_, count)| count)
        .sum())
}

/// "a" or "an", for a role in a sentence.
fn article(role: Role) -> &'static str {
    match role {
        Role::Operator | Role::Approver | Role::Admin => "an",
        Role::Viewer => "a",
    }
}

fn step(kind: &'static str, req: &Request) -> Entry {
    let mut params = json!({ "action": req.kind, "params": req.params, "params_sha256": hex::encode(&req.params_hash) });
    if req.break_glass {
        params["break_glass"] = json!(true);
    }
    Entry::new(kind)
        .target(req.target.clone())
        .approval(req.id)
        .params(params)
}

/// The world of a request now, next to what was recorded when it was made.
#[derive(Debug, Clone)]
pub struct WorldNow {
    /// [`Seen::world`], if the request recorded one.
    pub recorded: Option<Value>,
    /// [`Action::world`] read now.
    pub live: World,
}

impl WorldNow {
    /// The facts that matter differ from what was recorded.
    pub fn changed(&self) -> bool {
        self.recorded
            .as_ref()
            .is_some_and(|r| *r != self.live.facts)
    }

    /// Which of the facts changed (top-level keys), for a sentence.
    pub fn changed_facts(&self) -> Vec<String> {
        let Some(recorded) = &self.recorded else {
            return vec![];
        };
        match (recorded, &self.live.facts) {
            (Value::Object(a), Value::Object(b)) => a
                .keys()
                .chain(b.keys().filter(|k| !a.contains_key(*k)))
                .filter(|k| a.get(*k) != b.get(*k))
                .cloned()
                .collect(),
            (a, b) if a != b => vec!["what it acts on".to_string()],
            _ => vec![],
        }
    }

    /// The log's record of a re-confirmed step.
    fn reconfirmed(&self) -> Value {
        json!({ "changed": self.changed_facts(), "recorded": self.recorded, "now": self.live.facts })
    }
}

/// Reads the world of `req` now (see [`Action::world`]); nothing to compare for
/// unknown actions or targets.
pub async fn world_now(state: &AppState, req: &Request) -> WorldNow {
    let recorded = req.seen().map(|s| s.world);
    let live = match (state.actions.get(&req.kind), state.targets.get(&req.target)) {
        (Some(a), Some(t)) => a.world(state, &t, &req.params).await,
        _ => World::none(),
    };
    WorldNow { recorded, live }
}

/// The refusal when the world of a request is in the way of `doing` ("approve
/// it", "run it"), or `None`.
fn world_refusal(world: &WorldNow, reconfirm: bool, doing: &str) -> Option<String> {
    if let Some(b) = &world.live.blocked {
        return Some(format!(
            "{b} This request can no longer be approved or run."
        ));
    }
    if world.changed() && !reconfirm {
        return Some(format!(
            "What this request acts on has changed since it was requested ({}): read the live view on its \
             page and tick “I have seen what changed” to {doing}.",
            world.changed_facts().join(", ")
        ));
    }
    None
}

/// A request's parameters as they will be stored, and whether a second person
/// must agree to them.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The parsed parameters with what the action measured ([`Action::assess`])
    /// merged in.
    pub params: Value,
    /// An approver other than the requester is needed.
    pub needs_approval: bool,
    /// Why an approver is needed whatever the target's policy (the action's own
    /// rule, or what it measured on the target), when that is so.
    pub why_always: Option<String>,
}

/// Parses the form, lets the action look at the target ([`Action::assess`]) and
/// decides who must agree: per the target's policy and the action's severity, or
/// an approver on every policy when the action always needs one or its assessment
/// says so. Used for the request and for the form that leads to it, so what the
/// form promises is what the request does. Errors are sentences.
pub async fn prepare(
    state: &AppState,
    target: &Arc<Target>,
    action: &dyn Action,
    form: &std::collections::BTreeMap<String, String>,
) -> Result<Prepared, String> {
    let mut params = action.parse(form)?;
    let assessment = action.assess(state, target, &params).await?;
    if !assessment.facts.is_empty() {
        let Value::Object(map) = &mut params else {
            return Err(format!(
                "{}: measured facts cannot be added to these parameters.",
                action.title()
            ));
        };
        map.extend(assessment.facts);
    }
    let why_always = if action.always_needs_approval() {
        Some(format!(
            "{} always needs an approver, whatever the target's policy.",
            action.title()
        ))
    } else {
        assessment.needs_approver
    };
    Ok(Prepared {
        needs_approval: why_always.is_some() || needs_approval(target.policy(), action.severity()),
        why_always,
        params,
    })
}

/// Makes a request for `kind` on `target` with parameters from a form. Returns the
/// request: `pending`, or `approved` when the policy needs no second person.
pub async fn request(
    state: &AppState,
    ctx: &AuditCtx,
    user: &CurrentUser,
    target_name: &str,
    kind: &str,
    form: &std::collections::BTreeMap<String, String>,
    reason: &str,
) -> Result<Request, ApprovalError> {
    request_with(state, ctx, user, target_name, kind, form, reason, false).await
}

/// [`request`], or with `break_glass` an incident's request: on a target whose
/// config allows it (`break_glass = true`), an approver (or admin) makes it and it
/// is approved at once, marked break-glass, announced by webhook immediately, and
/// waits for a review by another approver ([`review`]). Refused (and logged as a
/// denied `approval.break_glass`) for operators and on targets that do not allow
/// it. The caller runs it.
#[expect(clippy::too_many_arguments)]
pub async fn request_with(
    state: &AppState,
    ctx: &AuditCtx,
    user: &CurrentUser,
    target_name: &str,
    kind: &str,
    form: &std::collections::BTreeMap<String, String>,
    reason: &str,
    break_glass: bool,
) -> Result<Request, ApprovalError> {
    let target = state
        .targets
        .get(target_name)
        .ok_or_else(|| ApprovalError::UnknownTarget(target_name.to_string()))?;
    let action = state
        .actions
        .get(kind)
        .ok_or_else(|| ApprovalError::UnknownAction(kind.to_string()))?;
    let refuse = |msg: String| async {
        audit::record(
            &state.db,
            ctx,
            Entry::new("approval.requested")
                .target(target_name.to_string())
                .params(json!({ "action": kind, "form": form }))
                .failed(msg.clone()),
        )
        .await?;
        Err::<Request, _>(ApprovalError::Invalid(msg))
    };
    if !action.applies_to(target.kind()) {
        return refuse(format!(
            "{} works on {} targets; {target_name} is {}.",
            action.title(),
            action.target_kind().as_str(),
            target.kind().as_str()
        ))
        .await;
    }
    let reason = reason.trim();
    if reason.is_empty() {
        return refuse("Say why this is needed: the reason is required.".into()).await;
    }
    if reason.chars().count() > 2000 {
        return refuse("The reason is too long (2,000 characters at most).".into()).await;
    }
    let Prepared {
        mut params,
        needs_approval: second_person,
        why_always,
    } = match prepare(state, &target, action.as_ref(), form).await {
        Ok(p) => p,
        Err(m) => return refuse(m).await,
    };
    let summary = action.describe(&params);
    let auto = !second_person;
    // Break-glass only where a second person would otherwise be needed.
    let break_glass = break_glass && !auto;
    if break_glass {
        let refusal = if roles::role_on(state, user, target_name).await? < Role::Approver {
            Some(format!(
                "Only an approver or an admin can break glass (an approver on {target_name}); ask an approver to approve the request instead."
            ))
        } else if !target.config.break_glass {
            Some(format!(
                "Break-glass is off for {target_name}: its configuration does not allow running a gated action \
                 without a second approver. Ask another approver."
            ))
        } else {
            None
        };
        if let Some(msg) = refusal {
            audit::record(
                &state.db,
                ctx,
                Entry::new("approval.break_glass")
                    .target(target_name.to_string())
                    .params(json!({ "action": kind, "form": form, "reason": reason }))
                    .denied(msg.clone()),
            )
            .await?;
            return Err(ApprovalError::Refused(msg));
        }
    }
    // What the requester was shown and what matters, as it is now: stored
    // with the request, under its hash.
    let (details, world) = tokio::join!(
        action.details(state, &target, &params),
        action.world(state, &target, &params)
    );
    let seen = Seen {
        at: Utc::now(),
        details,
        world: world.facts,
    };
    if let Value::Object(m) = &mut params {
        m.insert(
            SEEN.to_string(),
            serde_json::to_value(&seen).unwrap_or_default(),
        );
    }
    let hash = params_hash(&params);
    let severity = match action.severity() {
        Severity::Disruptive => "disruptive",
        Severity::Destructive => "destructive",
    };
    let expiry = chrono::Duration::from_std(state.config.approval_expiry)
        .unwrap_or(chrono::Duration::hours(1));

    let mut tx = state.db.begin().await?;
    let req: Request = sqlx::query_as(&format!(
        "INSERT INTO approval_requests (kind, target, params, params_hash, summary, reason, requested_by,
                                        requested_by_name, state, auto_approved, expires_at, decided_at,
                                        break_glass, severity)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, now() + $11, CASE WHEN $10 OR $12 THEN now() END,
                 $12, $13)
         RETURNING {COLUMNS}"
    ))
    .bind(kind)
    .bind(target_name)
    .bind(&params)
    .bind(&hash)
    .bind(&summary)
    .bind(reason)
    .bind(user.id)
    .bind(&user.username)
    .bind(if auto || break_glass {
        "approved"
    } else {
        "pending"
    })
    .bind(auto)
    .bind(expiry)
    .bind(break_glass)
    .bind(severity)
    .fetch_one(&mut *tx)
    .await?;
    audit::record(
        &mut *tx,
        ctx,
        step("approval.requested", &req)
            .result(json!({ "reason": reason, "needs_approver": why_always })),
    )
    .await?;
    if auto {
        audit::record(
            &mut *tx,
            &AuditCtx { actor: audit::Actor::system(), meta: ctx.meta.clone() },
            step("approval.approved", &req).result(json!({
                "automatic": true,
                "why": format!("the {} policy of {target_name} needs no second person for this", target.policy().as_str()),
            })),
        )
        .await?;
    }
    if break_glass {
        audit::record(
            &mut *tx,
            ctx,
            step("approval.break_glass", &req).result(json!({
                "incident": reason,
                "why": format!("{} broke glass on {target_name}: approved at once, to be reviewed by another approver", user.username),
            })),
        )
        .await?;
    }
    tx.commit().await?;
    if break_glass {
        notify::send(
            state,
            "approval.break_glass",
            format!(
                "dbops: BREAK-GLASS — {} runs request #{} ({} on {}) now without a second approver. Incident: {} \
                 Another approver must review it.",
                req.requested_by_name,
                req.id,
                action.title(),
                req.target,
                req.reason
            ),
        );
    } else if !auto {
        notify::send(
            state,
            "approval.requested",
            format!(
                "dbops: {} asks for approval #{}: {} on {} — {}",
                req.requested_by_name,
                req.id,
                action.title(),
                req.target,
                req.reason
            ),
        );
    }
    Ok(req)
}

/// Marks requests whose time ran out as expired, each with its log row.
pub async fn expire_due(db: &PgPool) -> Result<u64, sqlx::Error> {
    let mut tx = db.begin().await?;
    let expired: Vec<Request> = sqlx::query_as(&format!(
        "UPDATE approval_requests SET state = 'expired', finished_at = now()
         WHERE state IN ('pending', 'approved') AND execution_started_at IS NULL AND expires_at <= now()
         RETURNING {COLUMNS}"
    ))
    .fetch_all(&mut *tx)
    .await?;
    for r in &expired {
        audit::record(&mut *tx, &AuditCtx::system(), step("approval.expired", r)).await?;
    }
    tx.commit().await?;
    Ok(expired.len() as u64)
}

/// Ends executions that were claimed but never finished because the dbops running
/// them died (`approved` with an execution started more than `older_than` ago):
/// the request becomes `failed` and its action's operation `interrupted`. The
/// long ones hand their work to a job ([`crate::jobs::hand_off`]), whose own lease
/// ends the request instead, so they are left alone here.
pub async fn end_orphaned_executions(
    db: &PgPool,
    older_than: std::time::Duration,
) -> Result<u64, sqlx::Error> {
    let mut tx = db.begin().await?;
    let ended: Vec<Request> = sqlx::query_as(&format!(
        "UPDATE approval_requests SET state = 'failed', finished_at = now(),
                error = 'dbops stopped while this was running; check the target before asking again'
         WHERE state = 'approved' AND execution_started_at < now() - make_interval(secs => $1)
           AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.approval_id = approval_requests.id)
         RETURNING {COLUMNS}"
    ))
    .bind(older_than.as_secs_f64())
    .fetch_all(&mut *tx)
    .await?;
    for r in &ended {
        sqlx::query(
            "UPDATE operations SET outcome = 'interrupted', ended_at = clock_timestamp(),
                    error = 'dbops stopped while this was running'
             WHERE approval_id = $1 AND outcome = 'running'",
        )
        .bind(r.id)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(ended.len() as u64)
}

/// The decision an approver makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Approve,
    Reject,
}

/// Approves or rejects a pending request. Refused for the requester, for requests
/// no longer pending, and after expiry.
pub async fn decide(
    state: &AppState,
    ctx: &AuditCtx,
    user: &CurrentUser,
    id: i64,
    decision: Decision,
    comment: &str,
) -> Result<Request, ApprovalError> {
    decide_reconfirmed(state, ctx, user, id, decision, comment, false).await
}

/// [`decide`], with whether the approver ticked “I have seen what changed”: an
/// approval is refused (and logged as denied) when what the request acts on can
/// no longer be acted on (its backup was deleted), or when it changed since the
/// request was made and `reconfirm` is not set. A re-confirmed approval records
/// what changed in its log row.
pub async fn decide_reconfirmed(
    state: &AppState,
    ctx: &AuditCtx,
    user: &CurrentUser,
    id: i64,
    decision: Decision,
    comment: &str,
    reconfirm: bool,
) -> Result<Request, ApprovalError> {
    expire_due(&state.db).await?;
    // Read before the row is locked: it may wait for the target.
    let world = match (decision, find(&state.db, id).await?) {
        (Decision::Approve, Some(r)) if r.state == "pending" => Some(world_now(state, &r).await),
        _ => None,
    };
    let comment = comment.trim();
    let kind = match decision {
        Decision::Approve => "approval.approved",
        Decision::Reject => "approval.rejected",
    };
    let mut tx = state.db.begin().await?;
    let req: Request = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM approval_requests WHERE id = $1 FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(ApprovalError::NotFound)?;
    // The role on the request's target (per-target roles): an approver on
    // staging is not one on production.
    let role = roles::role_on(state, user, &req.target).await?;
    let refusal = if role < Role::Approver {
        Some(format!(
            "Only approvers on {} can decide this request; you are {} {role} there.",
            req.target,
            article(role)
        ))
    } else if req.requested_by == user.id {
        Some(
            "You cannot approve or reject your own request: another approver must decide it."
                .to_string(),
        )
    } else if req.state != "pending" {
        Some(format!(
            "This request is {}, not pending: it can no longer be decided.",
            req.state
        ))
    } else if decision == Decision::Reject && comment.is_empty() {
        Some("Say why you reject it: the comment is required.".to_string())
    } else if comment.chars().count() > 2000 {
        Some("The comment is too long (2,000 characters at most).".to_string())
    } else {
        world
            .as_ref()
            .and_then(|w| world_refusal(w, reconfirm, "approve it"))
    };
    if let Some(msg) = refusal {
        drop(tx);
        audit::record(&state.db, ctx, step(kind, &req).denied(msg.clone())).await?;
        return Err(ApprovalError::Refused(msg));
    }
    let reconfirmed = world.filter(WorldNow::changed).map(|w| w.reconfirmed());
    let new_state = match decision {
        Decision::Approve => "approved",
        Decision::Reject => "rejected",
    };
    let req: Request = sqlx::query_as(&format!(
        "UPDATE approval_requests SET state = $2, decided_by = $3, decided_by_name = $4, decided_at = now(),
                decision_comment = NULLIF($5, ''), finished_at = CASE WHEN $2 = 'rejected' THEN now() END
         WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(new_state)
    .bind(user.id)
    .bind(&user.username)
    .bind(comment)
    .fetch_one(&mut *tx)
    .await?;
    let mut logged = json!({ "comment": comment });
    if let Some(r) = reconfirmed {
        logged["reconfirmed"] = r;
    }
    audit::record(&mut *tx, ctx, step(kind, &req).result(logged)).await?;
    tx.commit().await?;
    notify::send(
        state,
        kind,
        format!(
            "dbops: {} {} request #{} ({} on {}) by {}{}",
            user.username,
            if decision == Decision::Approve {
                "approved"
            } else {
                "rejected"
            },
            req.id,
            req.kind,
            req.target,
            req.requested_by_name,
            if comment.is_empty() {
                String::new()
            } else {
                format!(": {comment}")
            }
        ),
    );
    Ok(req)
}

/// Withdraws a request that has not run: by its requester, or an admin.
pub async fn cancel(
    state: &AppState,
    ctx: &AuditCtx,
    user: &CurrentUser,
    id: i64,
) -> Result<Request, ApprovalError> {
    let mut tx = state.db.begin().await?;
    let req: Request = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM approval_requests WHERE id = $1 FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(ApprovalError::NotFound)?;
    if !req.can_cancel(user) {
        let msg = if req.requested_by != user.id && !user.has(Role::Admin) {
            "Only the requester (or an admin) can withdraw a request.".to_string()
        } else {
            format!(
                "This request is {}{}: it can no longer be withdrawn.",
                req.state,
                if req.is_running() { " and running" } else { "" }
            )
        };
        drop(tx);
        audit::record(
            &state.db,
            ctx,
            step("approval.cancelled", &req).denied(msg.clone()),
        )
        .await?;
        return Err(ApprovalError::Refused(msg));
    }
    let req: Request = sqlx::query_as(&format!(
        "UPDATE approval_requests SET state = 'cancelled', finished_at = now() WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .fetch_one(&mut *tx)
    .await?;
    audit::record(&mut *tx, ctx, step("approval.cancelled", &req)).await?;
    tx.commit().await?;
    Ok(req)
}

/// A second approver's verdict on a break-glass request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Review {
    Accept,
    Flag,
}

impl Review {
    pub fn as_str(self) -> &'static str {
        match self {
            Review::Accept => "accepted",
            Review::Flag => "flagged",
        }
    }
}

/// Reviews a break-glass request after the fact: by an approver (or admin) other
/// than the one who invoked it (the database refuses that too), once. Flagging
/// needs a comment. Logged as `approval.reviewed`; a flag is announced by webhook.
pub async fn review(
    state: &AppState,
    ctx: &AuditCtx,
    user: &CurrentUser,
    id: i64,
    verdict: Review,
    comment: &str,
) -> Result<Request, ApprovalError> {
    let comment = comment.trim();
    let mut tx = state.db.begin().await?;
    let req: Request = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM approval_requests WHERE id = $1 FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(ApprovalError::NotFound)?;
    let role = roles::role_on(state, user, &req.target).await?;
    let refusal = if role < Role::Approver {
        Some(format!(
            "Only approvers on {} can review a break-glass request; you are {} {role} there.",
            req.target,
            article(role)
        ))
    } else if !req.break_glass {
        Some("This request was not a break-glass request: there is nothing to review.".to_string())
    } else if req.reviewed_by.is_some() {
        Some(format!(
            "This request has already been reviewed by {}.",
            req.reviewed_by_name.as_deref().unwrap_or("someone")
        ))
    } else if req.requested_by == user.id {
        Some(
            "You broke glass on this request yourself: another approver must review it."
                .to_string(),
        )
    } else if verdict == Review::Flag && comment.is_empty() {
        Some("Say what is wrong: a comment is required to flag it.".to_string())
    } else if comment.chars().count() > 2000 {
        Some("The comment is too long (2,000 characters at most).".to_string())
    } else {
        None
    };
    if let Some(msg) = refusal {
        drop(tx);
        audit::record(
            &state.db,
            ctx,
            step("approval.reviewed", &req).denied(msg.clone()),
        )
        .await?;
        return Err(ApprovalError::Refused(msg));
    }
    let req: Request = sqlx::query_as(&format!(
        "UPDATE approval_requests SET reviewed_by = $2, reviewed_by_name = $3, reviewed_at = now(), review = $4,
                review_comment = NULLIF($5, '')
         WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(user.id)
    .bind(&user.username)
    .bind(verdict.as_str())
    .bind(comment)
    .fetch_one(&mut *tx)
    .await?;
    audit::record(
        &mut *tx,
        ctx,
        step("approval.reviewed", &req)
            .result(json!({ "review": verdict.as_str(), "comment": comment })),
    )
    .await?;
    tx.commit().await?;
    if verdict == Review::Flag {
        notify::send(
            state,
            "approval.flagged",
            format!(
                "dbops: {} flagged break-glass request #{} ({} on {}) by {}: {comment}",
                user.username, req.id, req.kind, req.target, req.requested_by_name
            ),
        );
    }
    Ok(req)
}

/// Runs an approved request: claims its single execution atomically (a second,
/// concurrent call finds it claimed and is refused), checks the stored parameters
/// against their hash, runs the action with them, and records the outcome on the
/// request and in the operations log.
pub async fn execute(
    state: &AppState,
    ctx: &AuditCtx,
    user: &CurrentUser,
    id: i64,
) -> Result<Request, ApprovalError> {
    execute_confirmed(state, ctx, user, id, None).await
}

/// [`execute`] with what the executor typed to confirm: an action whose
/// [`Action::confirm_name`] is set runs only when it is the target's name (else the
/// attempt is refused and logged, and the request can still be run).
pub async fn execute_confirmed(
    state: &AppState,
    ctx: &AuditCtx,
    user: &CurrentUser,
    id: i64,
    confirm: Option<&str>,
) -> Result<Request, ApprovalError> {
    execute_with(state, ctx, user, id, confirm, false).await
}

/// [`execute_confirmed`], with whether the executor ticked “I have seen what
/// changed”: a run is refused (and logged as denied) when what the request acts
/// on can no longer be acted on, or changed since the request was made and
/// `reconfirm` is not set. A re-confirmed run records what changed in its
/// operations-log row.
pub async fn execute_with(
    state: &AppState,
    ctx: &AuditCtx,
    user: &CurrentUser,
    id: i64,
    confirm: Option<&str>,
    reconfirm: bool,
) -> Result<Request, ApprovalError> {
    expire_due(&state.db).await?;
    if let Some(req) = find(&state.db, id).await?
        && state
            .actions
            .get(&req.kind)
            .is_some_and(|a| a.confirm_name())
        && confirm.map(str::trim) != Some(req.target.as_str())
    {
        let msg = format!(
            "Type the target's name ({}) to confirm; nothing was run.",
            req.target
        );
        return refuse_execution(state, ctx, &req, msg).await;
    }
    let mut reconfirmed = None;
    if let Some(req) = find(&state.db, id).await?
        && req.state == "approved"
        && req.execution_started_at.is_none()
    {
        let world = world_now(state, &req).await;
        if let Some(msg) = world_refusal(&world, reconfirm, "run it") {
            return refuse_execution(state, ctx, &req, format!("{msg} Nothing was run.")).await;
        }
        reconfirmed = world.changed().then(|| world.reconfirmed());
    }
    // Running someone else's approved request takes an approver on its target.
    let approver = match find(&state.db, id).await? {
        Some(r) => roles::role_on(state, user, &r.target).await? >= Role::Approver,
        None => false,
    };
    let claimed: Option<Request> = sqlx::query_as(&format!(
        "UPDATE approval_requests SET execution_started_at = clock_timestamp(), executed_by = $2, executed_by_name = $3
         WHERE id = $1 AND state = 'approved' AND execution_started_at IS NULL AND expires_at > now()
           AND (requested_by = $2 OR $4)
         RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(user.id)
    .bind(&user.username)
    .bind(approver)
    .fetch_optional(&state.db)
    .await?;
    let Some(req) = claimed else {
        let req = find(&state.db, id).await?.ok_or(ApprovalError::NotFound)?;
        let msg = match req.state.as_str() {
            "pending" => "This request is still waiting for an approver.".to_string(),
            "approved" if req.execution_started_at.is_some() => {
                "This request has already been started; it runs only once.".to_string()
            }
            "approved" if req.requested_by != user.id && !approver => {
                format!(
                    "Only the requester or an approver on {} can run this request.",
                    req.target
                )
            }
            "approved" => "This request has expired.".to_string(),
            "executed" | "failed" => "This request has already run; it runs only once.".to_string(),
            other => format!("This request is {other}: it cannot run."),
        };
        return refuse_execution(state, ctx, &req, msg).await;
    };

    let outcome = run_claimed(state, ctx, &req, reconfirmed).await;
    if let Ok(r) = &outcome
        && let Some(job) = crate::jobs::handed_off(r)
    {
        // The work goes on as a job; the request ends with it.
        tracing::info!(request = req.id, job, "approved action handed off to a job");
        return find(&state.db, id).await?.ok_or(ApprovalError::NotFound);
    }
    let (new_state, error, result) = match &outcome {
        Ok(r) => ("executed", None, Some(r.clone())),
        Err(e) => ("failed", Some(e.clone()), None),
    };
    let req: Request = sqlx::query_as(&format!(
        "UPDATE approval_requests SET state = $2, finished_at = clock_timestamp(), error = $3, result = $4
         WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(new_state)
    .bind(&error)
    .bind(&result)
    .fetch_one(&state.db)
    .await?;
    // An approved action ran: its record is signed outside the database.
    let st = state.clone();
    tokio::spawn(async move { crate::audit::checkpoint::checkpoint_now(&st, false).await });
    if let Err(e) = &outcome {
        notify::send(
            state,
            "approval.failed",
            format!(
                "dbops: request #{} ({} on {}) failed: {e}",
                req.id, req.kind, req.target
            ),
        );
    } else if state.config.notifications.notify_success {
        notify::send(
            state,
            "approval.executed",
            format!(
                "dbops: request #{} ({} on {}) ran.",
                req.id, req.kind, req.target
            ),
        );
    }
    Ok(req)
}

/// Logs a refused execution (`approval.execute`, denied) and returns the refusal.
async fn refuse_execution(
    state: &AppState,
    ctx: &AuditCtx,
    req: &Request,
    msg: String,
) -> Result<Request, ApprovalError> {
    audit::record(
        &state.db,
        ctx,
        Entry::new("approval.execute")
            .target(req.target.clone())
            .approval(req.id)
            .denied(msg.clone()),
    )
    .await?;
    Err(ApprovalError::Refused(msg))
}

/// The execution itself, bracketed by its operations-log row (kind = the action's
/// kind, linked to the request).
async fn run_claimed(
    state: &AppState,
    ctx: &AuditCtx,
    req: &Request,
    reconfirmed: Option<Value>,
) -> Result<Value, String> {
    let Some(action) = state.actions.get(&req.kind) else {
        return Err(format!("{} is not an action this dbops knows.", req.kind));
    };
    let kind = action.kind();
    // The log row carries the request's parameters, and marks a break-glass run
    // and a run whose executor re-confirmed a changed world.
    let mut logged = req.params.clone();
    if let Value::Object(m) = &mut logged {
        if req.break_glass {
            m.insert("break_glass".into(), json!(true));
        }
        if let Some(r) = reconfirmed {
            m.insert("reconfirmed".into(), r);
        }
    }
    let op = audit::start(
        &state.db,
        ctx,
        Entry::new(kind)
            .target(req.target.clone())
            .approval(req.id)
            .params(logged),
    )
    .await
    .map_err(|e| format!("could not write the operations log: {e}"))?;
    let outcome = if params_hash(&req.params) != req.params_hash {
        Err("The stored parameters no longer match what was approved (hash mismatch); nothing was run.".to_string())
    } else {
        match state.targets.get(&req.target) {
            None => Err(format!(
                "There is no target called {} any more.",
                req.target
            )),
            Some(target) => {
                let exec = ExecCtx {
                    state: state.clone(),
                    target,
                    audit: ctx.clone(),
                    approval: req.id,
                    operation: op,
                };
                state.actions.run_before(&exec, action.as_ref()).await;
                action.execute(exec, &req.params).await
            }
        }
    };
    if let Ok(r) = &outcome
        && crate::jobs::handed_off(r).is_some()
    {
        // The job ends the operation.
        return outcome;
    }
    let (o, err, res) = match &outcome {
        Ok(r) => (Outcome::Succeeded, None, Some(r.clone())),
        Err(e) => (Outcome::Failed, Some(e.as_str()), None),
    };
    if let Err(e) = audit::finish(&state.db, op, o, err, res).await {
        tracing::error!(error = %e, operation = op, "could not record the outcome of an approved action");
    }
    outcome
}
