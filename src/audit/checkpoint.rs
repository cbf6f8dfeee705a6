//! Signed checkpoints of the operations log, kept outside its database (issue 14).
//!
//! The hash chain in the database shows rows changed behind the app's back — by
//! anyone who cannot also recompute the chain. The role that owns the log (or a
//! superuser) can: switch the triggers off, edit a row, recompute every later
//! hash and the chain head. A checkpoint closes that: at an interval and after
//! every approved action, dbops signs (Ed25519, a key kept outside the
//! database) the chain head — its position, its hash and the time — and writes
//! it to one or more *witnesses* the database's owner does not control: a file
//! (ideally on another machine or append-only storage), an object in the S3
//! bucket (with Object Lock where the bucket has it), the webhook.
//!
//! [`verify`] reads the checkpoints back, checks their signatures and that the
//! row at each signed position still has the signed hash. Because every row's
//! hash covers the one before it, that proves every row up to the newest
//! checkpoint is exactly as it was when it was signed, and that no row up to
//! there was removed. What it cannot prove: rows after the newest checkpoint
//! (covered by the chain alone) and the removal of rows written after it.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicI64, Ordering},
};

use chrono::{DateTime, SecondsFormat, Utc};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use futures::future::BoxFuture;
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

use crate::config::CheckpointSettings;

/// The key prefix of checkpoints in an object store.
pub const OBJECT_PREFIX: &str = "audit-checkpoints/";

/// An object store a checkpoint can be kept in (the backups' S3 bucket
/// implements it), so that this module needs no storage code of its own.
pub trait ObjectWitness: Send + Sync {
    fn put<'a>(&'a self, key: &'a str, bytes: Vec<u8>) -> BoxFuture<'a, Result<(), String>>;
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, String>>;
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Vec<u8>, String>>;
}

/// One signed checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Format version.
    pub v: u32,
    /// The chain position of the newest finished row (0: an empty log).
    pub seq: i64,
    /// That row's hash (hex).
    pub head: String,
    /// When it was signed.
    pub at: DateTime<Utc>,
    /// The signing key's public half (hex).
    pub key: String,
    /// The Ed25519 signature of [`Checkpoint::message`] (hex).
    pub sig: String,
}

impl Checkpoint {
    /// The exact bytes signed.
    pub fn message(seq: i64, head: &str, at: DateTime<Utc>) -> String {
        format!(
            "dbops-checkpoint:v1:{seq}:{head}:{}",
            at.to_rfc3339_opts(SecondsFormat::Micros, true)
        )
    }

    fn signed(key: &SigningKey, seq: i64, head: String, at: DateTime<Utc>) -> Checkpoint {
        let sig = key.sign(Self::message(seq, &head, at).as_bytes());
        Checkpoint {
            v: 1,
            seq,
            head,
            at,
            key: hex::encode(key.verifying_key().as_bytes()),
            sig: hex::encode(sig.to_bytes()),
        }
    }

    /// Whether it was signed by `key` and says what it says.
    pub fn signature_ok(&self, key: &VerifyingKey) -> bool {
        let Ok(bytes) = hex::decode(&self.sig) else {
            return false;
        };
        let Ok(bytes) = <[u8; 64]>::try_from(bytes.as_slice()) else {
            return false;
        };
        key.verify(
            Self::message(self.seq, &self.head, self.at).as_bytes(),
            &Signature::from_bytes(&bytes),
        )
        .is_ok()
    }
}

fn hex32(text: &str) -> Result<[u8; 32], String> {
    let bytes = hex::decode(text.trim()).map_err(|_| "not hexadecimal".to_string())?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| "not 32 bytes".to_string())
}

/// A signing key's seed, as written by `dbops audit keygen` (64 hex digits).
pub fn parse_seed(text: &str) -> Result<SigningKey, String> {
    hex32(text).map(|b| SigningKey::from_bytes(&b))
}

/// A public key (64 hex digits).
pub fn parse_public(text: &str) -> Result<VerifyingKey, String> {
    VerifyingKey::from_bytes(&hex32(text)?).map_err(|e| e.to_string())
}

/// A new signing key: (seed hex, public key hex).
pub fn generate() -> (String, String) {
    let mut seed = [0u8; 32];
    rand::fill(&mut seed);
    let key = SigningKey::from_bytes(&seed);
    (
        hex::encode(seed),
        hex::encode(key.verifying_key().as_bytes()),
    )
}

/// The key checkpoints are verified with: the configured public key, else the
/// signing key's.
pub fn verifying_key(settings: &CheckpointSettings) -> Result<Option<VerifyingKey>, String> {
    if let Some(p) = &settings.public_key {
        return parse_public(p).map(Some);
    }
    match &settings.signing_key {
        Some(s) => Ok(Some(parse_seed(s.expose_secret())?.verifying_key())),
        None => Ok(None),
    }
}

/// The chain position this process last signed (so an idle log is not signed
/// again and again).
static LAST_SIGNED: AtomicI64 = AtomicI64::new(-1);

/// Signs the chain head now and writes it to every configured witness.
/// `Ok(None)` when checkpoints are off or the head is the one last signed.
/// A witness that fails makes the whole call fail (after trying the others):
/// a checkpoint not kept where it should be is worth an alarm.
pub async fn write(
    db: &PgPool,
    settings: &CheckpointSettings,
    object: Option<&dyn ObjectWitness>,
    webhook: impl FnOnce(String),
    force: bool,
) -> Result<Option<Checkpoint>, String> {
    let Some(seed) = settings.signing_key.as_ref().filter(|_| settings.enabled()) else {
        return Ok(None);
    };
    let key = parse_seed(seed.expose_secret())?;
    let (seq, hash): (i64, Vec<u8>) =
        sqlx::query_as("SELECT last_seq, last_hash FROM operations_chain_head")
            .fetch_one(db)
            .await
            .map_err(|e| format!("cannot read the chain head: {e}"))?;
    if !force && LAST_SIGNED.load(Ordering::Relaxed) == seq {
        return Ok(None);
    }
    let cp = Checkpoint::signed(&key, seq, hex::encode(hash), Utc::now());
    let line = serde_json::to_string(&cp).map_err(|e| e.to_string())?;
    let mut failed = vec![];
    if let Some(path) = &settings.file
        && let Err(e) = append_line(path, &line).await
    {
        failed.push(format!("file {}: {e}", path.display()));
    }
    if settings.s3 {
        match object {
            Some(o) => {
                let name = format!(
                    "{OBJECT_PREFIX}{seq:020}-{}.json",
                    cp.at.format("%Y%m%dT%H%M%S%6fZ")
                );
                if let Err(e) = o.put(&name, line.clone().into_bytes()).await {
                    failed.push(format!("S3 object {name}: {e}"));
                }
            }
            None => failed.push("S3: not configured".into()),
        }
    }
    if settings.webhook {
        webhook(format!(
            "dbops audit checkpoint: chain position {seq}, head {}, at {}, signature {} (key {})",
            cp.head,
            cp.at.to_rfc3339_opts(SecondsFormat::Micros, true),
            cp.sig,
            cp.key
        ));
    }
    if !failed.is_empty() {
        return Err(format!(
            "the checkpoint of chain position {seq} could not be written to: {}",
            failed.join("; ")
        ));
    }
    LAST_SIGNED.store(seq, Ordering::Relaxed);
    Ok(Some(cp))
}

/// Signs the log's chain head now and writes it to the configured witnesses
/// (see the module's documentation); a failure is logged (and counted), never
/// raised: the operation that asked for it has happened.
pub async fn checkpoint_now(state: &crate::state::AppState, force: bool) {
    let settings = &state.config.audit.checkpoints;
    if !settings.enabled() {
        return;
    }
    let object = state.s3_storage.as_deref().map(|s| s as &dyn ObjectWitness);
    let st = state.clone();
    match write(
        &state.db,
        settings,
        object,
        move |text| crate::notify::send(&st, "audit.checkpoint", text),
        force,
    )
    .await
    {
        Ok(Some(cp)) => tracing::debug!(seq = cp.seq, "audit checkpoint written"),
        Ok(None) => {}
        Err(e) => {
            metrics::counter!("dbops_audit_checkpoint_failures_total").increment(1);
            tracing::error!(error = %e, "could not write an audit checkpoint");
        }
    }
}

async fn append_line(path: &Path, line: &str) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| e.to_string())?;
    }
    let mut f = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await
        .map_err(|e| e.to_string())?;
    f.write_all(format!("{line}\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    f.sync_data().await.map_err(|e| e.to_string())
}

/// Every checkpoint the witnesses hold (file lines and S3 objects), oldest
/// first; lines that are not checkpoints are reported, not skipped silently.
pub async fn read_all(
    settings: &CheckpointSettings,
    object: Option<&dyn ObjectWitness>,
) -> Result<(Vec<Checkpoint>, Vec<String>), String> {
    let mut out = vec![];
    let mut unreadable = vec![];
    if let Some(path) = &settings.file {
        match tokio::fs::read_to_string(path).await {
            Ok(text) => {
                for (i, line) in text.lines().enumerate() {
                    if line.trim().is_empty() {
                        continue;
                    }
                    match serde_json::from_str::<Checkpoint>(line) {
                        Ok(c) => out.push(c),
                        Err(_) => unreadable.push(format!("{} line {}", path.display(), i + 1)),
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        }
    }
    if settings.s3
        && let Some(o) = object
    {
        for name in o.list(OBJECT_PREFIX).await? {
            let bytes = o.get(&name).await?;
            match serde_json::from_slice::<Checkpoint>(&bytes) {
                Ok(c) => out.push(c),
                Err(_) => unreadable.push(format!("S3 object {name}")),
            }
        }
    }
    out.sort_by(|a, b| a.seq.cmp(&b.seq).then(a.at.cmp(&b.at)));
    out.dedup();
    Ok((out, unreadable))
}

/// What checking the log against its checkpoints found.
#[derive(Debug, Clone, Default)]
pub struct CheckpointReport {
    /// Checkpoints read and correctly signed.
    pub valid: usize,
    /// The newest correctly signed checkpoint.
    pub newest: Option<Checkpoint>,
    /// The log's newest chain position.
    pub log_end: i64,
    /// The first thing that is wrong, as a sentence.
    pub problem: Option<String>,
}

impl CheckpointReport {
    /// What this proves and what it does not, in words.
    pub fn statement(&self) -> String {
        match (&self.problem, &self.newest) {
            (Some(p), _) => p.clone(),
            (None, None) => "No signed checkpoint was found: only the hash chain in the database \
                             vouches for the log, and whoever can rewrite that chain (its owner, a \
                             superuser) could change it unnoticed."
                .into(),
            (None, Some(c)) => format!(
                "{} signed checkpoint(s) verified. The newest, signed at {}, covers chain positions 1 to {}: \
                 those rows are exactly as they were then and none of them was removed. The {} row(s) after \
                 it are covered by the hash chain only (someone able to rewrite the chain could change or \
                 remove them unnoticed until the next checkpoint).",
                self.valid,
                c.at.to_rfc3339_opts(SecondsFormat::Secs, true),
                c.seq,
                (self.log_end - c.seq).max(0)
            ),
        }
    }
}

/// Checks the log against every checkpoint the witnesses hold.
pub async fn verify(
    db: &PgPool,
    settings: &CheckpointSettings,
    object: Option<&dyn ObjectWitness>,
) -> Result<CheckpointReport, String> {
    let log_end = sqlx::query_scalar::<_, Option<i64>>("SELECT max(chain_seq) FROM operations")
        .fetch_one(db)
        .await
        .map_err(|e| e.to_string())?
        .unwrap_or(0);
    let mut report = CheckpointReport {
        log_end,
        ..Default::default()
    };
    let Some(key) = verifying_key(settings)? else {
        report.problem = Some(
            "Checkpoints are not set up ([audit.checkpoints] has no key): nothing outside the \
             database vouches for the log."
                .into(),
        );
        return Ok(report);
    };
    let (all, unreadable) = read_all(settings, object).await?;
    if let Some(u) = unreadable.first() {
        report.problem = Some(format!(
            "{u} is not a checkpoint: the witness was altered (or is not dbops')."
        ));
        return Ok(report);
    }
    let expected = hex::encode(key.as_bytes());
    for c in &all {
        if c.key != expected || !c.signature_ok(&key) {
            report.problem = Some(format!(
                "The checkpoint of chain position {} at {} is not signed by this dbops' key: it was forged or \
                 altered.",
                c.seq, c.at
            ));
            return Ok(report);
        }
    }
    report.valid = all.len();
    let seqs: Vec<i64> = all.iter().map(|c| c.seq).filter(|s| *s > 0).collect();
    let rows: std::collections::HashMap<i64, Vec<u8>> = sqlx::query_as::<_, (i64, Vec<u8>)>(
        "SELECT chain_seq, hash FROM operations WHERE chain_seq = ANY($1)",
    )
    .bind(&seqs)
    .fetch_all(db)
    .await
    .map_err(|e| e.to_string())?
    .into_iter()
    .collect();
    for c in &all {
        if c.seq == 0 {
            continue;
        }
        match rows.get(&c.seq) {
            None => {
                report.problem = Some(format!(
                    "The log ends at chain position {}, but a checkpoint signed at {} saw position {}: rows \
                     were removed from the log.",
                    report.log_end, c.at, c.seq
                ));
                return Ok(report);
            }
            Some(h) if hex::encode(h) != c.head => {
                report.problem = Some(format!(
                    "The row at chain position {} is not the one a checkpoint signed at {} saw: rows up to it \
                     were altered or removed and the chain recomputed.",
                    c.seq, c.at
                ));
                return Ok(report);
            }
            Some(_) => {}
        }
    }
    report.newest = all.last().cloned();
    Ok(report)
}

/// Where a key file is written by `dbops audit keygen`: 0600, never over an
/// existing file.
pub fn write_key_file(path: &PathBuf, seed_hex: &str) -> Result<(), String> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    f.write_all(format!("{seed_hex}\n").as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_verifies_with_its_key_and_not_when_anything_in_it_changes() {
        let (seed, public) = generate();
        let key = parse_seed(&seed).unwrap();
        let public = parse_public(&public).unwrap();
        let at = Utc::now();
        let cp = Checkpoint::signed(&key, 42, "ab".repeat(32), at);
        assert!(cp.signature_ok(&public));
        let mut moved = cp.clone();
        moved.seq = 41;
        assert!(!moved.signature_ok(&public));
        let mut other = cp.clone();
        other.head = "cd".repeat(32);
        assert!(!other.signature_ok(&public));
        let (_, stranger) = generate();
        assert!(!cp.signature_ok(&parse_public(&stranger).unwrap()));
        assert!(parse_seed("xyz").is_err() && parse_seed(&"a".repeat(62)).is_err());
    }
}
