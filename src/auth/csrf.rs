//! CSRF protection: every state-changing request (anything but GET, HEAD, OPTIONS)
//! must carry the session's token, as the `X-CSRF-Token` header (htmx sends it on
//! every request, from `hx-headers` on `<body>`) or as the form field `csrf_token`.
//! Applied to the whole router, so no route can forget it.

use axum::{
    body::{Body, to_bytes},
    extract::{Request, State},
    http::{Method, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use serde_json::json;
use tower_sessions::Session;

use super::session;
use crate::{
    audit::{self, AuditCtx, Entry},
    error::AppError,
    state::AppState,
};

/// The header htmx sends the token in.
pub const HEADER: &str = "x-csrf-token";
/// The form field forms send the token in.
pub const FIELD: &str = "csrf_token";
/// The largest form body read to look for the token; larger bodies are refused
/// earlier by the body limit.
const MAX_FORM: usize = 1024 * 1024;

/// Compares without an early exit, so that timing tells nothing about the token.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn form_token(body: &[u8]) -> Option<String> {
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(body)
        .ok()?
        .into_iter()
        .find(|(k, _)| k == FIELD)
        .map(|(_, v)| v)
}

/// The middleware.
pub async fn check(
    State(state): State<AppState>,
    session: Session,
    ctx: AuditCtx,
    req: Request,
    next: Next,
) -> Response {
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(req).await;
    }
    // The API authenticates with bearer tokens only, never the session cookie, so a
    // forged cross-site request has nothing to ride on.
    if req.uri().path().starts_with("/api/") {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let header_token = parts
        .headers
        .get(HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let is_form = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/x-www-form-urlencoded"));
    let (presented, body) = match header_token {
        Some(t) => (Some(t), body),
        None if is_form => match to_bytes(body, MAX_FORM).await {
            Ok(bytes) => (form_token(&bytes), Body::from(bytes)),
            Err(_) => {
                return AppError::bad_request("The form is too large.").into_response();
            }
        },
        None => (None, body),
    };
    let expected = match session::existing_csrf_token(&session).await {
        Ok(t) => t,
        Err(e) => return AppError::Internal(e).into_response(),
    };
    match (presented, expected) {
        (Some(p), Some(e)) if same(&p, &e) => next.run(Request::from_parts(parts, body)).await,
        (presented, _) => {
            let user = session::current_user(&state.db, &state.config.session, &session)
                .await
                .ok()
                .flatten();
            let ctx = match &user {
                Some(u) => ctx.with_user(u),
                None => ctx,
            };
            let reason = if presented.is_some() {
                "wrong CSRF token"
            } else {
                "missing CSRF token"
            };
            if let Err(e) = audit::record(
                &state.db,
                &ctx,
                Entry::new("auth.csrf.rejected")
                    .params(json!({ "method": parts.method.as_str(), "path": parts.uri.path() }))
                    .denied(reason),
            )
            .await
            {
                tracing::error!(error = %e, "could not record a CSRF rejection");
            }
            AppError::Forbidden(
                "This form has expired or did not come from dbops. Reload the page and try again."
                    .into(),
            )
            .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_exactly() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "abcd"));
        assert_eq!(form_token(b"a=1&csrf_token=xyz"), Some("xyz".into()));
        assert_eq!(form_token(b"a=1"), None);
    }
}
