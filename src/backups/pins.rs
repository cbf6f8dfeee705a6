//! Pinned backups (issue 13): a backup that something still needs is never
//! deleted by retention, nor by an approved deletion.
//!
//! What pins a backup is defined once, in SQL (`backup_pin_reasons(id)`, see the
//! migration `20261203000001`): a person's "keep" (with a reason and an optional
//! expiry), an open or approved request naming it, a restore of it that is
//! running, or a restore it is the safety backup of while that restore runs or
//! its previous database is kept. Retention's and deletion's `UPDATE … SET
//! status = 'deleted'` carry the same condition, so a pin taken while retention
//! plans is still honoured.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::{PgExecutor, PgPool};

use crate::audit::{self, AuditCtx, Entry};

/// A person's pin on a backup.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Pin {
    pub id: i64,
    pub backup_id: i64,
    pub reason: String,
    pub pinned_by_name: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
}

impl Pin {
    pub fn expired(&self) -> bool {
        self.expires_at.is_some_and(|t| t <= Utc::now())
    }
}

/// Why a pin was refused.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// Why backup `id` must not be deleted now (empty: it may be).
pub async fn reasons(db: impl PgExecutor<'_>, id: i64) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT backup_pin_reasons($1)")
        .bind(id)
        .fetch_one(db)
        .await
}

/// The pinned backups of `target`, with why, for lists and retention.
pub async fn pinned_of_target(
    db: &PgPool,
    target: &str,
) -> Result<HashMap<i64, Vec<String>>, sqlx::Error> {
    let rows: Vec<(i64, Vec<String>)> = sqlx::query_as(
        "SELECT id, backup_pin_reasons(id) FROM backups WHERE target = $1 AND status = 'good'",
    )
    .bind(target)
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().filter(|(_, r)| !r.is_empty()).collect())
}

/// The people's pins of a backup that are not released (expired ones included,
/// marked), oldest first.
pub async fn of_backup(db: &PgPool, id: i64) -> Result<Vec<Pin>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, backup_id, reason, pinned_by_name, created_at, expires_at FROM backup_pins
         WHERE backup_id = $1 AND released_at IS NULL ORDER BY id",
    )
    .bind(id)
    .fetch_all(db)
    .await
}

/// Pins backup `id` ("keep"), with a reason and an optional expiry; logged as
/// `backup.pin`. Returns the pin's id.
pub async fn pin(
    db: &PgPool,
    ctx: &AuditCtx,
    id: i64,
    reason: &str,
    expires_at: Option<DateTime<Utc>>,
) -> Result<i64, PinError> {
    let reason = reason.trim();
    let params = json!({ "backup_id": id, "reason": reason, "expires_at": expires_at });
    let refuse = |msg: String| async {
        audit::record(
            db,
            ctx,
            Entry::new("backup.pin")
                .params(params.clone())
                .failed(msg.clone()),
        )
        .await?;
        Err::<i64, _>(PinError::Refused(msg))
    };
    if reason.is_empty() {
        return refuse("Say why this backup is kept: the reason is required.".into()).await;
    }
    if reason.chars().count() > 2000 {
        return refuse("The reason is too long (2,000 characters at most).".into()).await;
    }
    if expires_at.is_some_and(|t| t <= Utc::now()) {
        return refuse("The expiry is in the past: choose a later date, or none.".into()).await;
    }
    let mut tx = db.begin().await?;
    let target: Option<(String, String)> =
        sqlx::query_as("SELECT target, status FROM backups WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some((target, status)) = target else {
        drop(tx);
        return refuse(format!("There is no backup #{id}.")).await;
    };
    if !matches!(status.as_str(), "good" | "queued" | "running") {
        drop(tx);
        return refuse(format!(
            "Backup #{id} is {status}: only a good (or running) backup can be kept."
        ))
        .await;
    }
    let pin = insert(&mut tx, ctx, id, reason, expires_at).await?;
    audit::record(
        &mut *tx,
        ctx,
        Entry::new("backup.pin")
            .target(target)
            .params(params)
            .result(json!({ "pin_id": pin })),
    )
    .await?;
    tx.commit().await?;
    Ok(pin)
}

/// The pin row alone, in the caller's transaction (a backup taken pinned).
pub async fn insert(
    tx: &mut sqlx::PgConnection,
    ctx: &AuditCtx,
    id: i64,
    reason: &str,
    expires_at: Option<DateTime<Utc>>,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO backup_pins (backup_id, reason, pinned_by, pinned_by_name, expires_at)
         VALUES ($1, $2, $3, $4, $5) RETURNING id",
    )
    .bind(id)
    .bind(reason)
    .bind(ctx.actor.id)
    .bind(ctx.actor.name.clone().unwrap_or_else(|| "dbops".into()))
    .bind(expires_at)
    .fetch_one(&mut *tx)
    .await
}

/// Releases pin `pin` of backup `id`; logged as `backup.unpin`.
pub async fn release(db: &PgPool, ctx: &AuditCtx, id: i64, pin: i64) -> Result<(), PinError> {
    let mut tx = db.begin().await?;
    let released: Option<String> = sqlx::query_scalar(
        "UPDATE backup_pins p SET released_at = now(), released_by_name = $3
         FROM backups b WHERE p.id = $2 AND p.backup_id = $1 AND b.id = p.backup_id AND p.released_at IS NULL
         RETURNING b.target",
    )
    .bind(id)
    .bind(pin)
    .bind(ctx.actor.name.clone().unwrap_or_else(|| "dbops".into()))
    .fetch_optional(&mut *tx)
    .await?;
    let entry = Entry::new("backup.unpin").params(json!({ "backup_id": id, "pin_id": pin }));
    let Some(target) = released else {
        drop(tx);
        let msg = format!("Backup #{id} has no such pin (it was released already?).");
        audit::record(db, ctx, entry.failed(msg.clone())).await?;
        return Err(PinError::Refused(msg));
    };
    audit::record(&mut *tx, ctx, entry.target(target)).await?;
    tx.commit().await?;
    Ok(())
}

/// Marks backup `id` deleted — only if it is good and nothing pins it — in the
/// caller's transaction; `Err` with the reasons when something does. The file
/// is removed by the caller after the commit.
pub async fn mark_deleted(
    tx: &mut sqlx::PgConnection,
    id: i64,
    by: &str,
) -> Result<Result<(), Vec<String>>, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE backups SET status = 'deleted', deleted_at = now(), deleted_by_name = $2
         WHERE id = $1 AND status = 'good' AND cardinality(backup_pin_reasons(id)) = 0",
    )
    .bind(id)
    .bind(by)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if done == 1 {
        return Ok(Ok(()));
    }
    let why = reasons(&mut *tx, id).await?;
    Ok(Err(if why.is_empty() {
        vec!["it is not good any more".into()]
    } else {
        why
    }))
}
