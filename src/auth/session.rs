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
    session
        .insert(CSRF, new_token())
        .await
        .map_err(session_err)?;
    Ok(())
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
