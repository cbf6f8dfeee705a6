//! The login page, logging in and out.

use askama::Template;
use askama_web::WebTemplate;
use axum::{
    Form,
    extract::{Path, Query, RawQuery, State},
    http::{HeaderMap, StatusCode, header},
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
        oidc, session,
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
    /// `(name, display name)` of each `[[oidc]]` provider.
    providers: Vec<(String, String)>,
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
    State(state): State<AppState>,
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
        providers: state.oidc.buttons(),
    }
    .into_response())
}

/// The session key of a sign-in at a provider in progress.
const OIDC_PENDING: &str = "oidc_pending";

/// The session key naming the provider a session was signed in through.
const SSO_PROVIDER: &str = "sso_provider";

/// This console's base URL: `[sign_in] public_url`, else from the request's `Host`.
fn base_url(state: &AppState, headers: &HeaderMap) -> Result<String, AppError> {
    callback_url(state, headers, "x")
        .map(|u| u.trim_end_matches("/login/oidc/x/callback").to_string())
}

/// The URL a provider sends the browser back to: under `[sign_in] public_url`,
/// else under the request's `Host` (plain http: a console reached from elsewhere
/// sets `public_url`).
fn callback_url(state: &AppState, headers: &HeaderMap, provider: &str) -> Result<String, AppError> {
    let base = match &state.config.sign_in.public_url {
        Some(u) => u.clone(),
        None => {
            let host = headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .filter(|h| {
                    !h.is_empty()
                        && h.len() <= 255
                        && h.chars().all(|c| {
                            c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '-' | '[' | ']')
                        })
                })
                .ok_or_else(|| {
                    AppError::BadRequest(
                        "The request has no usable Host header; set [sign_in] public_url.".into(),
                    )
                })?;
            format!("http://{host}")
        }
    };
    Ok(format!("{base}/login/oidc/{provider}/callback"))
}

/// The login page with an error, after a refused sign-in through a provider.
async fn sso_refused(
    state: &AppState,
    session: &Session,
    status: StatusCode,
    message: String,
) -> AppResult<Response> {
    Ok((
        status,
        LoginPage {
            csrf: session::csrf_token(session).await?,
            next: "/".into(),
            username: String::new(),
            error: Some(message),
            providers: state.oidc.buttons(),
        },
    )
        .into_response())
}

/// `GET /login/oidc/{provider}`: off to the provider's sign-in page.
pub async fn start_sso(
    State(state): State<AppState>,
    session: Session,
    ctx: AuditCtx,
    headers: HeaderMap,
    Path(provider): Path<String>,
    Query(q): Query<NextParam>,
) -> AppResult<Response> {
    if state.oidc.config(&provider).is_none() {
        return Err(AppError::NotFound);
    }
    let callback = callback_url(&state, &headers, &provider)?;
    match state
        .oidc
        .begin(&provider, &callback, safe_next(q.next.as_deref()))
        .await
    {
        Ok((url, pending)) => {
            session
                .insert(OIDC_PENDING, &pending)
                .await
                .map_err(|e| AppError::Internal(anyhow::anyhow!("session store: {e}")))?;
            Ok(Redirect::to(&url).into_response())
        }
        Err(e) => {
            oidc::log_refusal(&state.db, &ctx, &provider, &e).await?;
            sso_refused(&state, &session, StatusCode::BAD_GATEWAY, e.to_string()).await
        }
    }
}

#[derive(Deserialize)]
pub struct CallbackParams {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
    /// Set on the second, same-site request (see [`finish_sso`]).
    hop: Option<String>,
}

/// Answers a callback whose request carried no session cookie: the session
/// cookie is `SameSite=Strict`, so a browser leaves it off the provider's
/// cross-site redirect. This page asks for the same URL again from dbops' own page
/// (a same-site request, which carries the cookie). It touches no session, so it
/// sets no cookie.
fn same_site_hop(provider: &str, raw_query: &str) -> Response {
    let attr = html_attr(&format!(
        "/login/oidc/{provider}/callback?{raw_query}&hop=1"
    ));
    (
        [(header::CACHE_CONTROL, "no-store")],
        axum::response::Html(format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"0;url={attr}\"><title>Signing in · dbops</title></head><body><p>Signing in… <a href=\"{attr}\">Continue</a></p></body></html>"
        )),
    )
        .into_response()
}

/// `GET /login/oidc/{provider}/callback`: the provider sends the browser back here.
pub async fn finish_sso(
    State(state): State<AppState>,
    session: Session,
    ctx: AuditCtx,
    headers: HeaderMap,
    Path(provider): Path<String>,
    Query(q): Query<CallbackParams>,
    RawQuery(raw_query): RawQuery,
) -> AppResult<Response> {
    let Some(config) = state.oidc.config(&provider) else {
        return Err(AppError::NotFound);
    };
    let has_pending = session
        .get::<oidc::Pending>(OIDC_PENDING)
        .await
        .ok()
        .flatten()
        .is_some();
    if !has_pending && q.hop.is_none() && raw_query.as_deref().is_some_and(|r| r.len() < 8000) {
        return Ok(same_site_hop(&provider, raw_query.as_deref().unwrap_or("")));
    }
    // Taken out of the session whatever happens next: a callback works once.
    let pending: Option<oidc::Pending> = session
        .remove(OIDC_PENDING)
        .await
        .map_err(|e| AppError::Internal(anyhow::anyhow!("session store: {e}")))?;
    let next = pending
        .as_ref()
        .map(|p| p.next.clone())
        .unwrap_or_else(|| "/".into());
    let result = match &q.error {
        Some(err) => Err(oidc::OidcError::ProviderError(
            format!(
                "{err}{}",
                q.error_description
                    .as_deref()
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default()
            )
            .chars()
            .take(300)
            .collect(),
        )),
        None => {
            let callback = callback_url(&state, &headers, &provider)?;
            state
                .oidc
                .finish(
                    &provider,
                    &callback,
                    pending,
                    q.state.as_deref(),
                    q.code.as_deref(),
                )
                .await
        }
    };
    let identity = match result {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(provider = %provider, error = %e, "sign-in through a provider refused");
            oidc::log_refusal(&state.db, &ctx, &provider, &e).await?;
            return sso_refused(&state, &session, StatusCode::UNAUTHORIZED, e.to_string()).await;
        }
    };
    match oidc::sign_in(&state.db, config, &ctx, &identity).await? {
        oidc::SsoResult::Ok(user) => {
            session::begin(&session, &user).await?;
            session
                .insert(SSO_PROVIDER, &provider)
                .await
                .map_err(|e| AppError::Internal(anyhow::anyhow!("session store: {e}")))?;
            Ok(Redirect::to(&next).into_response())
        }
        oidc::SsoResult::Refused(message) => {
            sso_refused(&state, &session, StatusCode::FORBIDDEN, message).await
        }
    }
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
                providers: state.oidc.buttons(),
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
        state.config.sign_in.require_two_factor,
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
        LoginResult::SecondFactor(user) => {
            session::begin_second_factor(&session, user.id, &next).await?;
            Ok(Redirect::to("/login/two-factor").into_response())
        }
        LoginResult::MustEnrol(user) => {
            session::begin(&session, &user).await?;
            session::set_must_enrol(&session, true).await?;
            Ok(Redirect::to("/account/two-factor").into_response())
        }
        LoginResult::PasswordSignInOff => Ok(fail(
            StatusCode::FORBIDDEN,
            "Password sign-in is turned off: use a sign-in button below (only admins may still use a password).".into(),
            csrf,
        )),
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

/// `POST /logout`: ends the session, and for a session signed in through a
/// provider that supports it, sends the browser on to sign out there too.
pub async fn logout(
    State(state): State<AppState>,
    user: Option<CurrentUser>,
    session: Session,
    ctx: AuditCtx,
    headers: HeaderMap,
) -> AppResult<Response> {
    let provider: Option<String> = session.get(SSO_PROVIDER).await.ok().flatten();
    let at_provider = match (&user, &provider) {
        (Some(_), Some(p)) => match base_url(&state, &headers) {
            Ok(base) => {
                state
                    .oidc
                    .end_session_url(p, &format!("{base}/login"))
                    .await
            }
            Err(_) => None,
        },
        _ => None,
    };
    if user.is_some() {
        audit::record(
            &state.db,
            &ctx,
            Entry::new("auth.logout").params(serde_json::json!({
                "provider": provider, "signed_out_at_provider": at_provider.is_some(),
            })),
        )
        .await?;
    }
    session::end(&session).await.map_err(AppError::Internal)?;
    Ok(match at_provider {
        // Not a redirect: the page's `form-action 'self'` would stop a form's
        // redirect to another site. A page that moves on by itself is not a form.
        Some(url) => (
            [(header::CACHE_CONTROL, "no-store")],
            axum::response::Html(format!(
                "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"0;url={u}\"><title>Signed out · dbops</title></head><body><p>Signed out of dbops. Signing out at the identity provider… <a href=\"{u}\">Continue</a></p></body></html>",
                u = html_attr(&url)
            )),
        )
            .into_response(),
        None => Redirect::to("/login").into_response(),
    })
}

/// Text for a double-quoted HTML attribute.
fn html_attr(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '&' => "&amp;".to_string(),
            '"' => "&quot;".to_string(),
            '<' => "&lt;".to_string(),
            '>' => "&gt;".to_string(),
            '\'' => "&#39;".to_string(),
            c => c.to_string(),
        })
        .collect()
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
