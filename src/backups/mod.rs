//! Backups (PRODUCT C4): PostgreSQL with `pg_dump`, Redis as an RDB snapshot or a
//! portable logical export; streamed to storage while hashed, committed under a
//! final name only when complete, verified, and only then listed as good.
//!
//! - [`run`]: requesting a backup (a row, an operation and a job in one
//!   transaction), its job's body, cancelling, and settling orphaned ones;
//! - [`redis_dump`]: the Redis export format (written here, read by restores);
//! - [`pins`]: what keeps a backup from deletion; [`actions`]: deleting one.
//!
//! Beside it: [`crate::pg_tools`] (the PostgreSQL client tools),
//! [`crate::storage`] (where artifacts live), [`crate::schedules`] (when backups
//! run and which are kept), [`crate::restores`] (putting them back).

pub mod actions;
pub mod pins;
pub mod redis_dump;
pub mod run;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgPool;

/// A row of `backups`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Backup {
    pub id: i64,
    pub target: String,
    pub method: String,
    pub format: String,
    pub options: Value,
    pub status: String,
    pub phase: Option<String>,
    pub trigger: String,
    pub requested_by_name: Option<String>,
    pub storage: String,
    pub storage_key: Option<String>,
    pub bytes: Option<i64>,
    pub sha256: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub progress_bytes: i64,
    pub progress_items: i64,
    pub error: Option<String>,
    pub verification: Option<Value>,
    pub tool_version: Option<String>,
    pub server_version: Option<String>,
    pub operation_id: Option<i64>,
    pub schedule_slot: Option<DateTime<Utc>>,
    pub deleted_at: Option<DateTime<Utc>>,
    /// A safety backup: the restore over a database it was taken before.
    pub safety_for_restore: Option<i64>,
    /// The job that takes it (rows from before backups ran as jobs have none).
    pub job_id: Option<i64>,
    /// Something keeps it from deletion now (see [`pins`]).
    pub pinned: bool,
    /// How dbops compressed the stored file (`zstd`); `None`: stored as the
    /// tool wrote it (every backup from before dbops compressed).
    pub compression: Option<String>,
    /// What the tool wrote, before dbops compressed it.
    pub raw_bytes: Option<i64>,
}

/// The row's columns; the phase and the progress are its job's
/// (the one place a running job writes them).
pub(crate) const COLUMNS: &str = "id, target, method, format, options, status, \
     (SELECT j.phase FROM jobs j WHERE j.id = backups.job_id) AS phase, trigger, requested_by_name, storage, \
     storage_key, bytes, sha256, created_at, started_at, finished_at, \
     coalesce((SELECT j.bytes FROM jobs j WHERE j.id = backups.job_id), progress_bytes) AS progress_bytes, \
     coalesce((SELECT j.done FROM jobs j WHERE j.id = backups.job_id), progress_items) AS progress_items, \
     error, verification, tool_version, server_version, operation_id, schedule_slot, deleted_at, safety_for_restore, \
     job_id, cardinality(backup_pin_reasons(id)) > 0 AS pinned, compression, raw_bytes";

impl Backup {
    pub fn is_active(&self) -> bool {
        matches!(self.status.as_str(), "queued" | "running")
    }

    /// Seconds from start to end (or to now while running).
    pub fn seconds(&self) -> Option<f64> {
        let start = self.started_at?;
        let end = self.finished_at.unwrap_or_else(Utc::now);
        Some((end - start).num_milliseconds() as f64 / 1000.0)
    }

    /// `12.3 s`, `4 min 5 s`.
    pub fn duration(&self) -> String {
        match self.seconds() {
            None => String::new(),
            Some(s) if s < 60.0 => format!("{s:.1} s"),
            Some(s) => format!("{} min {} s", (s / 60.0) as u64, (s % 60.0) as u64),
        }
    }

    /// Bytes per second so far.
    pub fn rate(&self) -> String {
        match self.seconds() {
            Some(s) if s > 0.5 => format!(
                "{}/s",
                crate::fmt::bytes((self.progress_bytes as f64 / s) as i64)
            ),
            _ => String::new(),
        }
    }

    /// Bytes written so far, for people.
    pub fn progress(&self) -> String {
        crate::fmt::bytes(self.progress_bytes)
    }

    pub fn size(&self) -> String {
        self.bytes.map(crate::fmt::bytes).unwrap_or_default()
    }

    /// The stored file as a tool reads it: decompressed on the fly when dbops
    /// compressed it (see [`crate::storage::compress`]).
    pub fn reader(
        &self,
        stored: std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>>,
    ) -> Result<std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>>, String> {
        crate::storage::compress::reader_for(stored, self.compression.as_deref())
    }

    /// `zstd 3.1×`: how the stored file is compressed, for pages.
    pub fn compression_label(&self) -> String {
        match (self.compression.as_deref(), self.raw_bytes, self.bytes) {
            (Some(c), Some(raw), Some(b)) if b > 0 => {
                format!("{c} {:.1}×", raw as f64 / b as f64)
            }
            (Some(c), _, _) => c.to_string(),
            (None, _, _) if self.method == "pg_dump" && self.format != "plain" => {
                "pg_dump (gzip)".into()
            }
            (None, _, _) => "none".into(),
        }
    }

    /// One line saying how to restore the downloaded file by hand.
    pub fn restore_by_hand(&self) -> Option<String> {
        let file = self.storage_key.as_deref()?.rsplit('/').next()?;
        crate::storage::compress::by_hand(&self.format, self.compression.as_deref(), file)
    }

    pub fn checksum_prefix(&self) -> String {
        self.sha256
            .as_deref()
            .map(|s| s.chars().take(12).collect())
            .unwrap_or_default()
    }

    /// A one-line summary of the verification, for tables.
    pub fn verified(&self) -> String {
        match &self.verification {
            Some(v) => {
                let method = v["method"].as_str().unwrap_or("verified");
                match v["entries"].as_u64() {
                    Some(n) if n > 0 => format!("{method} ({n} entries)"),
                    _ => method.to_string(),
                }
            }
            None => String::new(),
        }
    }
}

/// Why a backup could not be asked for.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0}")]
    Invalid(String),
    #[error("This scheduled run was already taken by another dbops process.")]
    AlreadyScheduled,
    #[error("{0}")]
    Internal(String),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

impl From<BackupError> for crate::error::AppError {
    fn from(e: BackupError) -> Self {
        use crate::error::AppError;
        match e {
            BackupError::Invalid(m) => AppError::BadRequest(m),
            BackupError::AlreadyScheduled => AppError::Conflict(e.to_string()),
            BackupError::Internal(m) => AppError::Internal(anyhow::anyhow!(m)),
            BackupError::Db(d) => d.into(),
        }
    }
}

pub async fn find(db: &PgPool, id: i64) -> Result<Option<Backup>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM backups WHERE id = $1"))
        .bind(id)
        .fetch_optional(db)
        .await
}

/// Newest first, optionally for one target and one status; at most `limit`.
pub async fn list(
    db: &PgPool,
    target: Option<&str>,
    status: Option<&str>,
    limit: i64,
) -> Result<Vec<Backup>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM backups WHERE ($1::text IS NULL OR target = $1) AND ($2::text IS NULL OR status = $2)
         ORDER BY id DESC LIMIT $3"
    ))
    .bind(target)
    .bind(status)
    .bind(limit.clamp(1, 1000))
    .fetch_all(db)
    .await
}

/// The newest good backup's finish time per target.
pub async fn newest_good(db: &PgPool) -> Result<Vec<(String, DateTime<Utc>)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT target, max(finished_at) FROM backups WHERE status = 'good' GROUP BY target",
    )
    .fetch_all(db)
    .await
}

/// The `backup_id` field of an action's form: a positive backup number.
pub(crate) fn backup_id_param(
    form: &std::collections::BTreeMap<String, String>,
) -> Result<i64, String> {
    form.get("backup_id")
        .and_then(|v| v.trim().parse::<i64>().ok())
        .filter(|id| *id > 0)
        .ok_or_else(|| "Say which backup: backup_id must be a backup number.".to_string())
}
