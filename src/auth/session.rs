//! The login session, stored by tower-sessions in the console's PostgreSQL (never
//! in a Redis that dbops manages: flushing it must not log everyone out).
//!
//! The session holds the user id, when the login happened (for the absolute
//! timeout), when the password was last changed (a reset ends older sessions) and
//! the CSRF token. The idle timeout is the session store's expiry.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tower_sessions::Session;

use super::{CurrentUser, users};
use crate::config::SessionSettings;

const USER_ID: &str = "uid";
const LOGIN_AT: &str = "login_at";
const PASSWORD_AT: &str = "pwd_at";
const CSRF: &str = "csrf";
/// The role at sign-in: a session ends when the user's role drops below it.
const ROLE: &str = "role";
/// The user's roles per target as last seen ([`super::roles::Roles`]): the session
/// ends when the role on any target drops below it.
const ROLES: &str = "roles";

fn session_err(e: tower_sessions::session::Error) -> anyhow::Error {
    anyhow::anyhow!("session store: {e}")
}

fn new_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// The session's CSRF token, created on first use.
pub async fn csrf_token(session: &Session) -> anyhow::Result<String> {
    if let Some(t) = session.get::<String>(CSRF).await.map_err(session_err)? {
        return Ok(t);
    }
    let t = new_token();
    session.insert(CSRF, &t).await.map_err(session_err)?;
    Ok(t)
}

/// The CSRF token if the session has one (never creates one).
pub async fn existing_csrf_token(session: &Session) -> anyhow::Result<Option<String>> {
    session.get::<String>(CSRF).await.map_err(session_err)
}

/// Starts a logged-in session: a new session id (so a planted id is worthless), a
/// new CSRF token, and the login time.
pub async fn begin(session: &Session, user: &users::User) -> anyhow::Result<()> {
    session.cycle_id().await.map_err(session_err)?;
    session
        .insert(USER_ID, user.id)
        .await
        .map_err(session_err)?;
    session
        .insert(LOGIN_AT, Utc::now().timestamp())
        .await
        .map_err(session_err)?;
    session
        .insert(PASSWORD_AT, user.password_changed_at.timestamp_micros())
        .await
        .map_err(session_err)?;
    session
        .insert(ROLE, user.role())
        .await
        .map_err(session_err)?;
    // Per-target roles are remembered at the first request (see `roles_dropped`);
    // never those of an earlier sign-in in this browser.
    session.remove_value(ROLES).await.map_err(session_err)?;
    session
        .insert(CSRF, new_token())
        .await
        .map_err(session_err)?;
    Ok(())
}

const SECOND_FACTOR_UID: &str = "2fa_uid";
const SECOND_FACTOR_NEXT: &str = "2fa_next";
const SECOND_FACTOR_AT: &str = "2fa_at";
const MUST_ENROL: &str = "must_enrol_2fa";
/// How long the second step of a sign-in may take.
const SECOND_FACTOR_SECONDS: i64 = 300;

/// Remembers a sign-in whose password was right and whose second factor is
/// still to come. Nobody is signed in yet; a new session id all the same.
pub async fn begin_second_factor(
    session: &Session,
    user_id: i64,
    next: &str,
) -> anyhow::Result<()> {
    session.cycle_id().await.map_err(session_err)?;
    session
        .insert(SECOND_FACTOR_UID, user_id)
        .await
        .map_err(session_err)?;
    session
        .insert(SECOND_FACTOR_NEXT, next)
        .await
        .map_err(session_err)?;
    session
        .insert(SECOND_FACTOR_AT, Utc::now().timestamp())
        .await
        .map_err(session_err)?;
    Ok(())
}

/// The user and the page to go to of a sign-in waiting for its second factor
/// (at most five minutes old).
pub async fn pending_second_factor(session: &Session) -> anyhow::Result<Option<(i64, String)>> {
    let uid = session
        .get::<i64>(SECOND_FACTOR_UID)
        .await
        .map_err(session_err)?;
    let at = session
        .get::<i64>(SECOND_FACTOR_AT)
        .await
        .map_err(session_err)?;
    let next = session
        .get::<String>(SECOND_FACTOR_NEXT)
        .await
        .map_err(session_err)?;
    Ok(match (uid, at) {
        (Some(uid), Some(at)) if Utc::now().timestamp() - at <= SECOND_FACTOR_SECONDS => {
            Some((uid, next.unwrap_or_else(|| "/".into())))
        }
        _ => None,
    })
}

pub async fn clear_second_factor(session: &Session) -> anyhow::Result<()> {
    for k in [SECOND_FACTOR_UID, SECOND_FACTOR_NEXT, SECOND_FACTOR_AT] {
        session.remove_value(k).await.map_err(session_err)?;
    }
    Ok(())
}

/// Marks (or clears) a session whose user must enrol a second factor before
/// anything else (`[sign_in] require_two_factor`); [`super::guard`] enforces it.
pub async fn set_must_enrol(session: &Session, must: bool) -> anyhow::Result<()> {
    if must {
        session
            .insert(MUST_ENROL, true)
            .await
            .map_err(session_err)?;
    } else {
        session
            .remove_value(MUST_ENROL)
            .await
            .map_err(session_err)?;
    }
    Ok(())
}

pub async fn must_enrol(session: &Session) -> anyhow::Result<bool> {
    Ok(session
        .get::<bool>(MUST_ENROL)
        .await
        .map_err(session_err)?
        .unwrap_or(false))
}

/// Compares the user's roles now with those this session last saw, on every
/// configured target and globally. Returns true when a role dropped (the caller
/// ends the session); otherwise remembers the roles now (a raise is kept, so that
/// a later drop from it ends the session too).
pub async fn roles_dropped<'a>(
    session: &Session,
    now: &super::roles::Roles,
    targets: impl IntoIterator<Item = (&'a str, crate::config::Policy)>,
) -> anyhow::Result<bool> {
    let before = session
        .get::<super::roles::Roles>(ROLES)
        .await
        .map_err(session_err)?;
    match before {
        Some(b) if now.dropped_from(&b, targets) => Ok(true),
        Some(b) if b == *now => Ok(false),
        _ => {
            session.insert(ROLES, now).await.map_err(session_err)?;
            Ok(false)
        }
    }
}

/// Ends the session: its row is deleted and the cookie cleared.
pub async fn end(session: &Session) -> anyhow::Result<()> {
    session.flush().await.map_err(session_err)
}

/// The user this session belongs to, if it is still valid: the user exists and is
/// enabled, the absolute timeout has not passed, and the password has not been
/// changed since login, and the role has not dropped. An invalid session is ended.
pub async fn current_user(
    db: &PgPool,
    settings: &SessionSettings,
    session: &Session,
) -> anyhow::Result<Option<CurrentUser>> {
    let Some(uid) = session.get::<i64>(USER_ID).await.map_err(session_err)? else {
        return Ok(None);
    };
    let login_at = session
        .get::<i64>(LOGIN_AT)
        .await
        .map_err(session_err)?
        .and_then(|t| DateTime::<Utc>::from_timestamp(t, 0));
    let pwd_at = session.get::<i64>(PASSWORD_AT).await.map_err(session_err)?;
    let role_at = session
        .get::<super::Role>(ROLE)
        .await
        .map_err(session_err)?;
    let user = users::find(db, uid).await?;
    let valid = match (&user, login_at) {
        (Some(u), Some(at)) => {
            !u.disabled
                && Utc::now() - at
                    < chrono::Duration::from_std(settings.absolute_timeout)
                        .unwrap_or(chrono::Duration::MAX)
                && pwd_at == Some(u.password_changed_at.timestamp_micros())
                // A role that dropped (an admin's change, or the provider's groups
                // at a sign-in elsewhere) ends the session; a raise does not.
                && role_at.is_none_or(|r| u.role() >= r)
        }
        _ => false,
    };
    match user {
        Some(u) if valid => Ok(Some(CurrentUser {
            id: u.id,
            role: u.role(),
            username: u.username,
            csrf_token: csrf_token(session).await?,
        })),
        _ => {
            end(session).await?;
            Ok(None)
        }
    }
}
