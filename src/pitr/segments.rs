//! The stored WAL of an archived target: what is there (`wal_segments`, and the
//! snapshot of the segment being written in `wal_streams`), where it has gaps,
//! and one file fetched back whole and checked, as a recovery's
//! `restore_command` needs it.

use std::path::Path;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use tokio::io::AsyncWriteExt;

use super::{Lsn, WalFile};
use crate::state::AppState;

/// One stored WAL file.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Segment {
    pub id: i64,
    pub target: String,
    pub system_identifier: String,
    pub timeline: i32,
    pub file_name: String,
    /// `segment` or `history`.
    pub kind: String,
    pub start_lsn: Option<i64>,
    pub end_lsn: Option<i64>,
    pub size_bytes: i64,
    pub sha256: String,
    pub storage: String,
    pub storage_key: String,
    pub archived_at: DateTime<Utc>,
}

const COLUMNS: &str = "id, target, system_identifier, timeline, file_name, kind, start_lsn, end_lsn, \
     size_bytes, sha256, storage, storage_key, archived_at";

/// A file just stored whole, to record.
#[derive(Debug, Clone)]
pub struct NewSegment<'a> {
    pub target: &'a str,
    pub system_identifier: &'a str,
    pub file: WalFile,
    pub file_name: &'a str,
    pub segment_size: u64,
    pub size_bytes: u64,
    pub sha256: &'a str,
    pub storage: &'a str,
    pub storage_key: &'a str,
}

/// The storage key of a WAL file: `<target>/wal/<system identifier>/<file name>`
/// (a snapshot of a segment being written adds `.partial`).
pub fn key_for(target: &str, system_identifier: &str, file_name: &str) -> String {
    format!("{target}/wal/{system_identifier}/{file_name}")
}

/// The storage key of a file of the archive: [`key_for`], with `.zst` when it
/// is stored compressed (how [`fetch`] knows to decompress it).
pub fn stored_key(target: &str, system_identifier: &str, file_name: &str, zstd: bool) -> String {
    format!(
        "{}{}",
        key_for(target, system_identifier, file_name),
        crate::storage::compress::extension(zstd.then_some(crate::storage::compress::ZSTD))
    )
}

/// Whether a stored file of the archive is zstd-compressed (by its key).
pub fn is_compressed(key: &str) -> bool {
    key.ends_with(crate::storage::compress::extension(Some(
        crate::storage::compress::ZSTD,
    )))
}

/// Records a stored file; `false` when it was already recorded (a replica that
/// took over stored the same segment again: same name, same bytes).
pub async fn record(db: &PgPool, s: &NewSegment<'_>) -> Result<bool, sqlx::Error> {
    let range = s.file.range(s.segment_size);
    let kind = match s.file {
        WalFile::Segment { .. } => "segment",
        WalFile::History { .. } => "history",
    };
    let done = sqlx::query(
        "INSERT INTO wal_segments (target, system_identifier, timeline, file_name, kind, start_lsn, end_lsn,
                                   size_bytes, sha256, storage, storage_key)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
         ON CONFLICT (target, system_identifier, file_name) DO NOTHING",
    )
    .bind(s.target)
    .bind(s.system_identifier)
    .bind(s.file.timeline() as i32)
    .bind(s.file_name)
    .bind(kind)
    .bind(range.map(|r| r.0.as_i64()))
    .bind(range.map(|r| r.1.as_i64()))
    .bind(s.size_bytes as i64)
    .bind(s.sha256)
    .bind(s.storage)
    .bind(s.storage_key)
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Whether `file_name` of this server is stored.
pub async fn is_recorded(
    db: &PgPool,
    target: &str,
    system_identifier: &str,
    file_name: &str,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM wal_segments WHERE target = $1 AND system_identifier = $2 AND file_name = $3)",
    )
    .bind(target)
    .bind(system_identifier)
    .bind(file_name)
    .fetch_one(db)
    .await
}

/// The stored file called `file_name`.
pub async fn find(
    db: &PgPool,
    target: &str,
    system_identifier: &str,
    file_name: &str,
) -> Result<Option<Segment>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM wal_segments WHERE target = $1 AND system_identifier = $2 AND file_name = $3"
    ))
    .bind(target)
    .bind(system_identifier)
    .bind(file_name)
    .fetch_optional(db)
    .await
}

/// The newest stored segment of this server (highest position, newest timeline).
pub async fn newest(
    db: &PgPool,
    target: &str,
    system_identifier: &str,
) -> Result<Option<Segment>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM wal_segments WHERE target = $1 AND system_identifier = $2 AND kind = 'segment'
         ORDER BY start_lsn DESC, timeline DESC LIMIT 1"
    ))
    .bind(target)
    .bind(system_identifier)
    .fetch_optional(db)
    .await
}

/// The stored segments of this server holding positions from `from` on (and up
/// to `to`, when given), oldest first.
pub async fn between(
    db: &PgPool,
    target: &str,
    system_identifier: &str,
    from: Lsn,
    to: Option<Lsn>,
) -> Result<Vec<Segment>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM wal_segments WHERE target = $1 AND system_identifier = $2 AND kind = 'segment'
           AND end_lsn > $3 AND ($4::bigint IS NULL OR start_lsn <= $4)
         ORDER BY start_lsn, timeline"
    ))
    .bind(target)
    .bind(system_identifier)
    .bind(from.as_i64())
    .bind(to.map(Lsn::as_i64))
    .fetch_all(db)
    .await
}

/// Totals for a target's archive (every server it had).
#[derive(Debug, Clone, Default, sqlx::FromRow)]
pub struct Totals {
    pub segments: i64,
    pub bytes: i64,
    pub oldest: Option<DateTime<Utc>>,
    pub newest: Option<DateTime<Utc>>,
}

pub async fn totals(db: &PgPool, target: &str) -> Result<Totals, sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*) AS segments, coalesce(sum(size_bytes), 0)::bigint AS bytes,
                min(archived_at) AS oldest, max(archived_at) AS newest
         FROM wal_segments WHERE target = $1 AND kind = 'segment'",
    )
    .bind(target)
    .fetch_one(db)
    .await
}

/// WAL missing between two stored segments of one timeline: positions
/// `[from, to)` were never stored (the slot was lost or dropped, the stream was
/// pointed elsewhere), so no recovery can cross them.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Gap {
    pub system_identifier: String,
    pub timeline: i32,
    pub from_lsn: i64,
    pub to_lsn: i64,
    /// When the segment before the gap was stored.
    pub after: DateTime<Utc>,
    /// When the segment after the gap was stored.
    pub before: DateTime<Utc>,
}

impl Gap {
    pub fn from(&self) -> Lsn {
        Lsn::from_i64(self.from_lsn)
    }
    pub fn to(&self) -> Lsn {
        Lsn::from_i64(self.to_lsn)
    }
}

/// Every gap in a target's stored WAL, oldest first.
pub async fn gaps(db: &PgPool, target: &str) -> Result<Vec<Gap>, sqlx::Error> {
    gaps_in(&mut *db.acquire().await?, target).await
}

pub async fn gaps_in(db: &mut PgConnection, target: &str) -> Result<Vec<Gap>, sqlx::Error> {
    sqlx::query_as(
        "SELECT system_identifier, timeline, end_lsn AS from_lsn, next_start AS to_lsn,
                archived_at AS after, next_at AS before
         FROM (SELECT system_identifier, timeline, end_lsn, archived_at,
                      lead(start_lsn) OVER w AS next_start, lead(archived_at) OVER w AS next_at
               FROM wal_segments WHERE target = $1 AND kind = 'segment'
               WINDOW w AS (PARTITION BY system_identifier, timeline ORDER BY start_lsn)) s
         WHERE next_start > end_lsn
         ORDER BY after",
    )
    .bind(target)
    .fetch_all(db)
    .await
}

/// How a fetched file was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// A completed segment or history file, checked against its checksum.
    Whole,
    /// The newest snapshot of the segment still being written (zero-padded after
    /// the last record), checked against its checksum: recovery replays up to
    /// where its records end.
    Snapshot,
}

/// Why a file could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Not archived: for `restore_command` this is the normal end of the WAL.
    #[error("{0} is not in the archive")]
    NotArchived(String),
    #[error("{0}")]
    Failed(String),
}

/// Copies the archived WAL file `file_name` of `target`'s server
/// `system_identifier` to `dest`, checked against its recorded SHA-256 before it
/// is put in place (written to `dest.dbops-fetch` first, then renamed): a
/// recovery never reads a file that is not whole. A segment not stored whole is
/// served from the snapshot of the segment being written when that is the one
/// asked for.
pub async fn fetch(
    state: &AppState,
    target: &str,
    system_identifier: &str,
    file_name: &str,
    dest: &Path,
) -> Result<Fetched, FetchError> {
    let failed = |e: String| FetchError::Failed(e);
    let (key, storage, sha256, how) = match find(&state.db, target, system_identifier, file_name)
        .await
        .map_err(|e| failed(format!("could not read the archive's index: {e}")))?
    {
        Some(s) => (s.storage_key, s.storage, s.sha256, Fetched::Whole),
        None => {
            let snap: Option<(String, String)> = sqlx::query_as(
                "SELECT partial_key, partial_sha256 FROM wal_streams
                     WHERE target = $1 AND system_identifier = $2 AND partial_name = $3
                       AND partial_key IS NOT NULL AND partial_sha256 IS NOT NULL",
            )
            .bind(target)
            .bind(system_identifier)
            .bind(file_name)
            .fetch_optional(&state.db)
            .await
            .map_err(|e| failed(format!("could not read the archive's index: {e}")))?;
            let storage = state
                .config
                .target(target)
                .and_then(|t| t.archive.as_ref())
                .map(|a| a.storage.clone())
                .unwrap_or_else(|| "local".into());
            match snap {
                Some((key, sha)) => (key, storage, sha, Fetched::Snapshot),
                None => return Err(FetchError::NotArchived(file_name.to_string())),
            }
        }
    };
    let store = state.storage_for(&storage).map_err(failed)?;
    let tmp = dest.with_extension("dbops-fetch");
    let result = async {
        let mut reader = store
            .open(&key)
            .await
            .map_err(|e| format!("could not read {file_name} from storage: {e}"))?;
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| format!("could not write {}: {e}", tmp.display()))?;
        // The checksum is of the stored bytes; a compressed file is checked
        // (zstd's own frame checksum too) while it is decompressed.
        let got = if is_compressed(&key) {
            let mut unpacked = crate::storage::compress::Unpacked::new(Box::pin(reader));
            tokio::io::copy(&mut unpacked, &mut file)
                .await
                .map_err(|e| format!("could not copy {file_name} from storage: {e}"))?;
            unpacked
                .finish()
                .await
                .map_err(|e| format!("could not read {file_name} from storage: {e}"))?
                .1
        } else {
            let mut hashing = crate::storage::HashingWriter::new(&mut file);
            tokio::io::copy(&mut reader, &mut hashing)
                .await
                .map_err(|e| format!("could not copy {file_name} from storage: {e}"))?;
            hashing.finish().1
        };
        if got != sha256 {
            return Err(format!(
                "{file_name} in storage does not match its recorded checksum (stored {sha256}, read {got}): refusing to use it"
            ));
        }
        file.flush().await.map_err(|e| e.to_string())?;
        file.sync_all().await.map_err(|e| e.to_string())?;
        drop(file);
        tokio::fs::rename(&tmp, dest)
            .await
            .map_err(|e| format!("could not put {file_name} in place: {e}"))
    }
    .await;
    if let Err(e) = result {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(failed(e));
    }
    Ok(how)
}

/// Deletes the rows of this server's stored segments that end at or before
/// `before` (the WAL no kept base backup needs) and returns them, so the caller
/// removes their files. History files stay (they are tiny and every later
/// timeline needs them).
pub async fn delete_before(
    db: &PgPool,
    target: &str,
    system_identifier: &str,
    before: Lsn,
) -> Result<Vec<Segment>, sqlx::Error> {
    sqlx::query_as(&format!(
        "DELETE FROM wal_segments WHERE target = $1 AND system_identifier = $2 AND kind = 'segment'
           AND end_lsn <= $3 RETURNING {COLUMNS}"
    ))
    .bind(target)
    .bind(system_identifier)
    .bind(before.as_i64())
    .fetch_all(db)
    .await
}
