//! The login page, logging in and out.

use askama::Template;
use askama_web::WebTemplate;
use axum::{
    Form,
    extract::{Query, State},
    http::StatusCode,
    response::{IntoResponse, Redirect, Response},
};
use serde::Deserialize;
use tower_sessions::Session;

use crate::{
    app::AppState,
    audit::{self, AuditCtx, Entry},
    auth::{
        CurrentUser,
        login::{LoginResult, attempt},
        session,
    },
    error::{AppError, AppResult},
};

#[derive(Template, WebTemplate)]
#[template(path = "login.html")]
struct LoginPage {
    csrf: String,
    next: String,
    username: String,
    error: Option<String>,
}

#[derive(Deserialize)]
pub struct NextParam {
    next: Option<String>,
}

/// Where to go after login: only a path on this site (`/x`), never another site
/// (`//evil`, `/\evil`, `https://evil`).
pub fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && !n.starts_with("/\\")
                && !n.chars().any(|c| c.is_control() || c == '\\')
                && n.len() <= 2000 =>
        {
            n.to_string()
        }
        _ => "/".to_string(),
    }
}

/// `GET /login`
pub async fn login_page(
    user: Option<CurrentUser>,
    session: Session,
    Query(q): Query<NextParam>,
) -> AppResult<Response> {
    let next = safe_next(q.next.as_deref());
    if user.is_some() {
        return Ok(Redirect::to(&next).into_response());
    }
    Ok(LoginPage {
        csrf: session::csrf_token(&session).await?,
        next,
        username: String::new(),
        error: None,
    }
    .into_response())
}

#[derive(Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    next: Option<String>,
}

/// `POST /login`
pub async fn login(
    State(state): State<AppState>,
    session: Session,
    ctx: AuditCtx,
    Form(form): Form<LoginForm>,
) -> AppResult<Response> {
    let next = safe_next(form.next.as_deref());
    let fail = |status: StatusCode, message: String, csrf: String| {
        (
            status,
            LoginPage {
                csrf,
                next: next.clone(),
                username: form.username.chars().take(64).collect(),
                error: Some(message),
            },
        )
            .into_response()
    };
    if form.username.trim().is_empty() || form.password.is_empty() {
        let csrf = session::csrf_token(&session).await?;
        return Ok(fail(
            StatusCode::BAD_REQUEST,
            "Enter your username and password.".into(),
            csrf,
        ));
    }
    if form.username.len() > 256 || form.password.len() > 1024 {
        let csrf = session::csrf_token(&session).await?;
        return Ok(fail(
            StatusCode::BAD_REQUEST,
            "That username or password is too long.".into(),
            csrf,
        ));
    }
    let result = attempt(
        &state.db,
        &state.config.lockout,
        &ctx,
        &form.username,
        &form.password,
    )
    .await?;
    let csrf = session::csrf_token(&session).await?;
    match result {
        LoginResult::Ok(user) => {
            session::begin(&session, &user).await?;
            Ok(Redirect::to(&next).into_response())
        }
        LoginResult::Wrong | LoginResult::Disabled => Ok(fail(
            StatusCode::UNAUTHORIZED,
            "Wrong username or password.".into(),
            csrf,
        )),
        LoginResult::Locked(until) => Ok(fail(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "Too many failed attempts: this account is locked until {}. An admin can unlock it by resetting the password.",
                until.format("%H:%M UTC")
            ),
            csrf,
        )),
    }
}

/// `POST /logout`
pub async fn logout(
    State(state): State<AppState>,
    user: Option<CurrentUser>,
    session: Session,
    ctx: AuditCtx,
) -> AppResult<Response> {
    if user.is_some() {
        audit::record(&state.db, &ctx, Entry::new("auth.logout")).await?;
    }
    session::end(&session).await.map_err(AppError::Internal)?;
    Ok(Redirect::to("/login").into_response())
}

#[cfg(test)]
mod tests {
    use super::safe_next;

    #[test]
    fn only_local_paths_are_followed_after_login() {
        assert_eq!(
            safe_next(Some("/operations?kind=auth.")),
            "/operations?kind=auth."
        );
        for evil in [
            "//evil.example",
            "/\\evil.example",
            "https://evil.example",
            "javascript:alert(1)",
            "/\x0a//x",
        ] {
            assert_eq!(safe_next(Some(evil)), "/", "{evil}");
        }
        assert_eq!(safe_next(None), "/");
    }
}
