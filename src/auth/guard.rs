//! The authorization check on every route. the web layer's `routes()` wraps each route
//! in [`authorize`] with the route's declared [`Access`]; a denied request is
//! written to the operations log and answered with a page that says why.
//!
//! Roles are per target ([`super::roles`]): a route that acts on one target — its
//! path names it (`{target}`), or it acts on a backup, restore, job, approval
//! request, incident or maintenance window of a target ([`OBJECT_ROUTES`]) — checks the user's role on
//! that target; a route about no single target checks the highest role the user
//! has anywhere. The role checked is the one the handler sees in
//! [`CurrentUser::role`] (and the operations log records).

use std::sync::Arc;

use axum::{
    RequestExt,
    extract::{RawPathParams, Request, State},
    http::{Method, header},
    middleware::Next,
    response::{IntoResponse, Redirect, Response},
};
use serde_json::json;
use tower_sessions::Session;

use super::{Access, CurrentUser, roles, session};
use crate::{
    audit::{self, AuditCtx, Entry},
    error::AppError,
    state::AppState,
    targets::Target,
};

/// Routes that act on an object of one target, by the start of their path, and
/// the table the object's target is read from (its `{id}`).
pub const OBJECT_ROUTES: [(&str, &str); 6] = [
    ("/backups/{id}", "backups"),
    ("/restores/{id}", "restores"),
    ("/jobs/{id}", "jobs"),
    ("/approvals/{id}", "approval_requests"),
    ("/incidents/{id}", "incidents"),
    // A maintenance window: its first target.
    ("/windows/{id}", "maintenance_windows"),
];

/// The target a route acts on: the one its path names, or the one the object it
/// acts on belongs to. `None` for routes about no single target, and for a target
/// or object that does not exist (the handler answers that).
async fn route_target(
    state: &AppState,
    pattern: &str,
    req: &mut Request,
) -> Result<Option<Arc<Target>>, sqlx::Error> {
    let names_target = pattern.contains("{target}");
    let table = OBJECT_ROUTES
        .iter()
        .find(|(prefix, _)| pattern.starts_with(prefix))
        .map(|(_, table)| *table);
    if !names_target && table.is_none() {
        return Ok(None);
    }
    let Ok(params) = req.extract_parts::<RawPathParams>().await else {
        return Ok(None);
    };
    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    };
    let name = if names_target {
        param("target")
    } else {
        match (table, param("id").and_then(|id| id.parse::<i64>().ok())) {
            (Some(table), Some(id)) => {
                sqlx::query_scalar(&format!("SELECT target FROM {table} WHERE id = $1"))
                    .bind(id)
                    .fetch_optional(&state.db)
                    .await?
            }
            _ => None,
        }
    };
    Ok(name.and_then(|n| state.targets.get(&n)))
}

/// The user's roles, and the role this request acts with: on the route's target,
/// or the highest anywhere. `None` when a role dropped since the session last
/// looked (the session is ended: a drop on any target ends it, as a global one does).
async fn with_target_role(
    state: &AppState,
    session: &Session,
    pattern: &str,
    req: &mut Request,
    mut user: CurrentUser,
) -> anyhow::Result<(Option<(CurrentUser, roles::Roles)>, Option<Arc<Target>>)> {
    let roles = roles::load(&state.db, user.id, user.role).await?;
    let everywhere = state.targets.all().map(|t| (t.name(), t.policy()));
    if session::roles_dropped(session, &roles, everywhere).await? {
        session::end(session).await?;
        return Ok((None, None));
    }
    let target = route_target(state, pattern, req).await?;
    user.role = match &target {
        Some(t) => roles.on(t.name(), t.policy()),
        None => roles.highest(),
    };
    Ok((Some((user, roles)), target))
}

/// The middleware: resolves the session's user and their role for this route's
/// target, puts both into the request's extensions, and lets the request through
/// only when `access` allows it.
pub async fn authorize(
    State(state): State<AppState>,
    access: Access,
    pattern: &'static str,
    session: Session,
    ctx: AuditCtx,
    mut req: Request,
    next: Next,
) -> Response {
    let user = match session::current_user(&state.db, &state.config.session, &session).await {
        Ok(u) => u,
        Err(e) => return database_trouble(e),
    };
    let (user, target) = match user {
        Some(u) => match with_target_role(&state, &session, pattern, &mut req, u).await {
            Ok(found) => found,
            Err(e) => return database_trouble(e),
        },
        None => (None, None),
    };
    if let Some((u, r)) = &user {
        req.extensions_mut().insert(u.clone());
        req.extensions_mut().insert(r.clone());
    }
    let user = user.map(|(u, _)| u);
    let required = match access {
        Access::Public => return next.run(req).await,
        Access::AtLeast(role) => role,
        Access::Token(scope) => return authorize_token(&state, scope, ctx, req, next).await,
        Access::Metrics => {
            let presented = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            return match metrics_access(&state.config.metrics, presented) {
                MetricsAccess::Serve => next.run(req).await,
                MetricsAccess::Unauthorized => (
                    axum::http::StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, "Bearer")],
                    "/metrics needs the bearer token configured in [metrics]\n",
                )
                    .into_response(),
                MetricsAccess::NotFound => AppError::NotFound.into_response(),
            };
        }
    };
    let target_name = target.as_ref().map(|t| t.name().to_string());
    let params = json!({ "method": req.method().as_str(), "path": req.uri().path(), "required_role": required.as_str(), "target": target_name });
    match user {
        Some(_)
            if !TWO_FACTOR_ENROLMENT.contains(&req.uri().path())
                && session::must_enrol(&session).await.unwrap_or(false) =>
        {
            // `[sign_in] require_two_factor`: an admin or approver without a second
            // factor enrols one before doing anything else.
            if req.method() == Method::GET && !req.headers().contains_key("hx-request") {
                Redirect::to(TWO_FACTOR_ENROLMENT[0]).into_response()
            } else {
                AppError::Forbidden(
                    "Set up two-factor sign-in first (your account page): it is required for your role."
                        .into(),
                )
                .into_response()
            }
        }
        Some(u) if u.role >= required => next.run(req).await,
        Some(u) => {
            let ctx = ctx.with_user(&u);
            let (reason, message) = match &target_name {
                Some(t) => (
                    format!("role too low on {t}"),
                    format!(
                        "This needs the {required} role or higher on {t}; you are signed in as {} with the {} role on {t}.",
                        u.username, u.role
                    ),
                ),
                None => (
                    "role too low".to_string(),
                    format!(
                        "This needs the {required} role or higher; you are signed in as {} with the {} role.",
                        u.username, u.role
                    ),
                ),
            };
            log_denial(&state, &ctx, params, &reason, target_name.clone()).await;
            AppError::Forbidden(message).into_response()
        }
        None => {
            log_denial(&state, &ctx, params, "not logged in", target_name).await;
            let is_htmx = req.headers().contains_key("hx-request");
            let wants_html = req
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|a| a.contains("text/html"));
            if req.method() == Method::GET && !is_htmx && wants_html {
                let next_path = req
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str())
                    .unwrap_or("/");
                let q = serde_urlencoded::to_string([("next", next_path)]).unwrap_or_default();
                Redirect::to(&format!("/login?{q}")).into_response()
            } else {
                AppError::Unauthenticated.into_response()
            }
        }
    }
}

/// The pages a session that must enrol a second factor may still reach.
const TWO_FACTOR_ENROLMENT: [&str; 2] = ["/account/two-factor", "/logout"];

/// What a metrics scrape gets.
#[derive(Debug, PartialEq, Eq)]
pub enum MetricsAccess {
    Serve,
    /// A token is configured and was not presented, or a wrong one was. Not
    /// written to the operations log: a scraper that lost its token would fill it.
    Unauthorized,
    /// Neither a token nor `public = true` is configured: no such page.
    NotFound,
}

/// Decides a metrics scrape from the `Authorization` header; the token is
/// compared in constant time (as SHA-256 digests, so that its length does not
/// show either).
pub fn metrics_access(
    settings: &crate::config::MetricsSettings,
    authorization: Option<&str>,
) -> MetricsAccess {
    use secrecy::ExposeSecret;
    use sha2::{Digest, Sha256};
    match &settings.token {
        Some(token) => {
            let presented = authorization
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim)
                .unwrap_or("");
            let a = Sha256::digest(presented.as_bytes());
            let b = Sha256::digest(token.expose_secret().as_bytes());
            let differ = a
                .iter()
                .zip(b.iter())
                .fold(0u8, |acc, (x, y)| acc | (x ^ y));
            if differ == 0 && !presented.is_empty() {
                MetricsAccess::Serve
            } else {
                MetricsAccess::Unauthorized
            }
        }
        None if settings.public => MetricsAccess::Serve,
        None => MetricsAccess::NotFound,
    }
}

/// API routes: a bearer token with the scope, nothing else.
async fn authorize_token(
    state: &AppState,
    scope: &'static str,
    ctx: AuditCtx,
    mut req: Request,
    next: Next,
) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .map(str::to_string);
    let params = json!({ "method": req.method().as_str(), "path": req.uri().path(), "required_scope": scope });
    let client = match &presented {
        Some(t) => match super::tokens::authenticate(&state.db, t, scope).await {
            Ok(c) => c,
            Err(e) => return AppError::from(e).into_response(),
        },
        None => None,
    };
    match client {
        Some(c) => {
            req.extensions_mut().insert(c);
            next.run(req).await
        }
        None => {
            let reason = if presented.is_some() {
                "invalid, revoked or unscoped API token"
            } else {
                "no API token"
            };
            log_denial(state, &ctx, params, reason, None).await;
            (
                axum::http::StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                axum::Json(json!({ "error": format!("{reason}: this needs a token with the {scope} scope") })),
            )
                .into_response()
        }
    }
}

async fn log_denial(
    state: &AppState,
    ctx: &AuditCtx,
    params: serde_json::Value,
    reason: &str,
    target: Option<String>,
) {
    let mut entry = Entry::new("auth.denied").params(params).denied(reason);
    if let Some(t) = target {
        entry = entry.target(t);
    }
    if let Err(e) = audit::record(&state.db, ctx, entry).await {
        tracing::error!(error = %e, "could not record a denied request");
    }
}

fn database_trouble(e: anyhow::Error) -> Response {
    match e.downcast::<sqlx::Error>() {
        Ok(db) => AppError::from(db).into_response(),
        // The session store lives in the console database too.
        Err(other) if other.to_string().starts_with("session store") => {
            tracing::error!(error = %other, "session store unavailable");
            AppError::Unavailable(
                "The console database is not answering right now. Try again in a moment.".into(),
            )
            .into_response()
        }
        Err(other) => AppError::Internal(other).into_response(),
    }
}
