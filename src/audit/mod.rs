//! The operations log: one append-only, hash-chained table in the console database
//! that records every operation — who, what, on which target, with which parameters
//! (secrets redacted), when, the outcome, the error and the result.
//!
//! [`record`] writes a finished operation; [`start`] and [`finish`] bracket a long one
//! so that a crash leaves a visible `running`/`interrupted` row, never silence. The
//! database refuses UPDATE of finished rows and any DELETE (see the migration), and
//! computes the hash chain itself; [`verify`] proves the chain is whole.

pub mod checkpoint;
mod query;
mod verify;

pub use query::{
    Filter, OperationRow, Page, csv_cell, details_role, details_visible, find, for_approval,
    hidden_marker, list, stream_csv,
};
pub use verify::{VerifyReport, verify};

use serde_json::Value;
use sqlx::PgExecutor;

use crate::auth::{CurrentUser, Role};

/// How an operation ended (or that it has not yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Running,
    Succeeded,
    Failed,
    Denied,
    Interrupted,
    Cancelled,
}

impl Outcome {
    pub const FINAL: [Outcome; 5] = [
        Outcome::Succeeded,
        Outcome::Failed,
        Outcome::Denied,
        Outcome::Interrupted,
        Outcome::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Running => "running",
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::Denied => "denied",
            Outcome::Interrupted => "interrupted",
            Outcome::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Outcome> {
        std::iter::once(Outcome::Running)
            .chain(Outcome::FINAL)
            .find(|o| o.as_str() == s)
    }
}

/// Who did something, as it was at the time (names are copied into the row so
/// that renaming or removing a user never rewrites history).
#[derive(Debug, Clone, Default)]
pub struct Actor {
    pub id: Option<i64>,
    pub name: Option<String>,
    pub role: Option<Role>,
}

impl Actor {
    pub fn user(u: &CurrentUser) -> Actor {
        Actor {
            id: Some(u.id),
            name: Some(u.username.clone()),
            role: Some(u.role),
        }
    }

    /// A person at the command line (`dbops user add`, `dbops audit verify`).
    pub fn cli() -> Actor {
        let os_user = std::env::var("SUDO_USER")
            .or_else(|_| std::env::var("USER"))
            .ok()
            .filter(|u| !u.is_empty())
            .or_else(os_user_name)
            .unwrap_or_else(|| format!("uid{}", unsafe_free_uid()));
        Actor {
            id: None,
            name: Some(format!("cli:{os_user}")),
            role: None,
        }
    }

    /// dbops itself (schedules, start-up recovery).
    pub fn system() -> Actor {
        Actor {
            id: None,
            name: Some("dbops".into()),
            role: None,
        }
    }
}

fn unsafe_free_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The name of the effective user from the password database.
fn os_user_name() -> Option<String> {
    let uid = unsafe_free_uid();
    std::fs::read_to_string("/etc/passwd")
        .ok()?
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            (f.nth(1)?.parse::<u32>().ok()? == uid).then(|| name.to_string())
        })
}

/// Where a request came from; put into every request's extensions by the web layer.
#[derive(Debug, Clone, Default)]
pub struct RequestMeta {
    pub request_id: Option<String>,
    pub client_addr: Option<String>,
}

/// Everything about the caller that goes into an operations row.
#[derive(Debug, Clone, Default)]
pub struct AuditCtx {
    pub actor: Actor,
    pub meta: RequestMeta,
}

impl AuditCtx {
    pub fn cli() -> AuditCtx {
        AuditCtx {
            actor: Actor::cli(),
            meta: RequestMeta::default(),
        }
    }

    pub fn system() -> AuditCtx {
        AuditCtx {
            actor: Actor::system(),
            meta: RequestMeta::default(),
        }
    }

    /// The same request, now known to be made by `user`.
    pub fn with_user(&self, user: &CurrentUser) -> AuditCtx {
        AuditCtx {
            actor: Actor::user(user),
            meta: self.meta.clone(),
        }
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for AuditCtx {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        let meta = parts
            .extensions
            .get::<RequestMeta>()
            .cloned()
            .unwrap_or_default();
        let actor = match (
            parts.extensions.get::<CurrentUser>(),
            parts.extensions.get::<crate::auth::tokens::ApiClient>(),
        ) {
            (Some(u), _) => Actor::user(u),
            (None, Some(c)) => Actor {
                id: None,
                name: Some(format!("token:{}", c.name)),
                role: None,
            },
            (None, None) => Actor::default(),
        };
        Ok(AuditCtx { actor, meta })
    }
}

/// One operation to write down.
#[derive(Debug, Clone)]
pub struct Entry {
    pub kind: &'static str,
    pub target: Option<String>,
    pub params: Value,
    pub outcome: Outcome,
    pub error: Option<String>,
    pub result: Option<Value>,
    pub approval_id: Option<i64>,
}

impl Entry {
    /// A succeeded operation of this dotted kind (`backup.create`, `auth.login`).
    pub fn new(kind: &'static str) -> Entry {
        Entry {
            kind,
            target: None,
            params: Value::Object(Default::default()),
            outcome: Outcome::Succeeded,
            error: None,
            result: None,
            approval_id: None,
        }
    }

    pub fn target(mut self, target: impl Into<String>) -> Entry {
        self.target = Some(target.into());
        self
    }

    /// The parameters; keys that look like secrets are redacted before writing.
    pub fn params(mut self, params: Value) -> Entry {
        self.params = params;
        self
    }

    pub fn result(mut self, result: Value) -> Entry {
        self.result = Some(result);
        self
    }

    pub fn outcome(mut self, outcome: Outcome) -> Entry {
        self.outcome = outcome;
        self
    }

    pub fn failed(mut self, error: impl Into<String>) -> Entry {
        self.outcome = Outcome::Failed;
        self.error = Some(error.into());
        self
    }

    pub fn denied(mut self, reason: impl Into<String>) -> Entry {
        self.outcome = Outcome::Denied;
        self.error = Some(reason.into());
        self
    }

    pub fn approval(mut self, approval_id: i64) -> Entry {
        self.approval_id = Some(approval_id);
        self
    }
}

/// Keys whose values never go into the log.
const SECRET_KEYS: [&str; 8] = [
    "password",
    "passwd",
    "secret",
    "token",
    "csrf_token",
    "url",
    "dsn",
    "api_key",
];

/// Replaces the values of secret-looking keys, at any depth, with `"[redacted]"`.
pub fn redact(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let lower = k.to_ascii_lowercase();
                    if SECRET_KEYS.iter().any(|s| lower.contains(s)) {
                        (k, Value::String("[redacted]".into()))
                    } else {
                        (k, redact(v))
                    }
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(redact).collect()),
        other => other,
    }
}

/// Writes one operation (finished, or `running` when its outcome is
/// [`Outcome::Running`]) and returns its id. Pass a transaction to write it together
/// with the change it records.
pub async fn record(
    db: impl PgExecutor<'_>,
    ctx: &AuditCtx,
    entry: Entry,
) -> Result<i64, sqlx::Error> {
    let ended = entry.outcome != Outcome::Running;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO operations (request_id, actor_id, actor_name, actor_role, kind, target, params,
                                 ended_at, outcome, error, result, approval_id, client_addr)
         VALUES ($1, $2, $3, $4, $5, $6, $7,
                 CASE WHEN $8 THEN clock_timestamp() END, $9, $10, $11, $12, $13)
         RETURNING id",
    )
    .bind(&ctx.meta.request_id)
    .bind(ctx.actor.id)
    .bind(&ctx.actor.name)
    .bind(ctx.actor.role.map(Role::as_str))
    .bind(entry.kind)
    .bind(&entry.target)
    .bind(redact(entry.params))
    .bind(ended)
    .bind(entry.outcome.as_str())
    .bind(&entry.error)
    .bind(entry.result.map(redact))
    .bind(entry.approval_id)
    .bind(&ctx.meta.client_addr)
    .fetch_one(db)
    .await?;
    if ended {
        count(entry.kind, entry.outcome);
    }
    tracing::info!(
        operation_id = id,
        kind = entry.kind,
        target = entry.target.as_deref(),
        outcome = entry.outcome.as_str(),
        actor = ctx.actor.name.as_deref(),
        "operation recorded"
    );
    Ok(id)
}

/// Writes a `running` operation; call [`finish`] when it ends.
pub async fn start(
    db: impl PgExecutor<'_>,
    ctx: &AuditCtx,
    entry: Entry,
) -> Result<i64, sqlx::Error> {
    record(db, ctx, entry.outcome(Outcome::Running)).await
}

/// Records how a running operation ended. Refused by the database if it already
/// ended.
pub async fn finish(
    db: impl PgExecutor<'_>,
    id: i64,
    outcome: Outcome,
    error: Option<&str>,
    result: Option<Value>,
) -> Result<(), sqlx::Error> {
    let kind: String = sqlx::query_scalar(
        "UPDATE operations SET outcome = $2, ended_at = clock_timestamp(), error = $3, result = $4
         WHERE id = $1 RETURNING kind",
    )
    .bind(id)
    .bind(outcome.as_str())
    .bind(error)
    .bind(result.map(redact))
    .fetch_one(db)
    .await?;
    metrics::counter!("dbops_operations_total", "kind" => kind, "outcome" => outcome.as_str())
        .increment(1);
    Ok(())
}

fn count(kind: &'static str, outcome: Outcome) {
    metrics::counter!("dbops_operations_total", "kind" => kind, "outcome" => outcome.as_str())
        .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn secrets_are_redacted_at_any_depth() {
        let v = redact(
            json!({"username": "bob", "password": "x", "nested": {"api_token": "y", "url_env": "Z"}, "list": [{"secret": 1}]}),
        );
        assert_eq!(v["username"], "bob");
        assert_eq!(v["password"], "[redacted]");
        assert_eq!(v["nested"]["api_token"], "[redacted]");
        assert_eq!(v["list"][0]["secret"], "[redacted]");
        assert!(!v.to_string().contains("\"x\""));
    }
}
