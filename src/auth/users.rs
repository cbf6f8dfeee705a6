//! The `users` table: local accounts with argon2id hashes. All SQL about users
//! lives here; callers own the transaction.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

use super::Role;

/// A username that passed [`Username::parse`]: 1-64 characters of letters, digits,
/// `.`, `_`, `@` and `-`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Username(String);

impl Username {
    pub fn parse(s: &str) -> Result<Username, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("The username is empty.".into());
        }
        if s.len() > 64 {
            return Err("The username must be at most 64 characters long.".into());
        }
        if !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '-'))
        {
            return Err(
                "The username may contain only letters, digits and the characters . _ @ -".into(),
            );
        }
        Ok(Username(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A row of `users`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct User {
    pub id: i64,
    pub username: String,
    pub password_hash: String,
    pub role: String,
    pub disabled: bool,
    pub failed_logins: i32,
    pub locked_until: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub password_changed_at: DateTime<Utc>,
    pub last_login_at: Option<DateTime<Utc>>,
    /// The OpenID provider this user signs in with (`None`: a local account).
    pub sso_provider: Option<String>,
    /// Which mapping gave the role at the last sign-in through a provider.
    pub role_granted_by: Option<String>,
}

impl User {
    /// The role; an unknown value in the table (impossible by its CHECK) reads as viewer.
    pub fn role(&self) -> Role {
        Role::parse(&self.role).unwrap_or(Role::Viewer)
    }

    pub fn locked_now(&self) -> bool {
        self.locked_until.is_some_and(|t| t > Utc::now())
    }
}

const COLUMNS: &str = "id, username, password_hash, role, disabled, failed_logins, locked_until, \
                       created_at, password_changed_at, last_login_at, sso_provider, role_granted_by";

/// Why a user change was refused.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("A user called {0} already exists.")]
    UsernameTaken(String),
    #[error("There is no such user.")]
    NotFound,
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

pub async fn find_by_username(
    db: impl PgExecutor<'_>,
    username: &str,
) -> Result<Option<User>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM users WHERE lower(username) = lower($1)"
    ))
    .bind(username)
    .fetch_optional(db)
    .await
}

pub async fn find(db: impl PgExecutor<'_>, id: i64) -> Result<Option<User>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM users WHERE id = $1"))
        .bind(id)
        .fetch_optional(db)
        .await
}

pub async fn list(db: impl PgExecutor<'_>) -> Result<Vec<User>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM users ORDER BY lower(username)"
    ))
    .fetch_all(db)
    .await
}

/// Creates a user; the password must already be hashed.
pub async fn create(
    db: impl PgExecutor<'_>,
    username: &Username,
    password_hash: &str,
    role: Role,
) -> Result<i64, UserError> {
    sqlx::query_scalar(
        "INSERT INTO users (username, password_hash, role) VALUES ($1, $2, $3) RETURNING id",
    )
    .bind(username.as_str())
    .bind(password_hash)
    .bind(role.as_str())
    .fetch_one(db)
    .await
    .map_err(|e| match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => {
            UserError::UsernameTaken(username.as_str().to_string())
        }
        _ => UserError::Db(e),
    })
}

fn one(rows: u64) -> Result<(), UserError> {
    if rows == 1 {
        Ok(())
    } else {
        Err(UserError::NotFound)
    }
}

pub async fn set_disabled(
    db: impl PgExecutor<'_>,
    id: i64,
    disabled: bool,
) -> Result<(), UserError> {
    let r = sqlx::query("UPDATE users SET disabled = $2, updated_at = now() WHERE id = $1")
        .bind(id)
        .bind(disabled)
        .execute(db)
        .await?;
    one(r.rows_affected())
}

pub async fn set_role(db: impl PgExecutor<'_>, id: i64, role: Role) -> Result<(), UserError> {
    let r = sqlx::query(
        "UPDATE users SET role = $2, role_granted_by = NULL, updated_at = now() WHERE id = $1",
    )
    .bind(id)
    .bind(role.as_str())
    .execute(db)
    .await?;
    one(r.rows_affected())
}

/// Sets a new password hash and lifts any lockout. Sessions started before this
/// moment end at their next request (see [`super::session`]).
pub async fn set_password(
    db: impl PgExecutor<'_>,
    id: i64,
    password_hash: &str,
) -> Result<(), UserError> {
    let r = sqlx::query(
        "UPDATE users SET password_hash = $2, password_changed_at = clock_timestamp(),
                failed_logins = 0, locked_until = NULL, updated_at = now()
         WHERE id = $1",
    )
    .bind(id)
    .bind(password_hash)
    .execute(db)
    .await?;
    one(r.rows_affected())
}

/// The user linked to this provider's subject.
pub async fn find_by_identity(
    db: impl PgExecutor<'_>,
    provider: &str,
    subject: &str,
) -> Result<Option<User>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM users WHERE sso_provider = $1 AND sso_subject = $2"
    ))
    .bind(provider)
    .bind(subject)
    .fetch_optional(db)
    .await
}

/// Creates a user for a first sign-in through a provider. It has no password
/// (`'!'` is no argon2 hash, so no password matches it).
pub async fn create_sso(
    db: impl PgExecutor<'_>,
    username: &str,
    role: Role,
    provider: &str,
    subject: &str,
    granted_by: &str,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO users (username, password_hash, role, sso_provider, sso_subject, role_granted_by)
         VALUES ($1, '!', $2, $3, $4, $5) RETURNING id",
    )
    .bind(username)
    .bind(role.as_str())
    .bind(provider)
    .bind(subject)
    .bind(granted_by)
    .fetch_one(db)
    .await
}

/// Sets the role a provider's mapping gave at sign-in, and which mapping it was.
pub async fn set_sso_role(
    db: impl PgExecutor<'_>,
    id: i64,
    role: Role,
    granted_by: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE users SET role = $2, role_granted_by = $3, updated_at = now() WHERE id = $1",
    )
    .bind(id)
    .bind(role.as_str())
    .bind(granted_by)
    .execute(db)
    .await?;
    Ok(())
}

/// Who may sign in with a password (`console_settings.password_sign_in`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordSignIn {
    Everyone,
    /// Only local admins: the break-glass accounts once everyone else uses a provider.
    AdminsOnly,
}

impl PasswordSignIn {
    pub fn as_str(self) -> &'static str {
        match self {
            PasswordSignIn::Everyone => "everyone",
            PasswordSignIn::AdminsOnly => "admins",
        }
    }
    pub fn parse(s: &str) -> Option<PasswordSignIn> {
        match s {
            "everyone" => Some(PasswordSignIn::Everyone),
            "admins" => Some(PasswordSignIn::AdminsOnly),
            _ => None,
        }
    }
}

pub async fn password_sign_in(db: impl PgExecutor<'_>) -> Result<PasswordSignIn, sqlx::Error> {
    let v: Option<String> =
        sqlx::query_scalar("SELECT value FROM console_settings WHERE key = 'password_sign_in'")
            .fetch_optional(db)
            .await?;
    Ok(v.as_deref()
        .and_then(PasswordSignIn::parse)
        .unwrap_or(PasswordSignIn::Everyone))
}

pub async fn set_password_sign_in(
    db: impl PgExecutor<'_>,
    value: PasswordSignIn,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO console_settings (key, value) VALUES ('password_sign_in', $1)
         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = now()",
    )
    .bind(value.as_str())
    .execute(db)
    .await?;
    Ok(())
}

/// Admins that can still log in, other than `except`.
pub async fn count_other_active_admins(
    db: impl PgExecutor<'_>,
    except: i64,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM users WHERE role = 'admin' AND NOT disabled AND id <> $1",
    )
    .bind(except)
    .fetch_one(db)
    .await
}

/// Counts a failed login, atomically; locks the account for `lock_for` when the
/// count reaches `max_failures`. A count left over from an expired lock restarts.
/// Returns the new count and the lock, if one is now in force.
pub async fn record_failed_login(
    db: impl PgExecutor<'_>,
    id: i64,
    max_failures: u32,
    lock_for: std::time::Duration,
) -> Result<(i32, Option<DateTime<Utc>>), sqlx::Error> {
    sqlx::query_as(
        "WITH n AS (
             SELECT CASE WHEN locked_until IS NOT NULL AND locked_until <= now() THEN 1
                         ELSE failed_logins + 1 END AS failures
             FROM users WHERE id = $1 FOR UPDATE
         )
         UPDATE users u SET failed_logins = n.failures,
                locked_until = CASE WHEN n.failures >= $2 THEN now() + make_interval(secs => $3)
                                    WHEN u.locked_until <= now() THEN NULL
                                    ELSE u.locked_until END
         FROM n WHERE u.id = $1
         RETURNING u.failed_logins, u.locked_until",
    )
    .bind(id)
    .bind(max_failures as i32)
    .bind(lock_for.as_secs_f64())
    .fetch_one(db)
    .await
}

/// The lock in force on a name that has no account, if any (see
/// [`record_unknown_failure`]).
pub async fn unknown_name_lock(
    db: impl PgExecutor<'_>,
    name: &str,
) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT locked_until FROM login_failures WHERE name = lower($1) AND locked_until > now()",
    )
    .bind(name)
    .fetch_optional(db)
    .await
    .map(Option::flatten)
}

/// Counts a failed login for a name that has no account exactly as
/// [`record_failed_login`] counts one for an account (keyed by the lowercased
/// name), so that an unknown name locks after the same number of failures.
/// Returns the new count and the lock, if one is now in force.
pub async fn record_unknown_failure(
    db: impl PgExecutor<'_>,
    name: &str,
    max_failures: u32,
    lock_for: std::time::Duration,
) -> Result<(i32, Option<DateTime<Utc>>), sqlx::Error> {
    sqlx::query_as(
        "WITH old AS (SELECT failures, locked_until FROM login_failures WHERE name = lower($1)),
              n AS (
                  SELECT CASE WHEN old.locked_until IS NOT NULL AND old.locked_until <= now() THEN 1
                              ELSE coalesce(old.failures, 0) + 1 END AS failures,
                         old.locked_until AS locked_until
                  FROM (SELECT 1) one LEFT JOIN old ON true
              )
         INSERT INTO login_failures AS f (name, failures, locked_until, last_failed_at)
         SELECT lower($1), n.failures,
                CASE WHEN n.failures >= $2 THEN now() + make_interval(secs => $3)
                     WHEN n.locked_until <= now() THEN NULL
                     ELSE n.locked_until END,
                now()
         FROM n
         ON CONFLICT (name) DO UPDATE SET failures = EXCLUDED.failures,
                locked_until = EXCLUDED.locked_until, last_failed_at = EXCLUDED.last_failed_at
         RETURNING f.failures, f.locked_until",
    )
    .bind(name)
    .bind(max_failures as i32)
    .bind(lock_for.as_secs_f64())
    .fetch_one(db)
    .await
}

/// Keeps `login_failures` bounded: forgets names not failed for 30 days and
/// keeps the newest 10,000.
pub async fn prune_unknown_failures(db: impl PgExecutor<'_>) -> Result<u64, sqlx::Error> {
    sqlx::query(
        "DELETE FROM login_failures
         WHERE last_failed_at < now() - interval '30 days'
            OR name IN (SELECT name FROM login_failures ORDER BY last_failed_at DESC OFFSET 10000)",
    )
    .execute(db)
    .await
    .map(|r| r.rows_affected())
}

/// Clears failures after a successful login.
pub async fn record_login(db: impl PgExecutor<'_>, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE users SET failed_logins = 0, locked_until = NULL, last_login_at = now() WHERE id = $1",
    )
    .bind(id)
    .execute(db)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Username;

    #[test]
    fn usernames_are_checked() {
        assert!(Username::parse("alice.smith@ops").is_ok());
        assert!(Username::parse("").is_err());
        assert!(Username::parse("<script>").is_err());
        assert!(Username::parse(&"a".repeat(65)).is_err());
    }
}
