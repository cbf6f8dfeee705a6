//! Continuous WAL archiving: one `pg_receivewal` per archived target, in exactly
//! one dbops replica at a time, storing every WAL segment whole in the target's
//! storage.
//!
//! How it runs:
//! - A periodic tick ([`tick`], every [`TICK`]) in every dbops with job workers
//!   takes or renews each archived target's lease (`wal_streams.holder`,
//!   `lease_until` [`LEASE`] ahead). The holder runs a stream task; another
//!   replica takes the lease over once it has not been renewed (its holder died
//!   or lost the console database).
//! - The stream task creates the physical replication slot (`--create-slot
//!   --if-not-exists`), then runs the machine's `pg_receivewal` of the server's
//!   major version into a spool directory (`<backups directory>/.wal-spool/<target>`),
//!   with the password in a passfile, `--synchronous` (each write flushed and
//!   reported, so the slot shows how far it got) and `--no-loop`: when it stops, dbops
//!   restarts it with a backoff (1 s doubling to 60 s), records why, and
//!   announces the first failure and the recovery by webhook.
//! - Every completed segment (and timeline history file) in the spool is copied
//!   through SHA-256 into storage, committed, and only then recorded in
//!   `wal_segments`: no row names a file that is not stored whole. The newest
//!   completed file stays in the spool, so a restarted `pg_receivewal` goes on
//!   after it (older servers would otherwise start at their current position).
//! - Every `snapshot_seconds`, when the server wrote more WAL since the last one,
//!   the segment being written (`.partial`, zero-padded after its last record) is
//!   stored as `<name>.partial`: on a quiet server a segment can take hours to
//!   fill, and the recovery point must not wait for it. `stored_through_at` is the
//!   newest moment at which everything the server had flushed was stored: the
//!   real recovery point, shown as the archive's lag.
//!
//! A spool left by a replica that died on the same machine is picked up: its
//! completed segments are stored, its `.partial` continued.
//!
//! Over 600 lines because the stream's whole life (lease, `pg_receivewal`,
//! uploads, snapshots) and the status read from it belong together; the status
//! half (`ArchiveStatus`, [`status`], [`export_metrics`]) is the place to split
//! off when it grows.

use std::{
    collections::{HashMap, VecDeque},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::{Lsn, WalFile, segments};
use crate::{
    audit::{self, AuditCtx, Entry},
    config::ArchiveSettings,
    pg_tools::{self, PgConn},
    state::AppState,
    targets::Target,
};

/// How often leases are renewed and the spool is looked at.
pub const TICK: Duration = Duration::from_secs(2);
/// How long a lease lasts without renewal before another replica takes over.
pub const LEASE: Duration = Duration::from_secs(20);

/// The streams this dbops process runs, by target (one per [`tick`] closure, so
/// that two consoles in one test process stay two replicas).
#[derive(Clone)]
pub struct Streams {
    /// Who this replica is in `wal_streams.holder`: `host:pid/<random>`.
    holder: String,
    running: Arc<Mutex<HashMap<String, Running>>>,
}

struct Running {
    cancel: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

impl Default for Streams {
    fn default() -> Self {
        Streams::new()
    }
}

impl Streams {
    pub fn new() -> Streams {
        Streams {
            holder: format!(
                "{}/{}",
                crate::jobs::runner_name(),
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
            running: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    pub fn holder(&self) -> &str {
        &self.holder
    }
}

/// One tick: for every archived target, keep (or take) the lease and the stream
/// task running, or stop the task when the lease is lost or archiving turned off.
pub async fn tick(state: &AppState, streams: &Streams) -> Result<(), String> {
    if state.config.jobs.workers == 0 {
        return Ok(());
    }
    for target in state.targets.all() {
        let Some(settings) = target.config.archive.clone() else {
            continue;
        };
        let name = target.name().to_string();
        let mut finished = false;
        {
            let running = streams.running.lock().expect("not poisoned");
            if let Some(r) = running.get(&name) {
                finished = r.handle.is_finished();
            }
        }
        if finished {
            streams.running.lock().expect("not poisoned").remove(&name);
        }
        let holds = if settings.enabled && !state.shutdown.is_cancelled() {
            take_lease(state, &name, &settings.slot, &streams.holder)
                .await
                .map_err(|e| format!("could not take the archive lease of {name}: {e}"))?
        } else {
            false
        };
        let mut running = streams.running.lock().expect("not poisoned");
        match (holds, running.contains_key(&name)) {
            (true, false) => {
                let cancel = state.shutdown.child_token();
                let handle = tokio::spawn(stream(
                    state.clone(),
                    target.clone(),
                    settings,
                    streams.holder.clone(),
                    cancel.clone(),
                ));
                running.insert(name, Running { cancel, handle });
            }
            (false, true) => {
                if let Some(r) = running.remove(&name) {
                    tracing::warn!(target = %name, "archive lease lost: stopping this replica's stream");
                    r.cancel.cancel();
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Takes or renews the lease of `target`'s stream for `holder`; `false` when
/// another replica holds it.
async fn take_lease(
    state: &AppState,
    target: &str,
    slot: &str,
    holder: &str,
) -> Result<bool, sqlx::Error> {
    sqlx::query(
        "INSERT INTO wal_streams (target, slot) VALUES ($1, $2) ON CONFLICT (target) DO NOTHING",
    )
    .bind(target)
    .bind(slot)
    .execute(&state.db)
    .await?;
    let taken = sqlx::query(
        "UPDATE wal_streams SET holder = $2, lease_until = now() + make_interval(secs => $3), slot = $4,
                started_at = CASE WHEN holder IS DISTINCT FROM $2 THEN now() ELSE started_at END,
                state = CASE WHEN holder IS DISTINCT FROM $2 THEN 'starting' ELSE state END,
                updated_at = now()
         WHERE target = $1 AND (holder = $2 OR holder IS NULL OR lease_until IS NULL OR lease_until < now())",
    )
    .bind(target)
    .bind(holder)
    .bind(LEASE.as_secs_f64())
    .bind(slot)
    .execute(&state.db)
    .await?;
    Ok(taken.rows_affected() == 1)
}

/// Sets the stream's state and message (only while `holder` holds it).
async fn set_state(state: &AppState, target: &str, holder: &str, st: &str, message: Option<&str>) {
    let r = sqlx::query(
        "UPDATE wal_streams SET state = $3, message = $4, updated_at = now() WHERE target = $1 AND holder = $2",
    )
    .bind(target)
    .bind(holder)
    .bind(st)
    .bind(message)
    .execute(&state.db)
    .await;
    if let Err(e) = r {
        tracing::warn!(target, error = %e, "could not record the archive's state");
    }
}

/// What the server is, as the stream needs it.
struct Server {
    system_identifier: String,
    timeline: u32,
    segment_size: u64,
    major: u32,
}

/// The stream task of one target, while this replica holds its lease.
async fn stream(
    state: AppState,
    target: Arc<Target>,
    settings: ArchiveSettings,
    holder: String,
    cancel: CancellationToken,
) {
    let name = target.name().to_string();
    let mut backoff = Duration::from_secs(1);
    let mut announced_failure = false;
    loop {
        if cancel.is_cancelled() {
            break;
        }
        let started = std::time::Instant::now();
        let outcome = run_once(
            &state,
            &target,
            &settings,
            &holder,
            &cancel,
            &mut announced_failure,
        )
        .await;
        if cancel.is_cancelled() {
            break;
        }
        let why = match outcome {
            Ok(()) => "pg_receivewal ended".to_string(),
            Err(e) => e,
        };
        tracing::warn!(target = %name, error = %why, "WAL streaming stopped; restarting");
        let _ = sqlx::query(
            "UPDATE wal_streams SET state = 'retrying', message = $3, restarts = restarts + 1, updated_at = now()
             WHERE target = $1 AND holder = $2",
        )
        .bind(&name)
        .bind(&holder)
        .bind(&why)
        .execute(&state.db)
        .await;
        if !announced_failure {
            announced_failure = true;
            let _ = audit::record(
                &state.db,
                &AuditCtx::system(),
                Entry::new("pitr.archive.stopped")
                    .target(&name)
                    .failed(why.clone()),
            )
            .await;
            crate::notify::send(
                &state,
                "pitr.archive.stopped",
                format!("dbops: WAL archiving of {name} stopped: {why}. Retrying."),
            );
        }
        // A stream that ran a while before failing starts again at once.
        if started.elapsed() > Duration::from_secs(120) {
            backoff = Duration::from_secs(1);
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = cancel.cancelled() => break,
        }
        backoff = (backoff * 2).min(Duration::from_secs(60));
    }
    // Give the lease back at once, so another replica need not wait for it to expire.
    let _ = sqlx::query(
        "UPDATE wal_streams SET holder = NULL, lease_until = NULL, state = 'stopped', updated_at = now()
         WHERE target = $1 AND holder = $2",
    )
    .bind(&name)
    .bind(&holder)
    .execute(&state.db)
    .await;
}

/// The spool directory of `target`.
pub fn spool_dir(state: &AppState, target: &str) -> PathBuf {
    state
        .config
        .backups
        .directory
        .join(".wal-spool")
        .join(target)
}

/// One life of `pg_receivewal`: checks, slot, stream, uploads and snapshots until
/// it stops or the task is cancelled.
async fn run_once(
    state: &AppState,
    target: &Target,
    settings: &ArchiveSettings,
    holder: &str,
    cancel: &CancellationToken,
    failed_before: &mut bool,
) -> Result<(), String> {
    let name = target.name();
    let server = identify(target).await?;
    let conn = PgConn::from_url(secrecy::ExposeSecret::expose_secret(&target.config.url))?;
    let tool = pg_tools::pick("pg_receivewal", server.major)?;
    let spool = spool_dir(state, name);
    tokio::fs::create_dir_all(&spool)
        .await
        .map_err(|e| format!("cannot create the spool directory {}: {e}", spool.display()))?;

    // The server dbops streamed from before: a different one (re-created, or the
    // URL now points elsewhere) starts a new archive, and its spool is not ours.
    let known: Option<Option<String>> =
        sqlx::query_scalar("SELECT system_identifier FROM wal_streams WHERE target = $1")
            .bind(name)
            .fetch_optional(&state.db)
            .await
            .map_err(|e| e.to_string())?;
    if let Some(Some(old)) = &known
        && old != &server.system_identifier
    {
        tracing::warn!(target = name, old, new = %server.system_identifier, "the target is a different server now: starting a new archive");
        clear_spool(&spool).await;
        let _ = audit::record(
            &state.db,
            &AuditCtx::system(),
            Entry::new("pitr.archive.new_server")
                .target(name)
                .params(json!({
                    "previous_system_identifier": old,
                    "system_identifier": server.system_identifier,
                })),
        )
        .await;
    }
    sqlx::query(
        "UPDATE wal_streams SET system_identifier = $3, timeline = $4, wal_segment_size = $5, updated_at = now()
         WHERE target = $1 AND holder = $2",
    )
    .bind(name)
    .bind(holder)
    .bind(&server.system_identifier)
    .bind(server.timeline as i32)
    .bind(server.segment_size as i64)
    .execute(&state.db)
    .await
    .map_err(|e| e.to_string())?;

    // Store what a previous life left complete in the spool, then make sure
    // pg_receivewal goes on after the newest stored segment.
    upload_completed(state, settings, name, &server, &spool).await?;
    seed_spool(state, name, &server, &spool).await?;

    // The slot (kept across restarts: it holds the WAL dbops has not stored yet).
    let (mut create, _pass) = tool.command(&conn.with_database("replication"))?;
    create
        .env("PGAPPNAME", "dbops-archive")
        .arg("--create-slot")
        .arg("--if-not-exists")
        .arg("--slot")
        .arg(&settings.slot)
        .arg("--dbname")
        .arg("replication=true")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let out = create
        .output()
        .await
        .map_err(|e| format!("could not run pg_receivewal: {e}"))?;
    if !out.status.success() {
        return Err(explain(target, &String::from_utf8_lossy(&out.stderr)));
    }

    let (mut cmd, _pass) = tool.command(&conn.with_database("replication"))?;
    cmd.env("PGAPPNAME", "dbops-archive")
        .arg("--directory")
        .arg(&spool)
        .arg("--slot")
        .arg(&settings.slot)
        .arg("--no-loop")
        .arg("--synchronous")
        .arg("--no-password")
        .arg("--status-interval")
        .arg("1")
        .arg("--dbname")
        .arg("replication=true")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    crate::process::die_with_parent(&mut cmd);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("could not start pg_receivewal: {e}"))?;
    let stderr = child.stderr.take();
    let tail: Arc<Mutex<VecDeque<String>>> = Arc::new(Mutex::new(VecDeque::new()));
    let tail_writer = tail.clone();
    let reader = tokio::spawn(async move {
        let Some(stderr) = stderr else { return };
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let mut t = tail_writer.lock().expect("not poisoned");
            t.push_back(line);
            if t.len() > 20 {
                t.pop_front();
            }
        }
    });

    let mut announced = false;
    let mut samples: VecDeque<(DateTime<Utc>, Lsn)> = VecDeque::new();
    let mut last_snapshot: Option<(String, Lsn)> = None;
    let mut last_snapshot_at = std::time::Instant::now() - settings.snapshot_interval;
    let pool = target.pg().await?;
    let mut interval = tokio::time::interval(Duration::from_millis(500));
    // The stream's row is written when the stored position moves, and otherwise
    // (a quiet server: only the recovery point's time moves) every 2 s.
    let mut written: Option<(Lsn, std::time::Instant)> = None;
    let exit = loop {
        tokio::select! {
            status = child.wait() => break status.ok(),
            _ = cancel.cancelled() => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                // What arrived before the stop is stored before the lease goes.
                let _ = upload_completed(state, settings, name, &server, &spool).await;
                return Ok(());
            }
            _ = interval.tick() => {}
        }
        upload_completed(state, settings, name, &server, &spool).await?;
        // Where the server is, and what our receiver has written to disk: with
        // `--synchronous` it reports each write flushed, and a physical slot's
        // restart_lsn is that position (readable without pg_read_all_stats, unlike
        // pg_stat_replication's positions).
        let pos: Option<(Option<String>, String)> = sqlx::query_as(
            "SELECT (SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = $1 AND active),
                    pg_current_wal_flush_lsn()::text",
        )
        .bind(&settings.slot)
        .fetch_optional(&pool)
        .await
        .ok()
        .flatten();
        let Some((received, current)) = pos else {
            continue;
        };
        let now = Utc::now();
        if let Some(cur) = Lsn::parse(&current) {
            samples.push_back((now, cur));
            while samples.len() > 600 {
                samples.pop_front();
            }
        }
        let Some(received) = received.as_deref().and_then(Lsn::parse) else {
            continue;
        };
        if !announced {
            announced = true;
            set_state(state, name, holder, "streaming", None).await;
            if std::mem::take(failed_before) {
                let _ = audit::record(
                    &state.db,
                    &AuditCtx::system(),
                    Entry::new("pitr.archive.resumed").target(name),
                )
                .await;
                crate::notify::send(
                    state,
                    "pitr.archive.resumed",
                    format!("dbops: WAL archiving of {name} is streaming again."),
                );
            }
        }
        if last_snapshot_at.elapsed() >= settings.snapshot_interval {
            last_snapshot_at = std::time::Instant::now();
            match snapshot(
                state,
                settings,
                name,
                &server,
                &spool,
                received,
                &last_snapshot,
            )
            .await
            {
                Ok(Some(s)) => last_snapshot = Some(s),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(target = name, error = %e, "could not store the segment being written")
                }
            }
        }
        // Everything stored: the newest completed segment's end, or the snapshot.
        let completed_end = segments::newest(&state.db, name, &server.system_identifier)
            .await
            .ok()
            .flatten()
            .and_then(|s| s.end_lsn)
            .map(Lsn::from_i64)
            .unwrap_or_default();
        // A snapshot counts once every segment before it is stored too (or when it
        // is the archive's first segment).
        let snap_end = last_snapshot
            .as_ref()
            .filter(|(n, _)| {
                WalFile::parse(n, server.segment_size)
                    .and_then(|f| f.range(server.segment_size))
                    .is_some_and(|(start, _)| completed_end == Lsn(0) || completed_end >= start)
            })
            .map(|s| s.1)
            .unwrap_or_default();
        let stored = completed_end.max(snap_end);
        // The newest moment at which the server had flushed nothing beyond it.
        let through = samples
            .iter()
            .rev()
            .find(|(_, lsn)| *lsn <= stored)
            .map(|(t, _)| *t);
        if written.is_some_and(|(lsn, at)| lsn == stored && at.elapsed() < Duration::from_secs(2)) {
            continue;
        }
        written = Some((stored, std::time::Instant::now()));
        let _ = sqlx::query(
            "UPDATE wal_streams SET stored_lsn = $3,
                    stored_through_at = GREATEST(stored_through_at, $4), updated_at = now()
             WHERE target = $1 AND holder = $2",
        )
        .bind(name)
        .bind(holder)
        .bind(stored.as_i64())
        .bind(through)
        .execute(&state.db)
        .await;
    };
    let _ = reader.await;
    // Store what it completed before it stopped.
    upload_completed(state, settings, name, &server, &spool).await?;
    let text: Vec<String> = tail.lock().expect("not poisoned").iter().cloned().collect();
    let text = text.join("\n");
    if text.contains("has already been removed") {
        // The server no longer has the WAL after the newest stored segment: that
        // stretch is lost (a gap, shown), streaming starts again where the server is.
        clear_spool(&spool).await;
        return Err(format!(
            "the server no longer has the WAL dbops needed next ({}); streaming goes on from what the server still has, and the archive shows the gap",
            explain(target, &text)
        ));
    }
    Err(match exit {
        Some(st) if text.trim().is_empty() => format!("pg_receivewal exited ({st})"),
        _ => explain(target, &text),
    })
}

/// A readable sentence for what `pg_receivewal` said (never the password).
fn explain(target: &Target, stderr: &str) -> String {
    let text = target.scrub(stderr.trim());
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("pg_receivewal failed")
        .trim_start_matches("pg_receivewal: ")
        .to_string();
    if text.contains("must be superuser or replication role")
        || text.contains("permission denied to start WAL sender")
        || text.contains("must have REPLICATION")
    {
        format!(
            "the target's role may not stream WAL ({last}): ALTER ROLE … REPLICATION, and allow `replication` in pg_hba.conf"
        )
    } else if text.contains("no pg_hba.conf entry for replication") {
        format!(
            "the server refuses replication connections from dbops ({last}): add a `host replication <role> <dbops address>` line to pg_hba.conf"
        )
    } else if text.contains("wal_level") {
        format!(
            "the server is not set up for archiving ({last}): set wal_level = replica and restart it"
        )
    } else if text.contains("max_wal_senders")
        || text.contains("number of requested standby connections")
    {
        format!("the server allows no more WAL senders ({last}): raise max_wal_senders")
    } else {
        last
    }
}

/// The server's identity, timeline, segment size and major version.
async fn identify(target: &Target) -> Result<Server, String> {
    let pool = target.pg().await?;
    let (version, segsize, sysid, tli): (i32, String, Option<String>, Option<i32>) =
        sqlx::query_as(
            "SELECT current_setting('server_version_num')::int,
                (SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'),
                (SELECT system_identifier::text FROM pg_control_system()),
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
    let segment_size: u64 = segsize
        .parse()
        .map_err(|_| format!("the server's wal_segment_size is `{segsize}`"))?;
    Ok(Server {
        system_identifier: sysid.ok_or("the server did not say its system identifier")?,
        timeline: tli.unwrap_or(1) as u32,
        segment_size,
        major: (version / 10000) as u32,
    })
}

/// Removes every file of the spool.
async fn clear_spool(spool: &Path) {
    if let Ok(mut rd) = tokio::fs::read_dir(spool).await {
        while let Ok(Some(e)) = rd.next_entry().await {
            let _ = tokio::fs::remove_file(e.path()).await;
        }
    }
}

/// The completed WAL files in the spool, oldest first (history files before
/// segments of their timeline).
async fn completed_in(spool: &Path, segment_size: u64) -> Vec<(String, WalFile)> {
    let mut out = vec![];
    if let Ok(mut rd) = tokio::fs::read_dir(spool).await {
        while let Ok(Some(e)) = rd.next_entry().await {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(f) = WalFile::parse(&name, segment_size) {
                out.push((name, f));
            }
        }
    }
    out.sort_by_key(|(n, f)| match f {
        WalFile::History { .. } => (0, n.clone()),
        WalFile::Segment { segno, timeline } => (1, format!("{segno:016X}{timeline:08X}")),
    });
    out
}

/// Stores every completed file of the spool that is not stored yet, records it,
/// and removes the spooled copies except the newest segment (the restart point).
async fn upload_completed(
    state: &AppState,
    settings: &ArchiveSettings,
    target: &str,
    server: &Server,
    spool: &Path,
) -> Result<(), String> {
    let files = completed_in(spool, server.segment_size).await;
    let newest_segment = files
        .iter()
        .rev()
        .find(|(_, f)| matches!(f, WalFile::Segment { .. }))
        .map(|(n, _)| n.clone());
    for (file_name, file) in &files {
        let path = spool.join(file_name);
        let recorded =
            segments::is_recorded(&state.db, target, &server.system_identifier, file_name)
                .await
                .map_err(|e| e.to_string())?;
        if !recorded {
            if let WalFile::Segment { .. } = file {
                // A segment must be whole: pg_receivewal renames it only when it is.
                let len = tokio::fs::metadata(&path)
                    .await
                    .map(|m| m.len())
                    .unwrap_or(0);
                if len != server.segment_size {
                    tracing::warn!(target, file = %file_name, len, "a completed segment of the wrong size in the spool: not stored");
                    continue;
                }
            }
            let key = segments::stored_key(
                target,
                &server.system_identifier,
                file_name,
                settings.compression.is_some(),
            );
            let (bytes, sha) = store_file(state, settings, &key, &path).await?;
            segments::record(
                &state.db,
                &segments::NewSegment {
                    target,
                    system_identifier: &server.system_identifier,
                    file: *file,
                    file_name,
                    segment_size: server.segment_size,
                    size_bytes: bytes,
                    sha256: &sha,
                    storage: &settings.storage,
                    storage_key: &key,
                },
            )
            .await
            .map_err(|e| format!("could not record {file_name}: {e}"))?;
            metrics::counter!("dbops_archive_segments_stored_total", "target" => target.to_string())
                .increment(1);
        }
        if Some(file_name) != newest_segment.as_ref() {
            let _ = tokio::fs::remove_file(&path).await;
        }
    }
    Ok(())
}

/// Copies `path` into storage under `key` (compressed with zstd when the
/// archive's settings say so) through SHA-256; returns the stored size and
/// checksum once committed.
async fn store_file(
    state: &AppState,
    settings: &ArchiveSettings,
    key: &str,
    path: &Path,
) -> Result<(u64, String), String> {
    let store = state.storage_for(&settings.storage)?;
    let mut upload = store
        .create(key)
        .await
        .map_err(|e| format!("could not store {key}: {e}"))?;
    let copied = async {
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|e| format!("could not read {}: {e}", path.display()))?;
        if let Some(z) = settings.compression {
            let done = crate::storage::compress::copy_compressed(
                &mut file,
                &mut upload,
                z,
                &|_| {},
                &state.shutdown.child_token(),
            )
            .await
            .map_err(|e| format!("could not store {key}: {e}"))?;
            return Ok::<_, String>((done.bytes, done.sha256));
        }
        let mut hashing = crate::storage::HashingWriter::new(&mut upload);
        tokio::io::copy(&mut file, &mut hashing)
            .await
            .map_err(|e| format!("could not store {key}: {e}"))?;
        let done = hashing.finish();
        upload
            .flush()
            .await
            .map_err(|e| format!("could not store {key}: {e}"))?;
        Ok::<_, String>(done)
    }
    .await;
    match copied {
        Ok(done) => {
            upload
                .commit()
                .await
                .map_err(|e| format!("could not store {key}: {e}"))?;
            Ok(done)
        }
        Err(e) => {
            let _ = upload.abort().await;
            Err(e)
        }
    }
}

/// Puts a stand-in for the newest stored segment of the server's timeline in an
/// empty spool (a sparse file of the segment's size: pg_receivewal reads only
/// the names and sizes of completed files to decide where to start), so that
/// streaming goes on right after it instead of at the server's current position.
async fn seed_spool(
    state: &AppState,
    target: &str,
    server: &Server,
    spool: &Path,
) -> Result<(), String> {
    let have_segment = completed_in(spool, server.segment_size)
        .await
        .iter()
        .any(|(_, f)| matches!(f, WalFile::Segment { .. }));
    let has_partial = std::fs::read_dir(spool)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().ends_with(".partial"))
        })
        .unwrap_or(false);
    if have_segment || has_partial {
        return Ok(());
    }
    let Some(newest) = segments::newest(&state.db, target, &server.system_identifier)
        .await
        .map_err(|e| e.to_string())?
    else {
        return Ok(());
    };
    let path = spool.join(&newest.file_name);
    let f =
        std::fs::File::create(&path).map_err(|e| format!("could not prepare the spool: {e}"))?;
    f.set_len(server.segment_size)
        .map_err(|e| format!("could not prepare the spool: {e}"))?;
    Ok(())
}

/// Stores the segment being written as `<name>.partial` when the receiver got
/// more since the last snapshot. Returns the snapshot's name and the position it
/// holds everything up to.
async fn snapshot(
    state: &AppState,
    settings: &ArchiveSettings,
    target: &str,
    server: &Server,
    spool: &Path,
    received: Lsn,
    last: &Option<(String, Lsn)>,
) -> Result<Option<(String, Lsn)>, String> {
    if last.as_ref().is_some_and(|(_, lsn)| *lsn >= received) {
        return Ok(None);
    }
    let partial = std::fs::read_dir(spool)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial"))
        .max();
    let Some(partial) = partial else {
        return Ok(None);
    };
    let name = partial.trim_end_matches(".partial").to_string();
    let Some(file @ WalFile::Segment { .. }) = WalFile::parse(&name, server.segment_size) else {
        return Ok(None);
    };
    // The receiver reported `received` before this copy starts, so the copy holds
    // at least that much of this segment (or the segment is already complete).
    let (start, end) = file.range(server.segment_size).expect("a segment");
    if received < start {
        return Ok(None);
    }
    let through = received.min(end);
    let key = segments::stored_key(
        target,
        &server.system_identifier,
        &format!("{name}.partial"),
        settings.compression.is_some(),
    );
    let (bytes, sha) = match store_file(state, settings, &key, &spool.join(&partial)).await {
        Ok(v) => v,
        // Completed (renamed) while we read it: the segment itself is stored next.
        Err(_) if !spool.join(&partial).exists() => return Ok(None),
        Err(e) => return Err(e),
    };
    sqlx::query(
        "UPDATE wal_streams SET partial_name = $2, partial_key = $3, partial_sha256 = $4, partial_bytes = $5,
                updated_at = now()
         WHERE target = $1",
    )
    .bind(target)
    .bind(&name)
    .bind(&key)
    .bind(&sha)
    .bind(bytes as i64)
    .execute(&state.db)
    .await
    .map_err(|e| e.to_string())?;
    Ok(Some((name, through)))
}

/// The archive of one target as the pages and the CLI show it.
#[derive(Debug, Clone, Default)]
pub struct ArchiveStatus {
    pub target: String,
    /// `[postgres.archive]` is set (and whether streaming is switched on).
    pub configured: bool,
    pub enabled: bool,
    pub slot: String,
    pub storage: String,
    /// `starting`, `streaming`, `retrying`, `stopped`, `failed`; `None` before the
    /// first lease.
    pub state: Option<String>,
    pub message: Option<String>,
    /// The replica streaming it (`host:pid/…`) and until when its lease holds.
    pub holder: Option<String>,
    pub lease_until: Option<DateTime<Utc>>,
    pub system_identifier: Option<String>,
    pub timeline: Option<i32>,
    pub stored_lsn: Option<Lsn>,
    /// Every change the server had flushed by this moment is stored.
    pub stored_through_at: Option<DateTime<Utc>>,
    pub restarts: i32,
    pub segments: segments::Totals,
    pub gaps: Vec<segments::Gap>,
    /// Now minus [`ArchiveStatus::stored_through_at`]: the recovery point's age.
    pub lag: Option<Duration>,
    pub objective: Duration,
    /// What the server says (when it answers).
    pub server: Option<ServerSide>,
}

/// The server's side of archiving: its settings, the role's right, the slot.
#[derive(Debug, Clone, Default)]
pub struct ServerSide {
    pub wal_level: String,
    pub max_wal_senders: i32,
    pub can_replicate: bool,
    pub slot_exists: bool,
    pub slot_active: bool,
    /// WAL the server keeps for the slot (bytes from its restart point to now).
    pub slot_retained_bytes: Option<i64>,
    /// `reserved`, `extended`, `unreserved` or `lost` (PostgreSQL 13+).
    pub slot_wal_status: Option<String>,
    /// What stops archiving from working, in sentences, for the page.
    pub problems: Vec<String>,
    /// The slot holds more WAL than `slot_warn_mb`.
    pub slot_warning: Option<String>,
}

impl ArchiveStatus {
    /// Whether the recovery point is older than the objective (or unknown while
    /// archiving is on).
    pub fn over_objective(&self) -> bool {
        self.configured && self.enabled && self.lag.is_none_or(|l| l > self.objective)
    }
}

/// The archive status of `target` (console database, and the server when
/// `with_server`).
pub async fn status(
    state: &AppState,
    target: &Target,
    with_server: bool,
) -> Result<ArchiveStatus, String> {
    let Some(settings) = target.config.archive.as_ref() else {
        return Ok(ArchiveStatus {
            target: target.name().to_string(),
            ..Default::default()
        });
    };
    type Row = (
        Option<String>,
        Option<String>,
        Option<String>,
        Option<DateTime<Utc>>,
        Option<String>,
        Option<i32>,
        Option<i64>,
        Option<DateTime<Utc>>,
        i32,
    );
    let row: Option<Row> = sqlx::query_as(
        "SELECT state, message, holder, lease_until, system_identifier, timeline, stored_lsn, stored_through_at, restarts
         FROM wal_streams WHERE target = $1",
    )
    .bind(target.name())
    .fetch_optional(&state.db)
    .await
    .map_err(|e| e.to_string())?;
    let segments = segments::totals(&state.db, target.name())
        .await
        .map_err(|e| e.to_string())?;
    let gaps = segments::gaps(&state.db, target.name())
        .await
        .map_err(|e| e.to_string())?;
    let mut st = ArchiveStatus {
        target: target.name().to_string(),
        configured: true,
        enabled: settings.enabled,
        slot: settings.slot.clone(),
        storage: settings.storage.clone(),
        objective: settings.objective,
        segments,
        gaps,
        ..Default::default()
    };
    if let Some((state_, message, holder, lease_until, sysid, tli, lsn, through, restarts)) = row {
        st.state = state_;
        st.message = message;
        // A lease nobody renewed is nobody's.
        st.holder = holder.filter(|_| lease_until.is_some_and(|l| l > Utc::now()));
        st.lease_until = lease_until;
        st.system_identifier = sysid;
        st.timeline = tli;
        st.stored_lsn = lsn.map(Lsn::from_i64);
        st.stored_through_at = through;
        st.restarts = restarts;
        st.lag = through.map(|t| (Utc::now() - t).to_std().unwrap_or_default());
    }
    if with_server {
        st.server = Some(server_side(target, settings).await);
    }
    Ok(st)
}

async fn server_side(target: &Target, settings: &ArchiveSettings) -> ServerSide {
    let mut side = ServerSide::default();
    let pool = match target.pg().await {
        Ok(p) => p,
        Err(e) => {
            side.problems.push(e);
            return side;
        }
    };
    let q = sqlx::query_as::<_, (String, i32, bool)>(
        "SELECT current_setting('wal_level'), current_setting('max_wal_senders')::int,
                (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user)",
    )
    .fetch_one(&pool)
    .await;
    match q {
        Ok((level, senders, can)) => {
            if level == "minimal" {
                side.problems.push("the server's wal_level is minimal: set wal_level = replica (and restart the server) for archiving".into());
            }
            if senders == 0 {
                side.problems.push(
                    "the server's max_wal_senders is 0: raise it (and restart the server)".into(),
                );
            }
            if !can {
                side.problems.push("the target's role has no REPLICATION right: ALTER ROLE <role> REPLICATION (and allow `replication` for it in pg_hba.conf)".into());
            }
            side.wal_level = level;
            side.max_wal_senders = senders;
            side.can_replicate = can;
        }
        Err(e) => {
            side.problems
                .push(target.scrub(&format!("could not read the server's settings: {e}")));
            return side;
        }
    }
    let slot = sqlx::query_as::<_, (bool, Option<i64>, Option<String>)>(
        "SELECT active, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, wal_status
         FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(&settings.slot)
    .fetch_optional(&pool)
    .await;
    if let Ok(Some((active, retained, wal_status))) = slot {
        side.slot_exists = true;
        side.slot_active = active;
        side.slot_retained_bytes = retained;
        if wal_status.as_deref() == Some("lost") {
            side.problems.push(format!(
                "the slot {} lost WAL the archive had not stored (the server removed it: max_slot_wal_keep_size); the archive has a gap",
                settings.slot
            ));
        }
        side.slot_wal_status = wal_status;
        if let Some(r) = retained
            && r as u64 > settings.slot_warn_bytes
        {
            side.slot_warning = Some(format!(
                "the slot {} holds {} of WAL on the server: while dbops does not stream, the server keeps every WAL file for it and its disk fills up. Start archiving again, or drop the slot (SELECT pg_drop_replication_slot('{}')) if the archive is given up",
                settings.slot,
                crate::fmt::bytes(r),
                settings.slot
            ));
        }
    }
    side
}

/// Sets the archive gauges of every archived target for `/metrics`.
pub async fn export_metrics(state: &AppState) {
    for target in state.targets.all() {
        if target.config.archive.is_none() {
            continue;
        }
        let Ok(st) = status(state, target, true).await else {
            continue;
        };
        let name = target.name().to_string();
        let lag = st.lag.map(|l| l.as_secs_f64()).unwrap_or(f64::NAN);
        metrics::gauge!("dbops_archive_lag_seconds", "target" => name.clone()).set(lag);
        metrics::gauge!("dbops_archive_objective_seconds", "target" => name.clone())
            .set(st.objective.as_secs_f64());
        metrics::gauge!("dbops_archive_segments", "target" => name.clone())
            .set(st.segments.segments as f64);
        metrics::gauge!("dbops_archive_bytes", "target" => name.clone())
            .set(st.segments.bytes as f64);
        metrics::gauge!("dbops_archive_gaps", "target" => name.clone()).set(st.gaps.len() as f64);
        metrics::gauge!("dbops_archive_streaming", "target" => name.clone()).set(
            if st.state.as_deref() == Some("streaming") && st.holder.is_some() {
                1.0
            } else {
                0.0
            },
        );
        if let Some(r) = st.server.as_ref().and_then(|s| s.slot_retained_bytes) {
            metrics::gauge!("dbops_archive_slot_retained_bytes", "target" => name).set(r as f64);
        }
    }
}
