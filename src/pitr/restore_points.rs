//! Named positions in a target's WAL (`pg_create_restore_point`), recorded in
//! `restore_points`: a recovery can stop exactly there. dbops makes one just
//! before every approved destructive action on an archived target (named
//! `dbops-op-<operation id>`), so "just before operation #N" is a recovery target
//! a person picks from the operations log.

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::PgPool;

use super::Lsn;
use crate::{
    approvals::ExecCtx,
    audit::{self, AuditCtx, Entry},
    state::AppState,
    targets::Target,
};

/// One restore point.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RestorePoint {
    pub id: i64,
    pub target: String,
    pub name: String,
    pub lsn: i64,
    pub timeline: Option<i32>,
    pub system_identifier: Option<String>,
    /// The operation it was made just before.
    pub operation_id: Option<i64>,
    /// That operation's kind (`restore.over`).
    pub action: Option<String>,
    pub created_by: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl RestorePoint {
    pub fn position(&self) -> Lsn {
        Lsn::from_i64(self.lsn)
    }
}

const COLUMNS: &str = "id, target, name, lsn, timeline, system_identifier, operation_id, action, created_by, created_at";

/// The name of the restore point made just before operation `id`.
pub fn name_for_operation(id: i64) -> String {
    format!("dbops-op-{id}")
}

/// Whether `name` can name a restore point: 1 to 63 printable characters, no
/// quotes or backslashes (it ends up in `recovery_target_name = '…'`).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_graphic() && c != '\'' && c != '"' && c != '\\')
}

/// Creates a restore point called `name` on `target`'s server and records it (and
/// a `pitr.restore_point` operation). `operation` and `action` say which
/// operation it was made before, when it was.
pub async fn create(
    state: &AppState,
    ctx: &AuditCtx,
    target: &Target,
    name: &str,
    operation: Option<(i64, &str)>,
) -> Result<RestorePoint, String> {
    let entry = Entry::new("pitr.restore_point")
        .target(target.name())
        .params(json!({ "name": name, "before_operation": operation.map(|o| o.0) }));
    let made = make(state, target, name).await;
    let (lsn, timeline, sysid) = match made {
        Ok(v) => v,
        Err(e) => {
            let _ = audit::record(&state.db, ctx, entry.failed(e.clone())).await;
            return Err(e);
        }
    };
    let mut tx = state.db.begin().await.map_err(|e| e.to_string())?;
    let point: RestorePoint = sqlx::query_as(&format!(
        "INSERT INTO restore_points (target, name, lsn, timeline, system_identifier, operation_id, action, created_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {COLUMNS}"
    ))
    .bind(target.name())
    .bind(name)
    .bind(lsn.as_i64())
    .bind(timeline)
    .bind(&sysid)
    .bind(operation.map(|o| o.0))
    .bind(operation.map(|o| o.1))
    .bind(ctx.actor.name.as_deref())
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| format!("could not record the restore point: {e}"))?;
    audit::record(
        &mut *tx,
        ctx,
        entry.result(
            json!({ "lsn": lsn.to_string(), "timeline": timeline, "restore_point": point.id }),
        ),
    )
    .await
    .map_err(|e| format!("could not write the operations log: {e}"))?;
    tx.commit().await.map_err(|e| e.to_string())?;
    Ok(point)
}

/// Asks the server for the restore point: its position, timeline and system
/// identifier.
async fn make(state: &AppState, target: &Target, name: &str) -> Result<(Lsn, i32, String), String> {
    if !valid_name(name) {
        return Err(format!(
            "`{name}` cannot name a restore point: use 1 to 63 printable characters without quotes or backslashes"
        ));
    }
    let pool = target.pg().await?;
    let lsn: String = sqlx::query_scalar("SELECT pg_create_restore_point($1)::text")
        .bind(name)
        .fetch_one(&pool)
        .await
        .map_err(|e| {
            let m = target.scrub(&e.to_string());
            if m.contains("permission denied") {
                format!(
                    "the target's role may not create restore points ({m}): GRANT EXECUTE ON FUNCTION pg_create_restore_point(text) TO the role, or use a superuser"
                )
            } else {
                format!("could not create the restore point: {m}")
            }
        })?;
    let lsn = Lsn::parse(&lsn)
        .ok_or_else(|| format!("the server answered a position dbops cannot read: {lsn}"))?;
    // The stream knows the server's identity and timeline; ask the server when
    // it has not started yet.
    let known: Option<(Option<String>, Option<i32>)> =
        sqlx::query_as("SELECT system_identifier, timeline FROM wal_streams WHERE target = $1")
            .bind(target.name())
            .fetch_optional(&state.db)
            .await
            .map_err(|e| e.to_string())?;
    if let Some((Some(sysid), Some(tli))) = known {
        return Ok((lsn, tli, sysid));
    }
    let (sysid, tli): (String, i32) = sqlx::query_as(
        "SELECT (SELECT system_identifier::text FROM pg_control_system()),
                (SELECT timeline_id FROM pg_control_checkpoint())",
    )
    .fetch_one(&pool)
    .await
    .map_err(|e| {
        format!(
            "could not read the server's identity: {}",
            target.scrub(&e.to_string())
        )
    })?;
    Ok((lsn, tli, sysid))
}

/// The hook run before every destructive action (see
/// [`crate::approvals::BeforeDestructive`]): a restore point named after the
/// action's operation, on PostgreSQL targets whose WAL dbops archives. A failure
/// is logged (as a failed `pitr.restore_point` operation) and does not stop the
/// action: its approval stands, and a time just before it can still be chosen.
pub async fn before_action(ctx: &ExecCtx, kind: &'static str) {
    let archived = ctx
        .target
        .config
        .archive
        .as_ref()
        .is_some_and(|a| a.enabled);
    if !archived {
        return;
    }
    let name = name_for_operation(ctx.operation);
    if let Err(e) = create(
        &ctx.state,
        &ctx.audit,
        &ctx.target,
        &name,
        Some((ctx.operation, kind)),
    )
    .await
    {
        tracing::warn!(target = ctx.target.name(), operation = ctx.operation, error = %e, "no restore point before a destructive action");
    }
}

/// A target's restore points, newest first.
pub async fn list(db: &PgPool, target: &str, limit: i64) -> Result<Vec<RestorePoint>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM restore_points WHERE target = $1 ORDER BY created_at DESC, id DESC LIMIT $2"
    ))
    .bind(target)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// The restore point made just before operation `operation`.
pub async fn before_operation(
    db: &PgPool,
    operation: i64,
) -> Result<Option<RestorePoint>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM restore_points WHERE operation_id = $1 ORDER BY id LIMIT 1"
    ))
    .bind(operation)
    .fetch_optional(db)
    .await
}

/// Which of `operations` have a restore point made just before them.
pub async fn operations_with_points(
    db: &PgPool,
    operations: &[i64],
) -> Result<std::collections::HashSet<i64>, sqlx::Error> {
    let ids: Vec<i64> = sqlx::query_scalar(
        "SELECT DISTINCT operation_id FROM restore_points WHERE operation_id = ANY($1)",
    )
    .bind(operations)
    .fetch_all(db)
    .await?;
    Ok(ids.into_iter().collect())
}

/// The restore point `name` of `target` (the newest, should a name repeat).
pub async fn find(
    db: &PgPool,
    target: &str,
    name: &str,
) -> Result<Option<RestorePoint>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM restore_points WHERE target = $1 AND name = $2 ORDER BY id DESC LIMIT 1"
    ))
    .bind(target)
    .bind(name)
    .fetch_optional(db)
    .await
}
