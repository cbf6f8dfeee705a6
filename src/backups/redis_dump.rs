//! Redis backups, in two formats.
//!
//! # RDB snapshot ([`rdb_snapshot`])
//!
//! The server's own binary snapshot, fetched over the network exactly as
//! `redis-cli --rdb -` does it (a replication `SYNC` that asks only for the RDB file).
//! It is the fastest and most complete backup (it also holds functions and the exact
//! encodings), but it is restored by placing it as `dump.rdb` next to a stopped
//! `redis-server`, and many managed services (ElastiCache, Memorystore, Azure Cache)
//! do not allow `SYNC` at all. `redis-cli` comes with Debian's `redis-tools` package
//! (7.0 or newer is needed for `--rdb -`). The password goes to it only through the
//! `REDISCLI_AUTH` environment variable, never on its command line.
//!
//! # Logical export ([`logical_export`], [`verify_export`], [`logical_import`])
//!
//! A portable file made with `SCAN` + `DUMP` + `PTTL` on every logical database that
//! holds keys, loaded again with `RESTORE`. It works wherever those commands are
//! allowed (also on most managed services) and can be loaded into a running server,
//! merged with existing keys or not. `DUMP` payloads carry Redis' own RDB version:
//! they load into the same or a newer Redis, not into an older one.
//!
//! Format version 1 (all integers big-endian):
//!
//! ```text
//! magic    "DBOPS-REDIS-EXPORT 1\n"       21 bytes; the number is the format version
//! header   u32 length, then that many bytes of UTF-8 JSON:
//!          {"format":1,"created_at_unix_ms":…,"redis_version":"7.0.15","producer":"dbops 0.1.0"}
//! records  any number of key records, each:
//!          u8  'K' (0x4B)
//!          u32 logical database number
//!          u32 key length, then the key's bytes (binary-safe)
//!          i64 expiry as Unix time in milliseconds, or -1 for no expiry
//!          u64 payload length, then the payload: the key's `DUMP` output as is
//! trailer  exactly once, last:
//!          u8  'E' (0x45)
//!          u64 number of key records
//!          32 bytes: SHA-256 of every byte before the trailer's 'E'
//! end of file (anything after the trailer makes the file invalid)
//! ```
//!
//! Expiries: the exporter reads each key's `PTTL` and stores when the key expires
//! (its clock at the time of reading + `PTTL`). The importer gives each key the time
//! that is left of it (`RESTORE key <ms left>`), so restored TTLs are within a second
//! of the originals (plus any difference between the clocks of the machines that
//! exported and imported), and keys whose time ran out since the export are not
//! brought back (counted in [`ImportStats::expired_skipped`]): an old backup does not
//! resurrect expired sessions or locks. Keys that expire or vanish while the export
//! runs are left out.
//!
//! `SCAN` may return a key twice while Redis resizes its tables; the exporter keeps a
//! 16-byte fingerprint of every key of the database being exported (≈ 20 bytes of
//! memory per key) so that each key is written once.
//!
//! A file that is cut short or altered fails the trailer check. [`logical_import`]
//! therefore first copies the whole input to a private temporary file while checking
//! it, and writes nothing to Redis unless the check passes (it needs free space in
//! [`std::env::temp_dir`] for one copy of the export).
//!
//! Both directions use a connection of their own (a new fred client made from the
//! given client's config), so `SELECT`ing databases never changes the database of
//! the caller's client. Redis Cluster targets are refused (for now) with a message.
//!
//! Over 600 lines: the export format's writer and reader (and their limits) are
//! kept next to the format's description above so they cannot drift apart; about
//! 140 lines are round-trip tests.

use std::collections::{BTreeSet, HashSet};
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand, InfoKind};
use secrecy::ExposeSecret as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::io::{
    AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, BufReader, BufWriter,
};

use crate::config::TargetKind;
use crate::jobs::Progress;
use crate::targets::Target;
use crate::targets::redis::parse_info;

/// The first bytes of every logical export; the number is the format version.
pub const EXPORT_MAGIC: &[u8] = b"DBOPS-REDIS-EXPORT 1\n";
/// The format version written by [`logical_export`].
const FORMAT_VERSION: u32 = 1;
/// The first bytes of every RDB file.
const RDB_MAGIC: &[u8] = b"REDIS";
const TAG_KEY: u8 = b'K';
const TAG_END: u8 = b'E';
/// `SCAN … COUNT`: keys asked for per round trip.
const SCAN_COUNT: i64 = 1000;
/// Most `RESTORE`s sent in one pipeline.
const RESTORE_BATCH_KEYS: usize = 1000;
/// Most payload bytes sent in one pipeline (a batch is sent early when it holds more).
const RESTORE_BATCH_BYTES: usize = 16 << 20;
/// Redis keys are at most 512 MiB; a longer length means a damaged file.
const MAX_KEY_LEN: u32 = 512 << 20;
/// The JSON header is small; a longer length means a damaged file.
const MAX_HEADER_LEN: u32 = 64 << 10;
/// How much of `redis-cli`'s stderr is kept for the error message.
const STDERR_KEEP: usize = 16 << 10;

// ---------------------------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------------------------

/// What a logical export holds (as written, or as read back by [`verify_export`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Number of keys in the export.
    pub keys: u64,
    /// Size of the whole export in bytes (header, records and trailer).
    pub bytes: u64,
    /// The logical databases that have keys in the export, ascending.
    pub databases: Vec<u32>,
}

/// How [`logical_import`] treats keys that already exist in the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportMode {
    /// Refuse (before writing anything) if any database the export has keys for
    /// already holds keys in the destination.
    IntoEmpty,
    /// Keep existing keys: a key that already exists is skipped, not overwritten.
    MergeKeep,
    /// Overwrite existing keys with the export's version (`RESTORE … REPLACE`).
    MergeReplace,
}

/// What [`logical_import`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportStats {
    /// Keys written to the destination.
    pub restored: u64,
    /// Keys not written because they already existed (`MergeKeep`, or a key that
    /// appeared while an `IntoEmpty` import ran).
    pub skipped_existing: u64,
    /// Keys not written because their expiry time passed since the export was made.
    pub expired_skipped: u64,
}

/// The JSON header of a logical export.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct Header {
    format: u32,
    created_at_unix_ms: i64,
    redis_version: String,
    producer: String,
}

// ---------------------------------------------------------------------------------------------
// RDB snapshot
// ---------------------------------------------------------------------------------------------

/// An RDB snapshot fetched over the network, as `redis-cli --rdb` does.
///
/// Runs `redis-cli --rdb -` (from Debian's `redis-tools`) and streams its output into
/// `out`, counting bytes into `progress`; returns the number of bytes written. The
/// password is given to `redis-cli` only through `REDISCLI_AUTH`; `rediss://` URLs
/// add `--tls` (and `--sni` for host names). The output must start with the RDB magic
/// `REDIS`. Sets the progress phase to `dumping`. Dropping the future kills
/// `redis-cli`. `out` is flushed, not shut down.
/// On failure `out` may hold part of a snapshot: the caller must discard it.
#[tracing::instrument(skip_all, fields(target = %target.name()))]
pub async fn rdb_snapshot(
    target: &Target,
    out: &mut (dyn AsyncWrite + Send + Unpin),
    progress: &Progress,
) -> Result<u64, String> {
    if target.kind() != TargetKind::Redis {
        return Err(format!(
            "target {} is not a Redis server: RDB snapshots are for Redis targets",
            target.name()
        ));
    }
    let conn =
        CliConnection::from_url(target.config.url.expose_secret()).map_err(|e| target.scrub(&e))?;
    progress.set_phase("dumping");

    // A clean environment: no stray REDISCLI_AUTH of our own, no other secret.
    let mut cmd = crate::process::tool_command("redis-cli");
    cmd.args(conn.args())
        .args(["--rdb", "-"])
        // An old redis-cli (< 7.0) writes a file literally named `-`; keep it out of
        // our working directory.
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(password) = &conn.password {
        cmd.env("REDISCLI_AUTH", OsString::from_vec(password.clone()));
    }
    let mut child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            "redis-cli was not found: install it (on Debian/Ubuntu it comes with the \
             `redis-tools` package: `apt-get install redis-tools`) to take RDB snapshots"
                .to_string()
        } else {
            format!("could not run redis-cli: {e}")
        }
    })?;
    let (Some(mut stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err("could not read redis-cli's output (no pipe)".into());
    };
    // stderr is read on its own task so that a chatty or failing redis-cli never
    // blocks on a full pipe; the task ends when redis-cli exits (or is killed).
    let stderr_task = tokio::spawn(read_tail(stderr, STDERR_KEEP));

    let copied = copy_rdb(&mut stdout, out, progress).await;
    if copied.is_err() {
        // Stop redis-cli now rather than let it block on a pipe nobody reads.
        let _ = child.start_kill();
    }
    drop(stdout);
    let status = child
        .wait()
        .await
        .map_err(|e| format!("could not wait for redis-cli: {e}"))?;
    let stderr_text = stderr_task.await.unwrap_or_default();

    match copied {
        Err(CopyError::Write(e)) => Err(format!(
            "could not write the snapshot where it was going: {e}"
        )),
        Err(CopyError::Read(e)) => Err(target.scrub(&format!(
            "could not read redis-cli's output: {e}{}",
            stderr_suffix(&stderr_text)
        ))),
        Err(CopyError::NotRdb) => Err(target.scrub(&format!(
            "what redis-cli sent is not an RDB file (it does not start with REDIS){}",
            stderr_suffix(&stderr_text)
        ))),
        Ok(_) if !status.success() => {
            Err(target.scrub(&describe_cli_error(&stderr_text, &status.to_string())))
        }
        Ok(n) if n < RDB_MAGIC.len() as u64 => Err(target.scrub(&format!(
            "redis-cli sent no RDB data ({n} bytes); redis-cli 7.0 or newer is needed for \
             `--rdb -`{}",
            stderr_suffix(&stderr_text)
        ))),
        Ok(n) => {
            out.flush()
                .await
                .map_err(|e| format!("could not write the snapshot where it was going: {e}"))?;
            tracing::info!(bytes = n, "RDB snapshot fetched");
            Ok(n)
        }
    }
}

/// Why copying redis-cli's stdout stopped.
enum CopyError {
    Read(std::io::Error),
    Write(std::io::Error),
    NotRdb,
}

/// Copies stdout to `out`, checking the RDB magic before the first write.
async fn copy_rdb(
    stdout: &mut (impl AsyncRead + Unpin),
    out: &mut (dyn AsyncWrite + Send + Unpin),
    progress: &Progress,
) -> Result<u64, CopyError> {
    let mut buf = vec![0u8; 64 << 10];
    let mut head: Vec<u8> = Vec::with_capacity(RDB_MAGIC.len());
    let mut total = 0u64;
    loop {
        let n = stdout.read(&mut buf).await.map_err(CopyError::Read)?;
        if n == 0 {
            if head.len() < RDB_MAGIC.len() {
                // Fewer than 5 bytes in all: nothing was written; the caller reports it.
                return Ok(head.len() as u64);
            }
            return Ok(total);
        }
        let mut chunk = &buf[..n];
        if head.len() < RDB_MAGIC.len() {
            let take = (RDB_MAGIC.len() - head.len()).min(chunk.len());
            head.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
            if head.len() < RDB_MAGIC.len() {
                continue;
            }
            if head != RDB_MAGIC {
                return Err(CopyError::NotRdb);
            }
            out.write_all(&head).await.map_err(CopyError::Write)?;
            total += head.len() as u64;
            progress.add_bytes(head.len() as u64);
        }
        if !chunk.is_empty() {
            out.write_all(chunk).await.map_err(CopyError::Write)?;
            total += chunk.len() as u64;
            progress.add_bytes(chunk.len() as u64);
        }
    }
}

/// Reads a pipe to its end, keeping the last `keep` bytes as text.
async fn read_tail(mut pipe: impl AsyncRead + Unpin, keep: usize) -> String {
    let mut kept: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = pipe.read(&mut buf).await {
        if n == 0 {
            break;
        }
        kept.extend_from_slice(&buf[..n]);
        if kept.len() > keep {
            kept.drain(..kept.len() - keep);
        }
    }
    String::from_utf8_lossy(&kept).into_owned()
}

/// The meaningful lines of redis-cli's stderr (its progress chatter left out).
fn stderr_lines(stderr: &str) -> Vec<&str> {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .filter(|l| !l.starts_with("sending REPLCONF") && !l.starts_with("SYNC sent to master"))
        .collect();
    lines[lines.len().saturating_sub(5)..].to_vec()
}

fn stderr_suffix(stderr: &str) -> String {
    let lines = stderr_lines(stderr);
    if lines.is_empty() {
        String::new()
    } else {
        format!(" (redis-cli said: {})", lines.join("; "))
    }
}

/// Turns a failed redis-cli's stderr into a sentence for operators.
fn describe_cli_error(stderr: &str, status: &str) -> String {
    let lower = stderr.to_lowercase();
    let said = stderr_suffix(stderr);
    if lower.contains("wrongpass")
        || lower.contains("auth failed")
        || lower.contains("noauth")
        || lower.contains("invalid password")
    {
        format!(
            "authentication failed: the server did not accept the user name and password of \
             the target's URL{said}"
        )
    } else if lower.contains("connection refused") || lower.contains("could not connect") {
        format!("could not connect to the Redis server: is it running and reachable?{said}")
    } else if lower.contains("noperm")
        || lower.contains("unknown command")
        || lower.contains("sync with master failed")
    {
        format!(
            "the server does not allow fetching an RDB snapshot over the network (the SYNC \
             command is not permitted; managed services such as ElastiCache, Memorystore or \
             Azure Cache for Redis disable it): use a logical export instead, or the \
             provider's own snapshots{said}"
        )
    } else if lower.contains("ssl") || lower.contains("tls") {
        format!("the TLS connection to the Redis server failed{said}")
    } else if said.is_empty() {
        format!("redis-cli failed ({status}) without saying why")
    } else {
        format!("redis-cli failed ({status}){said}")
    }
}

/// Where and how `redis-cli` connects, from a target URL. The password is kept apart
/// from the arguments: it goes to the child through its environment only.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CliConnection {
    host: String,
    port: u16,
    user: Option<String>,
    password: Option<Vec<u8>>,
    tls: bool,
    /// The host name for TLS SNI (not for IP addresses).
    sni: Option<String>,
}

impl CliConnection {
    /// Parses a `redis://` or `rediss://` URL. Errors never contain the URL.
    fn from_url(url: &str) -> Result<CliConnection, String> {
        let u = url::Url::parse(url)
            .map_err(|e| format!("the target's connection URL is not valid ({e})"))?;
        let tls = match u.scheme() {
            "redis" => false,
            "rediss" => true,
            "redis-cluster" | "rediss-cluster" => {
                return Err(
                    "RDB snapshots of a Redis Cluster are not supported: each node \
                            holds only part of the data; use a logical export or the \
                            provider's snapshots"
                        .into(),
                );
            }
            "redis-sentinel" | "rediss-sentinel" => {
                return Err(
                    "RDB snapshots through Sentinel are not supported: configure a \
                            target with the primary's own address for snapshots, or use a \
                            logical export"
                        .into(),
                );
            }
            other => {
                return Err(format!(
                    "the target's URL scheme `{other}` is not one of redis, rediss"
                ));
            }
        };
        let (host, sni) = match u.host() {
            Some(url::Host::Domain(d)) => (d.to_string(), Some(d.to_string())),
            Some(url::Host::Ipv4(a)) => (a.to_string(), None),
            Some(url::Host::Ipv6(a)) => (a.to_string(), None),
            None => ("127.0.0.1".to_string(), None),
        };
        let user = Some(percent_decode(u.username()))
            .filter(|b| !b.is_empty())
            .map(|b| String::from_utf8_lossy(&b).into_owned());
        let password = u.password().map(percent_decode).filter(|p| !p.is_empty());
        Ok(CliConnection {
            host,
            port: u.port().unwrap_or(6379),
            user,
            password,
            tls,
            sni: if tls { sni } else { None },
        })
    }

    /// The command-line arguments (never the password).
    fn args(&self) -> Vec<String> {
        let mut args = vec![
            "-h".to_string(),
            self.host.clone(),
            "-p".to_string(),
            self.port.to_string(),
        ];
        if let Some(user) = &self.user {
            args.extend(["--user".to_string(), user.clone()]);
        }
        if self.tls {
            args.push("--tls".to_string());
            if let Some(sni) = &self.sni {
                args.extend(["--sni".to_string(), sni.clone()]);
            }
        }
        args
    }
}

/// Decodes `%XX` escapes (URL user names and passwords) into raw bytes.
fn percent_decode(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Logical export
// ---------------------------------------------------------------------------------------------

/// Portable logical export: SCAN + DUMP + PTTL, batched and pipelined, every logical database with keys.
///
/// Writes the format described in the module documentation to `out` (flushed, not
/// shut down) and returns what it holds. `progress` (phase `dumping`) counts keys
/// (items, with the server's key count as the expected total) and bytes. Uses a connection of its own,
/// so the database `client` has selected is not changed. If this fails, `out` holds
/// an export without a trailer, which [`verify_export`] and [`logical_import`] refuse.
#[tracing::instrument(skip_all)]
pub async fn logical_export(
    client: &Client,
    out: &mut (dyn AsyncWrite + Send + Unpin),
    progress: &Progress,
) -> Result<ExportStats, String> {
    progress.set_phase("dumping");
    let conn = Dedicated::connect(client, "export").await?;
    let c = &conn.0;

    let server: String = c
        .info(Some(InfoKind::Server))
        .await
        .map_err(|e| redis_error("could not read the server's INFO", &e))?;
    let keyspace: String = c
        .info(Some(InfoKind::Keyspace))
        .await
        .map_err(|e| redis_error("could not read the server's INFO keyspace", &e))?;
    let redis_version = parse_info(&server)
        .get("redis_version")
        .cloned()
        .unwrap_or_default();
    let databases = databases_with_keys(&keyspace);
    progress.set_items_total(databases.iter().map(|(_, n)| n).sum());

    let mut w = ExportWriter::new(out, progress);
    let header = Header {
        format: FORMAT_VERSION,
        created_at_unix_ms: now_unix_ms(),
        redis_version,
        producer: format!("dbops {}", env!("CARGO_PKG_VERSION")),
    };
    let header_json =
        serde_json::to_vec(&header).map_err(|e| format!("could not write the header: {e}"))?;
    w.put(EXPORT_MAGIC).await?;
    w.put(&u32_len(header_json.len())?.to_be_bytes()).await?;
    w.put(&header_json).await?;

    let mut stats = ExportStats::default();
    for (db, _) in databases {
        let written = export_database(c, db, &mut w).await?;
        if written > 0 {
            stats.keys += written;
            stats.databases.push(db);
        }
    }

    // Trailer: not part of what the checksum covers.
    let digest = w.hasher.clone().finalize();
    w.put_unhashed(&[TAG_END]).await?;
    w.put_unhashed(&stats.keys.to_be_bytes()).await?;
    w.put_unhashed(&digest).await?;
    w.out
        .flush()
        .await
        .map_err(|e| format!("could not write the export: {e}"))?;
    stats.bytes = w.bytes;
    tracing::info!(
        keys = stats.keys,
        bytes = stats.bytes,
        "Redis logical export written"
    );
    Ok(stats)
}

/// Writes every key of one database; returns how many were written.
async fn export_database(c: &Client, db: u32, w: &mut ExportWriter<'_>) -> Result<u64, String> {
    c.select(db)
        .await
        .map_err(|e| redis_error(&format!("could not select database {db}"), &e))?;
    let scan = CustomCommand::new_static("SCAN", ClusterHash::Random, false);
    let mut seen: HashSet<u128> = HashSet::new();
    let mut cursor = Value::from("0".to_string());
    let mut written = 0u64;
    loop {
        let reply: Value = c
            .custom(
                scan.clone(),
                vec![
                    cursor,
                    Value::from("COUNT".to_string()),
                    Value::from(SCAN_COUNT),
                ],
            )
            .await
            .map_err(|e| redis_error(&format!("SCAN of database {db} failed"), &e))?;
        let (next, keys) = parse_scan_reply(reply)
            .ok_or_else(|| format!("SCAN of database {db} gave an unexpected reply"))?;
        let keys: Vec<Bytes> = keys
            .into_iter()
            .filter(|k| seen.insert(fingerprint(k)))
            .collect();
        if !keys.is_empty() {
            written += export_batch(c, db, &keys, w).await?;
        }
        if next.as_ref() == b"0" {
            return Ok(written);
        }
        cursor = Value::Bytes(next);
    }
}

/// `PTTL` + `DUMP` for a batch of keys in one pipeline, then their records.
async fn export_batch(
    c: &Client,
    db: u32,
    keys: &[Bytes],
    w: &mut ExportWriter<'_>,
) -> Result<u64, String> {
    let pipe = c.pipeline();
    for k in keys {
        // PTTL before DUMP: a key that expires in between is then missing (nil) from
        // DUMP and left out, rather than restored without its expiry.
        let () = pipe
            .pttl(Key::from(k.clone()))
            .await
            .map_err(|e| redis_error("could not queue PTTL", &e))?;
        let () = pipe
            .dump(Key::from(k.clone()))
            .await
            .map_err(|e| redis_error("could not queue DUMP", &e))?;
    }
    // Taken before sending: a stored expiry is never later than the real one.
    let sent_at = now_unix_ms();
    let results: Vec<Result<Value, Error>> = pipe.try_all().await;
    if results.len() != keys.len() * 2 {
        return Err(format!(
            "Redis answered {} of {} commands of a DUMP batch in database {db}",
            results.len(),
            keys.len() * 2
        ));
    }
    let mut written = 0;
    let mut results = results.into_iter();
    for key in keys {
        let (Some(pttl), Some(dump)) = (results.next(), results.next()) else {
            break;
        };
        let pttl = pttl.map_err(|e| redis_error(&format!("PTTL in database {db} failed"), &e))?;
        let dump = dump.map_err(|e| redis_error(&format!("DUMP in database {db} failed"), &e))?;
        let expire_at = match pttl.as_i64() {
            Some(-1) => -1,
            Some(ms) if ms > 0 => sent_at.saturating_add(ms),
            // -2: gone since SCAN; 0: expiring right now.
            Some(_) => continue,
            None => {
                return Err(format!(
                    "PTTL in database {db} gave an unexpected reply ({pttl:?})"
                ));
            }
        };
        let payload = match dump {
            Value::Null => continue, // gone between SCAN and DUMP
            Value::Bytes(b) => b,
            Value::String(s) => s.into_inner(),
            other => {
                return Err(format!(
                    "DUMP in database {db} gave an unexpected reply (a {:?})",
                    other.kind()
                ));
            }
        };
        w.put(&[TAG_KEY]).await?;
        w.put(&db.to_be_bytes()).await?;
        w.put(&u32_len(key.len())?.to_be_bytes()).await?;
        w.put(key).await?;
        w.put(&expire_at.to_be_bytes()).await?;
        w.put(&(payload.len() as u64).to_be_bytes()).await?;
        w.put(&payload).await?;
        w.progress.add_items(1);
        written += 1;
    }
    Ok(written)
}

/// `[cursor, [key, …]]` from a SCAN reply.
fn parse_scan_reply(reply: Value) -> Option<(Bytes, Vec<Bytes>)> {
    let mut parts = reply.into_array().into_iter();
    let cursor = value_to_bytes(parts.next()?)?;
    let keys = match parts.next()? {
        Value::Array(keys) => keys
            .into_iter()
            .map(value_to_bytes)
            .collect::<Option<Vec<_>>>()?,
        Value::Null => Vec::new(),
        one => vec![value_to_bytes(one)?],
    };
    Some((cursor, keys))
}

fn value_to_bytes(v: Value) -> Option<Bytes> {
    match v {
        Value::Bytes(b) => Some(b),
        Value::String(s) => Some(s.into_inner()),
        Value::Integer(i) => Some(Bytes::from(i.to_string())),
        _ => None,
    }
}

/// The databases with keys, from `INFO keyspace` (`db3:keys=5,expires=0,…`).
fn databases_with_keys(keyspace: &str) -> Vec<(u32, u64)> {
    let mut dbs: Vec<(u32, u64)> = parse_info(keyspace)
        .into_iter()
        .filter_map(|(name, v)| {
            let db = name.strip_prefix("db")?.parse::<u32>().ok()?;
            let keys = v
                .split(',')
                .find_map(|p| p.strip_prefix("keys="))?
                .parse::<u64>()
                .ok()?;
            Some((db, keys))
        })
        .filter(|(_, keys)| *keys > 0)
        .collect();
    dbs.sort_unstable();
    dbs
}

/// 16 bytes of the key's SHA-256: enough to tell keys apart, small to keep.
fn fingerprint(key: &[u8]) -> u128 {
    let digest = Sha256::digest(key);
    let mut first = [0u8; 16];
    first.copy_from_slice(&digest[..16]);
    u128::from_be_bytes(first)
}

fn u32_len(len: usize) -> Result<u32, String> {
    u32::try_from(len).map_err(|_| format!("a key of {len} bytes is too long for the export"))
}

fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A readable sentence for a Redis error.
fn redis_error(what: &str, e: &Error) -> String {
    let details = e.details();
    let lower = details.to_lowercase();
    if lower.contains("noperm") {
        format!(
            "{what}: the target's Redis user is not allowed to run this command (ACL): {details}"
        )
    } else if lower.contains("wrongpass") || lower.contains("noauth") {
        format!("{what}: authentication failed: check the password of the target's URL")
    } else {
        format!("{what}: {details}")
    }
}

/// The writing side of the export format: buffers, hashes and counts.
struct ExportWriter<'a> {
    out: BufWriter<&'a mut (dyn AsyncWrite + Send + Unpin)>,
    hasher: Sha256,
    bytes: u64,
    progress: &'a Progress,
}

impl<'a> ExportWriter<'a> {
    fn new(out: &'a mut (dyn AsyncWrite + Send + Unpin), progress: &'a Progress) -> Self {
        ExportWriter {
            out: BufWriter::with_capacity(256 << 10, out),
            hasher: Sha256::new(),
            bytes: 0,
            progress,
        }
    }

    async fn put(&mut self, buf: &[u8]) -> Result<(), String> {
        self.hasher.update(buf);
        self.put_unhashed(buf).await
    }

    async fn put_unhashed(&mut self, buf: &[u8]) -> Result<(), String> {
        self.out
            .write_all(buf)
            .await
            .map_err(|e| format!("could not write the export: {e}"))?;
        self.bytes += buf.len() as u64;
        self.progress.add_bytes(buf.len() as u64);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Reading and verifying
// ---------------------------------------------------------------------------------------------

/// Reads an export's header and counts without loading it (for verification after a backup).
///
/// Streams the whole input once, checking the magic, every record's framing, the key
/// count and the SHA-256 in the trailer, and that nothing follows it. Memory use does
/// not depend on the export's size.
#[tracing::instrument(skip_all)]
pub async fn verify_export(
    input: &mut (dyn AsyncRead + Send + Unpin),
) -> Result<ExportStats, String> {
    let mut r = ExportReader::new(&mut *input, None, None);
    r.read_header().await?;
    let mut dbs = BTreeSet::new();
    let mut keys = 0u64;
    while let Item::Key { db, .. } = r.next(false).await? {
        keys += 1;
        dbs.insert(db);
    }
    Ok(ExportStats {
        keys,
        bytes: r.bytes,
        databases: dbs.into_iter().collect(),
    })
}

/// One record of an export.
enum Item {
    Key {
        db: u32,
        /// Empty unless asked for.
        key: Vec<u8>,
        expire_at: i64,
        /// Empty unless asked for.
        payload: Vec<u8>,
    },
    /// The trailer was read and checked, and nothing follows it.
    End,
}

/// The reading side of the export format: hashes, counts, and optionally copies what
/// it reads to a file and counts it into a [`Progress`].
struct ExportReader<'p, R> {
    input: BufReader<R>,
    hasher: Sha256,
    bytes: u64,
    records: u64,
    copy: Option<BufWriter<tokio::fs::File>>,
    progress: Option<&'p Progress>,
    scratch: Vec<u8>,
}

impl<'p, R: AsyncRead + Unpin> ExportReader<'p, R> {
    fn new(
        input: R,
        copy: Option<BufWriter<tokio::fs::File>>,
        progress: Option<&'p Progress>,
    ) -> Self {
        ExportReader {
            input: BufReader::with_capacity(256 << 10, input),
            hasher: Sha256::new(),
            bytes: 0,
            records: 0,
            copy,
            progress,
            scratch: Vec::new(),
        }
    }

    fn truncated(&self) -> String {
        format!(
            "the export is incomplete: it ends after about {} bytes, before its trailer (it \
             was probably cut short while being written or copied)",
            self.bytes
        )
    }

    /// Fills `buf` from the input, hashing it when `hash`.
    async fn fill(&mut self, buf: &mut [u8], hash: bool) -> Result<(), String> {
        match self.input.read_exact(buf).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(self.truncated());
            }
            Err(e) => return Err(format!("could not read the export: {e}")),
        }
        self.account(buf, hash).await
    }

    async fn account(&mut self, buf: &[u8], hash: bool) -> Result<(), String> {
        if hash {
            self.hasher.update(buf);
        }
        self.bytes += buf.len() as u64;
        if let Some(p) = self.progress {
            p.add_bytes(buf.len() as u64);
        }
        if let Some(copy) = self.copy.as_mut() {
            copy.write_all(buf)
                .await
                .map_err(|e| format!("could not write the temporary copy of the export: {e}"))?;
        }
        Ok(())
    }

    async fn u32(&mut self) -> Result<u32, String> {
        let mut b = [0u8; 4];
        self.fill(&mut b, true).await?;
        Ok(u32::from_be_bytes(b))
    }

    async fn u64(&mut self, hash: bool) -> Result<u64, String> {
        let mut b = [0u8; 8];
        self.fill(&mut b, hash).await?;
        Ok(u64::from_be_bytes(b))
    }

    /// Reads `len` hashed bytes, returning them when `keep` (else streaming past them).
    async fn bytes_of(&mut self, len: u64, keep: bool) -> Result<Vec<u8>, String> {
        let mut kept = Vec::new();
        if keep {
            // Only done on a file whose framing was already checked, so `len` is real.
            kept.reserve(usize::try_from(len).map_err(|_| self.truncated())?);
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.resize(64 << 10, 0);
        let mut left = len;
        while left > 0 {
            let n = usize::try_from(left.min(scratch.len() as u64)).unwrap_or(scratch.len());
            let res = self.fill(&mut scratch[..n], true).await;
            if let Err(e) = res {
                self.scratch = scratch;
                return Err(e);
            }
            if keep {
                kept.extend_from_slice(&scratch[..n]);
            }
            left -= n as u64;
        }
        self.scratch = scratch;
        Ok(kept)
    }

    /// Reads and checks the magic and the JSON header.
    async fn read_header(&mut self) -> Result<Header, String> {
        let mut magic = vec![0u8; EXPORT_MAGIC.len()];
        let got = read_up_to(&mut self.input, &mut magic)
            .await
            .map_err(|e| format!("could not read the export: {e}"))?;
        magic.truncate(got);
        self.account(&magic, true).await?;
        if magic != EXPORT_MAGIC {
            return Err(if magic.starts_with(RDB_MAGIC) {
                "this is an RDB snapshot, not a logical export: it is restored by placing it \
                 as dump.rdb next to a stopped redis-server"
                    .to_string()
            } else if magic.starts_with(b"DBOPS-REDIS-EXPORT ") && got == EXPORT_MAGIC.len() {
                format!(
                    "this export was written in format `{}`, which this version of dbops \
                     cannot read (it reads version {FORMAT_VERSION})",
                    String::from_utf8_lossy(&magic[19..]).trim()
                )
            } else if got == 0 {
                "the export is empty".to_string()
            } else if EXPORT_MAGIC.starts_with(&magic) {
                self.truncated()
            } else {
                "this is not a dbops Redis export (it does not start with DBOPS-REDIS-EXPORT)"
                    .to_string()
            });
        }
        let len = self.u32().await?;
        if len > MAX_HEADER_LEN {
            return Err(self.damaged("its header length is implausible"));
        }
        let json = self.bytes_of(u64::from(len), true).await?;
        let header: Header = serde_json::from_slice(&json)
            .map_err(|_| self.damaged("its header is not valid JSON"))?;
        Ok(header)
    }

    fn damaged(&self, what: &str) -> String {
        format!(
            "the export is damaged or was altered: {what} (near byte {})",
            self.bytes
        )
    }

    /// The next record; key and payload bytes are returned only when `keep`.
    async fn next(&mut self, keep: bool) -> Result<Item, String> {
        let mut tag = [0u8; 1];
        // The trailer's tag is not covered by the checksum; a key record's is.
        self.fill(&mut tag, false).await?;
        match tag[0] {
            TAG_KEY => {
                self.hasher.update(tag);
                let db = self.u32().await?;
                let key_len = self.u32().await?;
                if key_len > MAX_KEY_LEN {
                    return Err(self.damaged("a key length is implausible"));
                }
                let key = self.bytes_of(u64::from(key_len), keep).await?;
                let expire_at = self.u64(true).await? as i64;
                let payload_len = self.u64(true).await?;
                let payload = self.bytes_of(payload_len, keep).await?;
                self.records += 1;
                Ok(Item::Key {
                    db,
                    key,
                    expire_at,
                    payload,
                })
            }
            TAG_END => {
                let digest = self.hasher.clone().finalize();
                let count = self.u64(false).await?;
                let mut stored = [0u8; 32];
                self.fill(&mut stored, false).await?;
                if stored[..] != digest[..] {
                    return Err(
                        "the export is damaged or was altered: its SHA-256 checksum \
                                does not match its contents"
                            .into(),
                    );
                }
                if count != self.records {
                    return Err(format!(
                        "the export is damaged: its trailer counts {count} keys but it holds {}",
                        self.records
                    ));
                }
                let mut extra = [0u8; 1];
                let n = read_up_to(&mut self.input, &mut extra)
                    .await
                    .map_err(|e| format!("could not read the export: {e}"))?;
                if n > 0 {
                    return Err(self.damaged("there is data after its trailer"));
                }
                if let Some(copy) = self.copy.as_mut() {
                    copy.flush().await.map_err(|e| {
                        format!("could not write the temporary copy of the export: {e}")
                    })?;
                }
                Ok(Item::End)
            }
            other => Err(self.damaged(&format!("unexpected record type 0x{other:02x}"))),
        }
    }
}

/// Reads until `buf` is full or the input ends; returns how much was read.
async fn read_up_to(
    input: &mut (impl AsyncRead + Unpin),
    buf: &mut [u8],
) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = input.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

// ---------------------------------------------------------------------------------------------
// Import
// ---------------------------------------------------------------------------------------------

/// Loads a logical export (for the restore capability).
///
/// First copies the whole input to a private temporary file under
/// [`std::env::temp_dir`] while checking it (progress phase `verifying`, bytes =
/// bytes read); a file that is incomplete or altered is refused before anything is
/// written. Then checks the destination: every database the export has keys for must
/// exist, and with [`ImportMode::IntoEmpty`] must be empty (`DBSIZE`). Then restores
/// (phase `restoring`, items = keys handled out of the export's count) with pipelined
/// `RESTORE key <ms left> payload [REPLACE]` into the same database numbers. Keys
/// whose expiry passed since the export are skipped. The temporary file is removed
/// in every case.
///
/// If Redis refuses a key while restoring (e.g. an export from a newer Redis), the
/// import stops with an error saying how many keys were already written: the
/// destination then holds part of the export.
#[tracing::instrument(skip_all, fields(mode = ?mode))]
pub async fn logical_import(
    client: &Client,
    input: &mut (dyn AsyncRead + Send + Unpin),
    mode: ImportMode,
    progress: &Progress,
) -> Result<ImportStats, String> {
    if client.is_clustered() {
        return Err(cluster_unsupported("import"));
    }

    // Fail fast when the destination is unreachable, before reading a large input.
    let conn = Dedicated::connect(client, "import").await?;
    let c = &conn.0;

    // 1. Copy and check the whole export before writing anything.
    progress.set_phase("verifying");
    let temp = TempFile::new();
    let file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp.0)
        .await
        .map_err(|e| format!("could not create a temporary file for the import: {e}"))?;
    let mut checked = ExportReader::new(&mut *input, Some(BufWriter::new(file)), Some(progress));
    let header = checked.read_header().await?;
    let mut databases = BTreeSet::new();
    let mut keys = 0u64;
    while let Item::Key { db, .. } = checked.next(false).await? {
        keys += 1;
        databases.insert(db);
    }
    drop(checked);
    progress.set_items_total(keys);

    // 2. Preconditions on the destination, still without writing.
    let mut occupied = Vec::new();
    for &db in &databases {
        select_existing(c, db).await?;
        if mode == ImportMode::IntoEmpty {
            let size: u64 = c
                .dbsize()
                .await
                .map_err(|e| redis_error(&format!("DBSIZE of database {db} failed"), &e))?;
            if size > 0 {
                occupied.push(format!("database {db} holds {size} keys"));
            }
        }
    }
    if !occupied.is_empty() {
        return Err(format!(
            "the destination is not empty ({}): importing into empty databases was asked \
             for, so nothing was written; empty them first or choose a merge mode (keep or \
             replace existing keys)",
            occupied.join(", ")
        ));
    }

    // 3. Restore from the checked copy.
    progress.set_phase("restoring");
    let file = tokio::fs::File::open(&temp.0)
        .await
        .map_err(|e| format!("could not reopen the temporary copy of the export: {e}"))?;
    let mut r = ExportReader::new(file, None, None);
    r.read_header().await?;
    let mut stats = ImportStats::default();
    let mut batch = RestoreBatch::default();
    let mut current_db: Option<u32> = None;
    while let Item::Key {
        db,
        key,
        expire_at,
        payload,
    } = r.next(true).await?
    {
        if current_db != Some(db) {
            batch.send(c, mode, &header, &mut stats, progress).await?;
            select_existing(c, db).await?;
            current_db = Some(db);
        }
        let ttl = if expire_at == -1 {
            0
        } else {
            let left = expire_at.saturating_sub(now_unix_ms());
            if left <= 0 {
                stats.expired_skipped += 1;
                progress.add_items(1);
                continue;
            }
            left
        };
        batch.bytes += key.len() + payload.len();
        batch.db = db;
        batch
            .items
            .push((Bytes::from(key), ttl, Bytes::from(payload)));
        if batch.items.len() >= RESTORE_BATCH_KEYS || batch.bytes >= RESTORE_BATCH_BYTES {
            batch.send(c, mode, &header, &mut stats, progress).await?;
        }
    }
    batch.send(c, mode, &header, &mut stats, progress).await?;
    tracing::info!(
        restored = stats.restored,
        skipped_existing = stats.skipped_existing,
        expired_skipped = stats.expired_skipped,
        "Redis logical export imported"
    );
    Ok(stats)
}

/// `RESTORE`s waiting to be sent in one pipeline (all for database `db`).
#[derive(Default)]
struct RestoreBatch {
    db: u32,
    items: Vec<(Bytes, i64, Bytes)>,
    bytes: usize,
}

impl RestoreBatch {
    async fn send(
        &mut self,
        c: &Client,
        mode: ImportMode,
        header: &Header,
        stats: &mut ImportStats,
        progress: &Progress,
    ) -> Result<(), String> {
        if self.items.is_empty() {
            return Ok(());
        }
        let items = std::mem::take(&mut self.items);
        self.bytes = 0;
        let db = self.db;
        let replace = mode == ImportMode::MergeReplace;
        let pipe = c.pipeline();
        for (key, ttl, payload) in &items {
            let () = pipe
                .restore(
                    Key::from(key.clone()),
                    *ttl,
                    Value::Bytes(payload.clone()),
                    replace,
                    false,
                    None,
                    None,
                )
                .await
                .map_err(|e| redis_error("could not queue RESTORE", &e))?;
        }
        let results: Vec<Result<Value, Error>> = pipe.try_all().await;
        for result in results {
            match result {
                Ok(_) => stats.restored += 1,
                // Without REPLACE an existing key answers BUSYKEY: it is kept.
                Err(e) if !replace && e.details().contains("BUSYKEY") => {
                    stats.skipped_existing += 1;
                }
                Err(e) => {
                    let hint = if e.details().contains("payload version") {
                        format!(
                            " (the destination Redis cannot read data from Redis {}: it \
                             must be the same version or newer)",
                            if header.redis_version.is_empty() {
                                "of unknown version"
                            } else {
                                &header.redis_version
                            }
                        )
                    } else {
                        String::new()
                    };
                    return Err(format!(
                        "restoring stopped after {} keys were written: Redis refused a key \
                         in database {db}: {}{hint}; the destination now holds part of the \
                         export",
                        stats.restored,
                        e.details()
                    ));
                }
            }
        }
        progress.add_items(items.len() as u64);
        Ok(())
    }
}

/// `SELECT db`, saying clearly when the destination has no such database.
async fn select_existing(c: &Client, db: u32) -> Result<(), String> {
    c.select(db).await.map_err(|e| {
        if e.details().to_lowercase().contains("out of range") {
            format!(
                "the destination Redis has no database {db} (its `databases` setting is too \
                 low for this export); nothing was written to it"
            )
        } else {
            redis_error(&format!("could not select database {db}"), &e)
        }
    })
}

fn cluster_unsupported(what: &str) -> String {
    format!(
        "a logical {what} of a Redis Cluster is not supported yet: configure a target for \
         each primary node instead"
    )
}

/// A connection of our own, made from the caller's client's config, closed on drop
/// (so `SELECT` never changes the caller's database, and an abandoned export or
/// import leaves no connection behind).
struct Dedicated(Client);

impl Dedicated {
    async fn connect(client: &Client, what: &str) -> Result<Dedicated, String> {
        if client.is_clustered() {
            return Err(cluster_unsupported(what));
        }
        let dedicated = Dedicated(client.clone_new());
        let limit = client
            .connection_config()
            .connection_timeout
            .max(Duration::from_secs(1))
            * 2;
        match tokio::time::timeout(limit, dedicated.0.init()).await {
            Ok(Ok(_task)) => Ok(dedicated),
            Ok(Err(e)) => Err(redis_error(
                &format!("could not open a connection to Redis for the {what}"),
                &e,
            )),
            Err(_) => Err(format!(
                "could not open a connection to Redis for the {what}: no answer within {} s",
                limit.as_secs()
            )),
        }
    }
}

impl Drop for Dedicated {
    fn drop(&mut self) {
        let c = self.0.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), c.quit()).await;
            });
        }
    }
}

/// A temporary file path under [`std::env::temp_dir`], removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    /// A fresh, unpredictable name (the file itself is created `create_new`, 0600).
    fn new() -> TempFile {
        TempFile(std::env::temp_dir().join(format!(
            "dbops-redis-import-{}.tmp",
            uuid::Uuid::new_v4().simple()
        )))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small export built by hand with the writer, as `logical_export` writes it.
    async fn sample_export() -> Vec<u8> {
        let progress = Progress::new("test");
        let mut out: Vec<u8> = Vec::new();
        {
            let mut w = ExportWriter::new(&mut out, &progress);
            let json = serde_json::to_vec(&Header {
                format: 1,
                created_at_unix_ms: 1,
                redis_version: "7.0.15".into(),
                producer: "test".into(),
            })
            .unwrap();
            w.put(EXPORT_MAGIC).await.unwrap();
            w.put(&(json.len() as u32).to_be_bytes()).await.unwrap();
            w.put(&json).await.unwrap();
            for (db, key, payload) in [(0u32, &b"a\0\n\xff"[..], &b"xyz"[..]), (3, b"b", b"")] {
                w.put(&[TAG_KEY]).await.unwrap();
                w.put(&db.to_be_bytes()).await.unwrap();
                w.put(&(key.len() as u32).to_be_bytes()).await.unwrap();
                w.put(key).await.unwrap();
                w.put(&(-1i64).to_be_bytes()).await.unwrap();
                w.put(&(payload.len() as u64).to_be_bytes()).await.unwrap();
                w.put(payload).await.unwrap();
            }
            let digest = w.hasher.clone().finalize();
            w.put_unhashed(&[TAG_END]).await.unwrap();
            w.put_unhashed(&2u64.to_be_bytes()).await.unwrap();
            w.put_unhashed(&digest).await.unwrap();
            w.out.flush().await.unwrap();
        }
        out
    }

    #[tokio::test]
    async fn a_well_formed_export_verifies_with_its_counts() {
        let export = sample_export().await;
        let stats = verify_export(&mut &export[..]).await.unwrap();
        assert_eq!(
            stats,
            ExportStats {
                keys: 2,
                bytes: export.len() as u64,
                databases: vec![0, 3]
            }
        );
    }

    #[tokio::test]
    async fn every_truncation_and_every_flipped_byte_is_refused() {
        let export = sample_export().await;
        for len in 0..export.len() {
            assert!(
                verify_export(&mut &export[..len]).await.is_err(),
                "truncated to {len} bytes was accepted"
            );
        }
        for i in 0..export.len() {
            let mut altered = export.clone();
            altered[i] ^= 0x01;
            assert!(
                verify_export(&mut &altered[..]).await.is_err(),
                "byte {i} flipped was accepted"
            );
        }
        let mut longer = export.clone();
        longer.push(0);
        assert!(verify_export(&mut &longer[..]).await.is_err());
    }

    #[tokio::test]
    async fn an_rdb_file_is_named_as_such_when_given_as_an_export() {
        let err = verify_export(&mut &b"REDIS0010\xfa\x09redis-ver"[..])
            .await
            .unwrap_err();
        assert!(err.contains("RDB snapshot"), "{err}");
    }

    #[test]
    fn the_password_never_becomes_a_redis_cli_argument() {
        let c = CliConnection::from_url("rediss://ops%40x:p%40ss%2Fw0rd@cache.example.com:6380/2")
            .unwrap();
        assert_eq!(c.password.as_deref(), Some(&b"p@ss/w0rd"[..]));
        let args = c.args();
        assert_eq!(
            args,
            [
                "-h",
                "cache.example.com",
                "-p",
                "6380",
                "--user",
                "ops@x",
                "--tls",
                "--sni",
                "cache.example.com"
            ]
        );
        assert!(!args.iter().any(|a| a.contains("w0rd")));

        let plain = CliConnection::from_url("redis://:secret@[::1]").unwrap();
        assert_eq!(plain.args(), ["-h", "::1", "-p", "6379"]);
        assert!(CliConnection::from_url("redis-cluster://h:1").is_err());
    }

    #[test]
    fn redis_cli_failures_become_sentences() {
        assert!(
            describe_cli_error(
                "AUTH failed: WRONGPASS invalid username-password pair or user is disabled.\n",
                "exit status: 1"
            )
            .starts_with("authentication failed")
        );
        assert!(
            describe_cli_error(
                "sending REPLCONF capa eof\nSYNC with master failed: -NOPERM this user has no \
                 permissions to run the 'sync' command\n",
                "exit status: 1"
            )
            .contains("logical export instead")
        );
        assert!(
            describe_cli_error(
                "Could not connect to Redis at 127.0.0.1:1: Connection refused\n",
                "exit status: 1"
            )
            .starts_with("could not connect")
        );
    }

    #[test]
    fn databases_with_keys_come_from_info_keyspace() {
        let dbs = databases_with_keys(
            "# Keyspace\r\ndb0:keys=10,expires=2,avg_ttl=0\r\ndb3:keys=5,expires=0,avg_ttl=0\r\n",
        );
        assert_eq!(dbs, [(0, 10), (3, 5)]);
    }
}
