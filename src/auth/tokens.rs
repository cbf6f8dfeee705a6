//! API tokens for pipelines (`Authorization: Bearer dbops_…`): created by admins,
//! shown once, stored as SHA-256, scoped (`backup:create`, `backup:read`,
//! `migrations:deploy`) and optionally limited to some targets.

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::{PgExecutor, PgPool};

/// The scopes a token can have.
pub const SCOPES: [&str; 4] = [
    "backup:create",
    "backup:read",
    "migrations:deploy",
    "windows:run",
];

/// A caller authenticated by a token; put into the request's extensions.
#[derive(Debug, Clone)]
pub struct ApiClient {
    pub token_id: i64,
    pub name: String,
    pub scopes: Vec<String>,
    /// `None`: every target.
    pub targets: Option<Vec<String>>,
}

impl ApiClient {
    pub fn may_use(&self, target: &str) -> bool {
        self.targets
            .as_ref()
            .is_none_or(|t| t.iter().any(|x| x == target))
    }
}

/// A row of `api_tokens` (without the hash).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Token {
    pub id: i64,
    pub name: String,
    pub prefix: String,
    pub scopes: Vec<String>,
    pub targets: Option<Vec<String>>,
    pub created_by_name: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

fn hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// Makes a new token; returns its id and the secret (shown once, never stored).
pub async fn create(
    db: impl PgExecutor<'_>,
    name: &str,
    scopes: &[String],
    targets: Option<&[String]>,
    created_by: (i64, &str),
) -> Result<(i64, String), sqlx::Error> {
    use rand::RngCore;
    let mut raw = [0u8; 24];
    rand::rng().fill_bytes(&mut raw);
    let secret = format!("dbops_{}", hex::encode(raw));
    let id = sqlx::query_scalar(
        "INSERT INTO api_tokens (name, token_hash, prefix, scopes, targets, created_by, created_by_name)
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
    )
    .bind(name)
    .bind(hash(&secret))
    .bind(&secret[..12])
    .bind(scopes)
    .bind(targets)
    .bind(created_by.0)
    .bind(created_by.1)
    .fetch_one(db)
    .await?;
    Ok((id, secret))
}

pub async fn list(db: &PgPool) -> Result<Vec<Token>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, name, prefix, scopes, targets, created_by_name, created_at, last_used_at, revoked_at
         FROM api_tokens ORDER BY id DESC",
    )
    .fetch_all(db)
    .await
}

pub async fn revoke(db: impl PgExecutor<'_>, id: i64) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE api_tokens SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL",
    )
    .bind(id)
    .execute(db)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// The user who made token `id`, as the approvals code takes them: a
/// pipeline's maintenance window is owned (and its approvals requested) by them.
pub async fn creator(db: &PgPool, id: i64) -> Result<Option<super::CurrentUser>, sqlx::Error> {
    let row: Option<(i64, String, String)> = sqlx::query_as(
        "SELECT u.id, u.username, u.role FROM api_tokens t JOIN users u ON u.id = t.created_by
         WHERE t.id = $1 AND NOT u.disabled",
    )
    .bind(id)
    .fetch_optional(db)
    .await?;
    Ok(row.map(|(id, username, role)| super::CurrentUser {
        id,
        username,
        role: super::Role::parse(&role).unwrap_or(super::Role::Viewer),
        csrf_token: String::new(),
    }))
}

/// The client a bearer token belongs to, if the token is valid and has `scope`.
pub async fn authenticate(
    db: &PgPool,
    token: &str,
    scope: &str,
) -> Result<Option<ApiClient>, sqlx::Error> {
    type Row = (i64, String, Vec<String>, Option<Vec<String>>);
    let row: Option<Row> = sqlx::query_as(
        "UPDATE api_tokens SET last_used_at = now()
         WHERE token_hash = $1 AND revoked_at IS NULL AND $2 = ANY(scopes)
         RETURNING id, name, scopes, targets",
    )
    .bind(hash(token))
    .bind(scope)
    .fetch_optional(db)
    .await?;
    Ok(row.map(|(token_id, name, scopes, targets)| ApiClient {
        token_id,
        name,
        scopes,
        targets,
    }))
}
