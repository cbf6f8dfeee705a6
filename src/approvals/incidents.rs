//! Incidents: approved destructive actions that ended `failed` (their execution
//! failed, or the job they handed off to failed, was interrupted or stopped), and
//! break-glass requests waiting for their review. Both keep a target red on the
//! overview until a person deals with them.
//!
//! The database opens an incident whenever a destructive request becomes
//! `failed`, whichever path wrote it (see the migration `..._incidents.sql`); this
//! module reads them and records their acknowledgement: by an approver (or
//! admin), with a note, once, in one transaction with its operations-log row.

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::{PgExecutor, PgPool};

use super::{ApprovalError, COLUMNS, Request};
use crate::{
    audit::{self, AuditCtx, Entry},
    auth::{CurrentUser, Role},
    state::AppState,
};

/// A row of `incidents`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Incident {
    pub id: i64,
    pub target: String,
    /// The request whose execution failed.
    pub approval_id: i64,
    /// The request's action kind (`restore.over`).
    pub action: String,
    /// The request's sentence of what would run.
    pub summary: String,
    pub error: String,
    /// The job the execution handed its work to, if any.
    pub job_id: Option<i64>,
    /// A backup taken just before (the safety backup of a restore): what to
    /// restore to get back to where things were.
    pub safety_backup_id: Option<i64>,
    pub failed_at: DateTime<Utc>,
    pub acknowledged_by_name: Option<String>,
    pub acknowledged_at: Option<DateTime<Utc>>,
    pub acknowledgement: Option<String>,
}

impl Incident {
    pub fn is_open(&self) -> bool {
        self.acknowledged_at.is_none()
    }
}

const INCIDENT_COLUMNS: &str = "id, target, approval_id, action, summary, error, job_id, safety_backup_id, \
                                failed_at, acknowledged_by_name, acknowledged_at, acknowledgement";

/// Unacknowledged incidents of every target, oldest first.
pub async fn open(db: &PgPool) -> Result<Vec<Incident>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {INCIDENT_COLUMNS} FROM incidents WHERE acknowledged_at IS NULL ORDER BY id"
    ))
    .fetch_all(db)
    .await
}

/// The incident a request's failure opened, if any.
pub async fn for_approval(
    db: impl PgExecutor<'_>,
    approval: i64,
) -> Result<Option<Incident>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {INCIDENT_COLUMNS} FROM incidents WHERE approval_id = $1"
    ))
    .bind(approval)
    .fetch_optional(db)
    .await
}

/// Break-glass requests nobody has reviewed yet, oldest first.
pub async fn unreviewed(db: &PgPool) -> Result<Vec<Request>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM approval_requests WHERE break_glass AND reviewed_by IS NULL ORDER BY id"
    ))
    .fetch_all(db)
    .await
}

/// Acknowledges an open incident with a note saying what was done about it.
/// Refused (and logged as denied) below approver, without a note, and for an
/// incident already acknowledged.
pub async fn acknowledge(
    state: &AppState,
    ctx: &AuditCtx,
    user: &CurrentUser,
    id: i64,
    note: &str,
) -> Result<Incident, ApprovalError> {
    let note = note.trim();
    let mut tx = state.db.begin().await?;
    let incident: Incident = sqlx::query_as(&format!(
        "SELECT {INCIDENT_COLUMNS} FROM incidents WHERE id = $1 FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(ApprovalError::NotFound)?;
    let entry = Entry::new("incident.acknowledged")
        .target(incident.target.clone())
        .approval(incident.approval_id)
        .params(json!({ "incident_id": id, "action": incident.action, "error": incident.error }));
    let refusal =
        if crate::auth::roles::role_on(state, user, &incident.target).await? < Role::Approver {
            Some(format!(
                "Only an approver or an admin can acknowledge a failure (an approver on {}).",
                incident.target
            ))
        } else if !incident.is_open() {
            Some(format!(
                "This failure was already acknowledged by {}.",
                incident
                    .acknowledged_by_name
                    .as_deref()
                    .unwrap_or("someone")
            ))
        } else if note.is_empty() {
            Some("Say what was done about it: the note is required.".to_string())
        } else if note.chars().count() > 2000 {
            Some("The note is too long (2,000 characters at most).".to_string())
        } else {
            None
        };
    if let Some(msg) = refusal {
        drop(tx);
        audit::record(&state.db, ctx, entry.denied(msg.clone())).await?;
        return Err(ApprovalError::Refused(msg));
    }
    let incident: Incident = sqlx::query_as(&format!(
        "UPDATE incidents SET acknowledged_by = $2, acknowledged_by_name = $3, acknowledged_at = now(),
                acknowledgement = $4
         WHERE id = $1 RETURNING {INCIDENT_COLUMNS}"
    ))
    .bind(id)
    .bind(user.id)
    .bind(&user.username)
    .bind(note)
    .fetch_one(&mut *tx)
    .await?;
    audit::record(&mut *tx, ctx, entry.result(json!({ "note": note }))).await?;
    tx.commit().await?;
    Ok(incident)
}
