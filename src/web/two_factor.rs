//! Two-factor sign-in pages: the second step of a password sign-in
//! (`/login/two-factor`) and enrolment on one's own account page
//! (`/account/two-factor`: QR code, confirmation code, recovery codes shown once).

use askama::Template;
use askama_web::WebTemplate;
use axum::{
    Form,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Redirect, Response},
};
use serde::Deserialize;
use serde_json::json;
use tower_sessions::Session;

use super::Layout;
use crate::{
    app::AppState,
    audit::{self, AuditCtx, Entry},
    auth::{
        CurrentUser,
        login::{LoginResult, second_factor},
        session, totp, users,
    },
    error::{AppError, AppResult},
};

#[derive(Template, WebTemplate)]
#[template(path = "login_two_factor.html")]
struct SecondFactorPage {
    csrf: String,
    error: Option<String>,
}

/// `GET /login/two-factor`
pub async fn second_factor_page(session: Session) -> AppResult<Response> {
    if session::pending_second_factor(&session).await?.is_none() {
        return Ok(Redirect::to("/login").into_response());
    }
    Ok(SecondFactorPage {
        csrf: session::csrf_token(&session).await?,
        error: None,
    }
    .into_response())
}

#[derive(Deserialize)]
pub struct CodeForm {
    #[serde(default)]
    code: String,
}

/// `POST /login/two-factor`
pub async fn submit_second_factor(
    State(state): State<AppState>,
    session: Session,
    ctx: AuditCtx,
    Form(form): Form<CodeForm>,
) -> AppResult<Response> {
    let Some((uid, next)) = session::pending_second_factor(&session).await? else {
        return Ok(Redirect::to("/login").into_response());
    };
    let fail = |status: StatusCode, message: &str, csrf: String| {
        (
            status,
            SecondFactorPage {
                csrf,
                error: Some(message.to_string()),
            },
        )
            .into_response()
    };
    if form.code.trim().is_empty() || form.code.len() > 64 {
        let csrf = session::csrf_token(&session).await?;
        return Ok(fail(
            StatusCode::BAD_REQUEST,
            "Enter the 6-digit code from your authenticator app, or a recovery code.",
            csrf,
        ));
    }
    let result = second_factor(&state.db, &state.config.lockout, &ctx, uid, &form.code).await?;
    match result {
        LoginResult::Ok(user) => {
            session::clear_second_factor(&session).await?;
            session::begin(&session, &user).await?;
            Ok(Redirect::to(&next).into_response())
        }
        LoginResult::Locked(until) => {
            session::clear_second_factor(&session).await?;
            let csrf = session::csrf_token(&session).await?;
            Ok(fail(
                StatusCode::TOO_MANY_REQUESTS,
                &format!(
                    "Too many failed attempts: this account is locked until {}.",
                    until.format("%H:%M UTC")
                ),
                csrf,
            ))
        }
        _ => {
            let csrf = session::csrf_token(&session).await?;
            Ok(fail(
                StatusCode::UNAUTHORIZED,
                "That code is wrong or was used already.",
                csrf,
            ))
        }
    }
}

/// The session key of a secret being enrolled (hex), until its first code is typed.
const NEW_SECRET: &str = "totp_new";

#[derive(Template, WebTemplate)]
#[template(path = "account/two_factor.html")]
pub struct TwoFactorPage {
    layout: Layout,
    enrolled_at: Option<String>,
    sso: bool,
    /// The QR code (an SVG made by us) and the secret as text, for a new enrolment.
    qr_svg: String,
    secret_text: String,
    /// Shown once, right after enrolment.
    recovery_codes: Vec<String>,
    error: Option<String>,
    required: bool,
}

async fn enrolment_page(
    state: &AppState,
    session: &Session,
    user: CurrentUser,
    error: Option<String>,
) -> AppResult<TwoFactorPage> {
    let account = users::find(&state.db, user.id)
        .await?
        .ok_or(AppError::NotFound)?;
    let enrolled = totp::enrolment(&state.db, user.id).await?;
    let secret = match session
        .get::<String>(NEW_SECRET)
        .await
        .ok()
        .flatten()
        .and_then(|h| hex::decode(h).ok())
    {
        Some(s) => s,
        None => {
            let s = totp::new_secret();
            session
                .insert(NEW_SECRET, hex::encode(&s))
                .await
                .map_err(|e| AppError::Internal(anyhow::anyhow!("session store: {e}")))?;
            s
        }
    };
    let qr_svg =
        totp::qr_svg(&totp::otpauth_uri(&secret, &user.username)).map_err(AppError::Internal)?;
    Ok(TwoFactorPage {
        required: session::must_enrol(session).await?,
        layout: Layout::load(state, user, "account").await?,
        enrolled_at: enrolled.map(|e| e.enrolled_at.format("%Y-%m-%d %H:%M UTC").to_string()),
        sso: account.sso_provider.is_some(),
        qr_svg,
        secret_text: totp::base32(&secret),
        recovery_codes: vec![],
        error,
    })
}

/// `GET /account/two-factor`
pub async fn show_two_factor(
    State(state): State<AppState>,
    user: CurrentUser,
    session: Session,
) -> AppResult<TwoFactorPage> {
    enrolment_page(&state, &session, user, None).await
}

/// `POST /account/two-factor`: confirms the enrolment with a first code, stores
/// the secret and shows new recovery codes once.
pub async fn enrol_two_factor(
    State(state): State<AppState>,
    user: CurrentUser,
    session: Session,
    ctx: AuditCtx,
    Form(form): Form<CodeForm>,
) -> AppResult<Response> {
    let account = users::find(&state.db, user.id)
        .await?
        .ok_or(AppError::NotFound)?;
    let params = json!({ "username": user.username });
    if account.sso_provider.is_some() {
        return Err(AppError::BadRequest(
            "Your account signs in through an identity provider: set up a second factor there."
                .into(),
        ));
    }
    let secret = session
        .get::<String>(NEW_SECRET)
        .await
        .ok()
        .flatten()
        .and_then(|h| hex::decode(h).ok());
    let now = chrono::Utc::now().timestamp().max(0) as u64;
    let step = secret
        .as_ref()
        .and_then(|s| totp::check(s, &form.code, now, None));
    let (Some(secret), Some(step)) = (secret, step) else {
        audit::record(
            &state.db,
            &ctx,
            Entry::new("auth.2fa.enrol")
                .params(params)
                .failed("wrong confirmation code"),
        )
        .await?;
        let page = enrolment_page(
            &state,
            &session,
            user,
            Some("That code does not match: scan the code again and type the 6 digits your app shows now.".into()),
        )
        .await?;
        return Ok((StatusCode::BAD_REQUEST, page).into_response());
    };
    let codes = tokio::task::spawn_blocking(totp::new_recovery_codes)
        .await
        .map_err(|e| AppError::Internal(e.into()))?
        .map_err(AppError::Internal)?;
    let mut tx = state.db.begin().await?;
    totp::enrol(&mut *tx, user.id, &secret, step).await?;
    let hashes: Vec<String> = codes.iter().map(|(_, h)| h.clone()).collect();
    totp::replace_recovery_codes(&mut tx, user.id, &hashes).await?;
    audit::record(
        &mut *tx,
        &ctx,
        Entry::new("auth.2fa.enrol")
            .params(json!({ "username": user.username, "recovery_codes": codes.len() })),
    )
    .await?;
    tx.commit().await?;
    let _ = session.remove_value(NEW_SECRET).await;
    session::set_must_enrol(&session, false).await?;
    let mut page = enrolment_page(&state, &session, user, None).await?;
    page.recovery_codes = codes.into_iter().map(|(c, _)| c).collect();
    Ok(page.into_response())
}
