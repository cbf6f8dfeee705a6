//! Where backup artifacts are kept: a local directory ([`LocalStorage`]) or an S3
//! bucket ([`S3Storage`]), behind one [`Storage`] trait.
//!
//! Writing is two-phase. [`Storage::create`] hands out an [`Upload`] that the caller
//! streams bytes into (`tokio::io::copy(&mut pg_dump_stdout, &mut upload)`); nothing
//! is visible under the key until [`Upload::commit`] has made the bytes durable and
//! published them. [`Upload::abort`] — or simply dropping the upload, as happens
//! when the task is cancelled — leaves nothing behind. Memory stays flat whatever
//! the size: a 1 MiB write buffer for files, at most three 16 MiB parts for S3.
//!
//! Keys are relative, `/`-separated names chosen by dbops (`pg/prod/2024-…dump`);
//! [`validate_key`] refuses anything that could leave the storage root.
//!
//! Error texts are sentences an operator can act on ("no space left on the backup
//! volume /var/lib/dbops/backups …") and never contain credentials.

pub mod compress;
mod hashing;
mod local;
mod s3;

pub use hashing::{CopyRules, HashingReader, HashingWriter, copy};
pub use local::LocalStorage;
pub use s3::{S3Settings, S3Storage};

use std::{
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::{StreamExt, TryStreamExt, future::BoxFuture};
use object_store::{
    ClientOptions, ObjectStore, ObjectStoreExt, aws::AmazonS3Builder, buffered::BufWriter,
    path::Path as ObjectPath,
};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tracing::Instrument;

/// The longest key [`validate_key`] accepts, in bytes.
pub const MAX_KEY_LEN: usize = 512;

/// The longest single segment (file or directory name) of a key, in bytes; leaves
/// room under the usual 255-byte file-name limit for the temporary name.
pub const MAX_SEGMENT_LEN: usize = 200;

/// Size of one S3 multipart part. S3 allows 10 000 parts, so one object can hold
/// up to about 160 GB.
const S3_PART_SIZE: usize = 16 * 1024 * 1024;

/// Parts sent to S3 at the same time (each held in memory until it is sent).
const S3_PARTS_IN_FLIGHT: usize = 2;

/// Write buffer in front of a local file, so small writes from a pipe do not each
/// become a system call.
const LOCAL_WRITE_BUFFER: usize = 1024 * 1024;

/// Marker in the names of local temporary files: `.<name>.partial-<uuid>`.
const PARTIAL_MARKER: &str = ".partial-";

/// What can go wrong while storing or reading a backup. Every variant carries a
/// sentence meant for the operator; none contains a credential.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Nothing is stored under the key; the text says which key and where.
    #[error("{0} does not exist")]
    NotFound(String),
    /// Reading or writing failed (full disk, refused permission, the S3 service
    /// unreachable or refusing the request, …).
    #[error("{0}")]
    Io(String),
    /// The storage is set up wrongly (a bad directory, bucket or endpoint), or a key
    /// was refused.
    #[error("{0}")]
    Config(String),
}

impl From<io::Error> for StorageError {
    /// I/O errors raised by an [`Upload`] or by a reader from [`Storage::open`]
    /// already carry a readable sentence, so `?` on them keeps it.
    fn from(e: io::Error) -> Self {
        StorageError::Io(e.to_string())
    }
}

/// A backup being written. Write the bytes through [`AsyncWrite`], then call
/// exactly one of [`Upload::commit`] or [`Upload::abort`].
///
/// `shutdown()` only flushes: it does **not** publish. Dropping an upload without
/// committing it discards it (the local temporary file is removed at once; an S3
/// multipart upload is aborted in the background).
pub trait Upload: AsyncWrite + Send + Unpin {
    /// Flushes, makes durable (fsync for files), and publishes under the final key.
    /// An existing object under the same key is replaced. On error nothing is
    /// published and nothing is left behind.
    fn commit(self: Box<Self>) -> BoxFuture<'static, Result<(), StorageError>>;
    /// Discards everything written; nothing remains under the temporary or final name.
    fn abort(self: Box<Self>) -> BoxFuture<'static, Result<(), StorageError>>;
}

/// A place where backup artifacts are kept.
pub trait Storage: Send + Sync {
    /// `"local"` or `"s3"`.
    fn kind(&self) -> &'static str;
    /// Where the backups go, for pages and logs (`local directory /var/lib/dbops/backups`,
    /// `s3://bucket/prefix`); never contains a secret.
    fn describe(&self) -> String;
    /// Starts writing `key`; nothing is visible under it until [`Upload::commit`].
    fn create<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Box<dyn Upload>, StorageError>>;
    /// Streams a committed object back.
    fn open<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Pin<Box<dyn AsyncRead + Send>>, StorageError>>;
    /// The size in bytes of a committed object.
    fn size<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<u64, StorageError>>;
    /// Deletes a committed object; deleting what does not exist succeeds.
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StorageError>>;
    /// Committed keys under `prefix`, sorted. The prefix is made of whole key
    /// segments (`pg/prod` lists `pg/prod/…`, not `pg/production/…`); `""` lists
    /// everything. Uploads in progress are never listed.
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, StorageError>>;
    /// Leftovers of uploads that never committed (temp files), for clean-up after a crash.
    /// Returns how many were removed.
    fn remove_partials<'a>(&'a self) -> BoxFuture<'a, Result<u64, StorageError>>;
    /// The file a committed object is, when the storage is a local directory: a
    /// tool that needs to seek (parallel `pg_restore`) reads it in place instead
    /// of from a copy. `None` for remote storage.
    fn local_path(&self, key: &str) -> Option<PathBuf> {
        let _ = key;
        None
    }
}

/// Checks that `key` is a relative, `/`-separated name that stays inside the
/// storage root: segments of `[A-Za-z0-9._-]`, none empty, none starting with `.`
/// (which rules out `.`, `..` and the names of temporary files), no leading `/`,
/// at most [`MAX_KEY_LEN`] bytes in all and [`MAX_SEGMENT_LEN`] per segment.
pub fn validate_key(key: &str) -> Result<(), StorageError> {
    let refuse = |why: &str| {
        let shown: String = key.chars().take(80).collect();
        let more = if shown.len() < key.len() { "…" } else { "" };
        Err(StorageError::Config(format!(
            "refused backup key {shown:?}{more}: {why}"
        )))
    };
    if key.is_empty() {
        return refuse("it is empty");
    }
    if key.len() > MAX_KEY_LEN {
        return refuse(&format!("it is longer than {MAX_KEY_LEN} bytes"));
    }
    if key.starts_with('/') {
        return refuse("it must be relative (no leading '/')");
    }
    for segment in key.split('/') {
        if segment.is_empty() {
            return refuse("it has an empty segment ('//' or a trailing '/')");
        }
        if segment.starts_with('.') {
            return refuse("no segment may start with '.' (this includes '..')");
        }
        if segment.len() > MAX_SEGMENT_LEN {
            return refuse(&format!("a segment is longer than {MAX_SEGMENT_LEN} bytes"));
        }
        if !segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return refuse("only letters, digits, '.', '_', '-' and '/' are allowed");
        }
    }
    Ok(())
}

/// Checks a listing prefix: empty, or a valid key (a trailing `/` is ignored).
/// Returns it without the trailing `/`.
fn validate_prefix(prefix: &str) -> Result<&str, StorageError> {
    let p = prefix.strip_suffix('/').unwrap_or(prefix);
    if !p.is_empty() {
        validate_key(p)?;
    }
    Ok(p)
}

/// Reads a stored object to the end and returns its SHA-256 (lower-case hex) and
/// its length in bytes: a streaming re-read, for verifying a backup after commit.
pub async fn sha256_of(storage: &dyn Storage, key: &str) -> Result<(String, u64), StorageError> {
    let mut reader = storage.open(key).await?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), total))
}

#[cfg(test)]
mod tests {
    use super::local::io_sentence;
    use super::s3::{Scrubber, condense_s3_error};
    use super::*;

    #[test]
    fn keys_that_could_leave_the_root_are_refused() {
        for bad in [
            "",
            "/etc/x",
            "../x",
            "a/../../b",
            "a//b",
            "a/",
            "./a",
            "a/./b",
            ".hidden",
            "a/.x.dump.partial-123",
            "a\\b",
            "a b",
            "é",
            "a\0b",
        ] {
            assert!(validate_key(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(validate_key(&"a".repeat(MAX_KEY_LEN + 1)).is_err());
        assert!(validate_key(&"a".repeat(MAX_SEGMENT_LEN + 1)).is_err());
        for good in [
            "a",
            "pg/prod/2024-05-01T02-00-00Z.dump",
            "redis/r1/x_y.rdb.gz",
        ] {
            validate_key(good).unwrap();
        }
    }

    #[test]
    fn refused_keys_are_named_in_the_error() {
        let e = validate_key("../x").unwrap_err().to_string();
        assert!(e.contains("\"../x\""), "{e}");
    }

    #[test]
    fn disk_errors_read_as_sentences() {
        let p = Path::new("/b/pg/x.dump");
        let v = Path::new("/b");
        let full = io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(
            io_sentence(&full, "writing", p, v),
            "no space left on the backup volume /b (writing /b/pg/x.dump)"
        );
        let denied = io::Error::from_raw_os_error(libc::EACCES);
        assert_eq!(
            io_sentence(&denied, "writing", p, v),
            "permission denied writing /b/pg/x.dump"
        );
        let ro = io::Error::from_raw_os_error(libc::EROFS);
        assert!(io_sentence(&ro, "writing", p, v).contains("is read-only"));
    }

    #[test]
    fn credentials_are_scrubbed_from_s3_errors() {
        let s = Scrubber(vec!["AKIDEXAMPLE".into(), "s3cr3t".into()]);
        assert_eq!(
            s.clean("<AWSAccessKeyId>AKIDEXAMPLE</AWSAccessKeyId> s3cr3t"),
            "<AWSAccessKeyId>[redacted]</AWSAccessKeyId> [redacted]"
        );
    }

    #[test]
    fn s3_error_bodies_are_reduced_to_their_gist() {
        let raw = "Error performing PUT http://h/b/k in 21ms - Server returned non-2xx status \
                   code: 404 Not Found: <?xml version=\"1.0\"?>\n<Error><Code>NoSuchBucket</Code>\
                   <Message>The specified bucket does not exist</Message><RequestId>x</RequestId></Error>";
        assert_eq!(
            condense_s3_error(raw).unwrap(),
            "HTTP 404 Not Found: The specified bucket does not exist (NoSuchBucket)"
        );
        assert_eq!(condense_s3_error("connection refused"), None);
    }

    #[test]
    fn s3_settings_refuse_plain_http_unless_allowed_and_hide_the_secret() {
        let mut cfg = S3Settings {
            bucket: "b".into(),
            prefix: "/dbops/".into(),
            region: String::new(),
            endpoint: Some("http://127.0.0.1:9000".into()),
            access_key_id: "AKID".into(),
            secret_access_key: SecretString::from("hunter2".to_string()),
            allow_http: false,
        };
        let e = S3Storage::new(&cfg).err().unwrap().to_string();
        assert!(e.contains("allow_http"), "{e}");
        cfg.allow_http = true;
        let s = S3Storage::new(&cfg).unwrap();
        assert_eq!(s.describe(), "s3://b/dbops at http://127.0.0.1:9000");
        assert!(!format!("{cfg:?}").contains("hunter2"));
        cfg.access_key_id.clear();
        assert!(S3Storage::new(&cfg).is_err(), "a secret without a key id");
    }
}
