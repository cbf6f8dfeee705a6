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

// ---------------------------------------------------------------------------
// Local directory

/// Backups as files under a directory. Temporary files sit next to their final
/// name (same filesystem, so the rename that publishes them is atomic) and are
/// locked (`flock`) while being written, so [`Storage::remove_partials`] never
/// removes an upload that is still in progress, even one of another dbops process.
///
/// Directories are created 0700 and files 0600: backups hold all of a database.
/// Symbolic links inside the root are ignored by [`Storage::list`].
pub struct LocalStorage {
    root: PathBuf,
}

impl LocalStorage {
    /// Uses `root` as the backup directory, creating it (0700, with its parents)
    /// if missing.
    pub fn new(root: PathBuf) -> Result<Self, StorageError> {
        match std::fs::metadata(&root) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(StorageError::Config(format!(
                    "the backup directory {} is a file, not a directory",
                    root.display()
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                create_private_dirs(&root).map_err(|e| {
                    StorageError::Config(io_sentence(
                        &e,
                        "creating the backup directory",
                        &root,
                        &root,
                    ))
                })?;
            }
            Err(e) => {
                return Err(StorageError::Config(io_sentence(
                    &e,
                    "opening the backup directory",
                    &root,
                    &root,
                )));
            }
        }
        Ok(LocalStorage { root })
    }

    /// The backup directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn what(&self, key: &str) -> String {
        format!("backup {key} in local directory {}", self.root.display())
    }
}

/// Creates `dir` and its missing parents with mode 0700.
fn create_private_dirs(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Turns an I/O error into a sentence naming the file and, for a full or
/// read-only disk, the backup volume. `doing` reads like "writing" or "reading".
fn io_sentence(e: &io::Error, doing: &str, path: &Path, volume: &Path) -> String {
    use io::ErrorKind as K;
    let (path, volume) = (path.display(), volume.display());
    match e.kind() {
        K::StorageFull => format!("no space left on the backup volume {volume} ({doing} {path})"),
        K::QuotaExceeded => {
            format!("disk quota exceeded on the backup volume {volume} ({doing} {path})")
        }
        K::ReadOnlyFilesystem => {
            format!("the backup volume {volume} is read-only ({doing} {path})")
        }
        K::PermissionDenied => format!("permission denied {doing} {path}"),
        K::NotADirectory => {
            format!("{doing} {path} failed: part of that path is a file, not a directory")
        }
        K::AlreadyExists if doing.starts_with("creating") => {
            format!("{doing} {path} failed: a file of that name is in the way")
        }
        K::NotFound => format!("{doing} {path} failed: it does not exist"),
        _ => format!("{doing} {path} failed: {e}"),
    }
}

/// Takes the lock that marks a temporary file as being written. `Ok(false)` when
/// someone else holds it.
fn try_lock(file: &std::fs::File) -> io::Result<bool> {
    // SAFETY: flock on a file descriptor we own for the duration of the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::WouldBlock {
        Ok(false)
    } else {
        Err(e)
    }
}

fn join_error(e: tokio::task::JoinError) -> StorageError {
    StorageError::Io(format!("a storage task stopped unexpectedly: {e}"))
}

/// Visits the regular files under `dir` (recursively, skipping symbolic links),
/// calling `f(path, relative key, file name)`. Directories whose names start with
/// `.` are skipped.
fn walk_files(
    dir: &Path,
    rel: &str,
    f: &mut dyn FnMut(&Path, &str, &str) -> io::Result<()>,
) -> io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue; // not a name dbops would have made
        };
        let key = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        let file_type = entry.file_type()?;
        if file_type.is_dir() {
            if !name.starts_with('.') {
                walk_files(&entry.path(), &key, f)?;
            }
        } else if file_type.is_file() {
            f(&entry.path(), &key, &name)?;
        }
    }
    Ok(())
}

impl Storage for LocalStorage {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn describe(&self) -> String {
        format!("local directory {}", self.root.display())
    }

    fn create<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Box<dyn Upload>, StorageError>> {
        Box::pin(
            async move {
                validate_key(key)?;
                let root = self.root.clone();
                let final_path = self.root.join(key);
                let upload =
                    tokio::task::spawn_blocking(move || LocalUpload::start(root, final_path))
                        .await
                        .map_err(join_error)??;
                Ok(Box::new(upload) as Box<dyn Upload>)
            }
            .instrument(tracing::debug_span!("storage_create", kind = "local", key)),
        )
    }

    fn open<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Pin<Box<dyn AsyncRead + Send>>, StorageError>> {
        Box::pin(async move {
            validate_key(key)?;
            let path = self.root.join(key);
            let not_found = |e: &io::Error| {
                matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                )
            };
            let file = match tokio::fs::File::open(&path).await {
                Ok(f) => f,
                Err(e) if not_found(&e) => return Err(StorageError::NotFound(self.what(key))),
                Err(e) => {
                    return Err(StorageError::Io(io_sentence(
                        &e, "reading", &path, &self.root,
                    )));
                }
            };
            match file.metadata().await {
                Ok(m) if m.is_file() => {}
                Ok(_) => return Err(StorageError::NotFound(self.what(key))),
                Err(e) => {
                    return Err(StorageError::Io(io_sentence(
                        &e, "reading", &path, &self.root,
                    )));
                }
            }
            let reader = ContextReader {
                inner: tokio::io::BufReader::with_capacity(256 * 1024, file),
                path,
                root: self.root.clone(),
            };
            Ok(Box::pin(reader) as Pin<Box<dyn AsyncRead + Send>>)
        })
    }

    fn size<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<u64, StorageError>> {
        Box::pin(async move {
            validate_key(key)?;
            let path = self.root.join(key);
            match tokio::fs::metadata(&path).await {
                Ok(m) if m.is_file() => Ok(m.len()),
                Ok(_) => Err(StorageError::NotFound(self.what(key))),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                    ) =>
                {
                    Err(StorageError::NotFound(self.what(key)))
                }
                Err(e) => Err(StorageError::Io(io_sentence(
                    &e,
                    "reading the size of",
                    &path,
                    &self.root,
                ))),
            }
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(
            async move {
                validate_key(key)?;
                let path = self.root.join(key);
                match tokio::fs::remove_file(&path).await {
                    Ok(()) => Ok(()),
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                        ) =>
                    {
                        Ok(())
                    }
                    Err(e) => Err(StorageError::Io(io_sentence(
                        &e, "deleting", &path, &self.root,
                    ))),
                }
            }
            .instrument(tracing::debug_span!("storage_delete", kind = "local", key)),
        )
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, StorageError>> {
        Box::pin(async move {
            let prefix = validate_prefix(prefix)?.to_string();
            let root = self.root.clone();
            tokio::task::spawn_blocking(move || {
                let start = if prefix.is_empty() {
                    root.clone()
                } else {
                    root.join(&prefix)
                };
                let mut keys = Vec::new();
                walk_files(&start, &prefix, &mut |_, key, _| {
                    if validate_key(key).is_ok() {
                        keys.push(key.to_string());
                    }
                    Ok(())
                })
                .map_err(|e| StorageError::Io(io_sentence(&e, "listing", &start, &root)))?;
                keys.sort();
                Ok(keys)
            })
            .await
            .map_err(join_error)?
        })
    }

    fn remove_partials<'a>(&'a self) -> BoxFuture<'a, Result<u64, StorageError>> {
        Box::pin(
            async move {
                let root = self.root.clone();
                tokio::task::spawn_blocking(move || {
                    let mut removed = 0u64;
                    walk_files(&root, "", &mut |path, _, name| {
                        if !(name.starts_with('.') && name.contains(PARTIAL_MARKER)) {
                            return Ok(());
                        }
                        let file = match std::fs::File::open(path) {
                            Ok(f) => f,
                            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                            Err(e) => return Err(e),
                        };
                        // Locked: an upload (of this or another process) is writing it.
                        if try_lock(&file)? {
                            match std::fs::remove_file(path) {
                                Ok(()) => {
                                    removed += 1;
                                    tracing::info!(path = %path.display(), "removed the leftover of an unfinished backup");
                                }
                                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                                Err(e) => return Err(e),
                            }
                        }
                        Ok(())
                    })
                    .map_err(|e| {
                        StorageError::Io(io_sentence(
                            &e,
                            "removing unfinished backups in",
                            &root,
                            &root,
                        ))
                    })?;
                    Ok(removed)
                })
                .await
                .map_err(join_error)?
            }
            .instrument(tracing::debug_span!("storage_remove_partials", kind = "local")),
        )
    }
}

/// A reader whose errors name the file and the volume.
struct ContextReader<R> {
    inner: R,
    path: PathBuf,
    root: PathBuf,
}

impl<R: AsyncRead + Unpin> AsyncRead for ContextReader<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        Pin::new(&mut this.inner).poll_read(cx, buf).map_err(|e| {
            io::Error::new(e.kind(), io_sentence(&e, "reading", &this.path, &this.root))
        })
    }
}

/// A file being written under its temporary name.
struct LocalUpload {
    /// `None` once committed or aborted.
    writer: Option<tokio::io::BufWriter<tokio::fs::File>>,
    temp: PathBuf,
    final_path: PathBuf,
    root: PathBuf,
    /// Set once the temporary file is gone (renamed or removed), so `Drop` leaves it alone.
    finished: bool,
}

impl LocalUpload {
    /// Creates the parent directories and the locked temporary file (blocking).
    fn start(root: PathBuf, final_path: PathBuf) -> Result<LocalUpload, StorageError> {
        use std::os::unix::fs::OpenOptionsExt;
        let (Some(dir), Some(name)) = (final_path.parent(), final_path.file_name()) else {
            return Err(StorageError::Config(format!(
                "{} is not a file path",
                final_path.display()
            )));
        };
        create_private_dirs(dir)
            .map_err(|e| StorageError::Io(io_sentence(&e, "creating directory", dir, &root)))?;
        let temp = dir.join(format!(
            ".{}{PARTIAL_MARKER}{}",
            name.to_string_lossy(),
            uuid::Uuid::new_v4().simple()
        ));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
            .map_err(|e| StorageError::Io(io_sentence(&e, "writing", &final_path, &root)))?;
        match try_lock(&file) {
            Ok(true) => {}
            Ok(false) | Err(_) => {
                let _ = std::fs::remove_file(&temp);
                return Err(StorageError::Io(format!(
                    "could not lock the new file {}",
                    temp.display()
                )));
            }
        }
        Ok(LocalUpload {
            writer: Some(tokio::io::BufWriter::with_capacity(
                LOCAL_WRITE_BUFFER,
                tokio::fs::File::from_std(file),
            )),
            temp,
            final_path,
            root,
            finished: false,
        })
    }

    /// Names the final path in errors: that is the backup the operator knows.
    fn wrap(&self, e: io::Error) -> io::Error {
        io::Error::new(
            e.kind(),
            io_sentence(&e, "writing", &self.final_path, &self.root),
        )
    }

    fn closed() -> io::Error {
        io::Error::other("this backup upload was already committed or aborted")
    }

    /// Flush, fsync, rename, fsync the directory. The file stays open (and locked)
    /// until it carries its final name.
    async fn publish(&mut self) -> Result<(), StorageError> {
        let mut writer = self.writer.take().ok_or_else(Self::closed)?;
        let sentence = |e: &io::Error, doing: &str, path: &Path| {
            StorageError::Io(io_sentence(e, doing, path, &self.root))
        };
        writer
            .flush()
            .await
            .map_err(|e| sentence(&e, "writing", &self.final_path))?;
        let file = writer.into_inner();
        // Delayed allocation and network filesystems report a full disk here.
        file.sync_all()
            .await
            .map_err(|e| sentence(&e, "writing", &self.final_path))?;
        tokio::fs::rename(&self.temp, &self.final_path)
            .await
            .map_err(|e| sentence(&e, "publishing", &self.final_path))?;
        self.finished = true;
        let dir = self
            .final_path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.root.clone());
        let synced = {
            let dir = dir.clone();
            match tokio::task::spawn_blocking(move || std::fs::File::open(&dir)?.sync_all()).await {
                Ok(r) => r,
                Err(e) => Err(io::Error::other(e)),
            }
        };
        drop(file);
        if let Err(e) = synced {
            // Not durable: do not leave a backup that may vanish at the next crash.
            let _ = tokio::fs::remove_file(&self.final_path).await;
            return Err(sentence(&e, "syncing directory", &dir));
        }
        Ok(())
    }

    async fn discard(&mut self) -> Result<(), StorageError> {
        drop(self.writer.take());
        if self.finished {
            return Ok(());
        }
        match tokio::fs::remove_file(&self.temp).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(StorageError::Io(io_sentence(
                    &e, "removing", &self.temp, &self.root,
                )));
            }
        }
        self.finished = true;
        Ok(())
    }
}

impl AsyncWrite for LocalUpload {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let Some(w) = this.writer.as_mut() else {
            return Poll::Ready(Err(Self::closed()));
        };
        Pin::new(w).poll_write(cx, buf).map_err(|e| this.wrap(e))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let Some(w) = this.writer.as_mut() else {
            return Poll::Ready(Err(Self::closed()));
        };
        Pin::new(w).poll_flush(cx).map_err(|e| this.wrap(e))
    }

    /// Only flushes: publishing is [`Upload::commit`].
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_flush(cx)
    }
}

impl Upload for LocalUpload {
    fn commit(mut self: Box<Self>) -> BoxFuture<'static, Result<(), StorageError>> {
        let span = tracing::debug_span!("storage_commit", kind = "local", path = %self.final_path.display());
        Box::pin(
            async move {
                let result = self.publish().await;
                if result.is_err() {
                    let _ = self.discard().await;
                }
                result
            }
            .instrument(span),
        )
    }

    fn abort(mut self: Box<Self>) -> BoxFuture<'static, Result<(), StorageError>> {
        let span = tracing::debug_span!("storage_abort", kind = "local", path = %self.final_path.display());
        Box::pin(async move { self.discard().await }.instrument(span))
    }
}

impl Drop for LocalUpload {
    fn drop(&mut self) {
        if !self.finished {
            // Cancelled (dropped) without commit or abort.
            drop(self.writer.take());
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

// ---------------------------------------------------------------------------
// S3

/// How to reach an S3 (or S3-compatible: MinIO, Ceph, …) bucket.
///
/// Credentials: give `access_key_id` and `secret_access_key` (from the config
/// file or the environment, kept as a [`SecretString`]); leave both empty to use
/// the ambient AWS credentials instead (`AWS_*` environment variables, web
/// identity, or the instance/container role).
#[derive(Clone, Debug, serde::Deserialize)]
pub struct S3Settings {
    /// The bucket; it must exist already.
    pub bucket: String,
    /// Keys are stored under `prefix/`; empty for the bucket's root.
    #[serde(default)]
    pub prefix: String,
    /// For example `eu-west-1`; empty means `us-east-1`.
    #[serde(default)]
    pub region: String,
    /// An S3-compatible service's URL (`https://minio.internal:9000`), or none for AWS.
    /// Requests use path style (`endpoint/bucket/key`).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Empty, with an empty secret, to use the ambient AWS credentials.
    #[serde(default)]
    pub access_key_id: String,
    /// The secret matching `access_key_id`.
    #[serde(default = "empty_secret")]
    pub secret_access_key: SecretString,
    /// Allows an `http://` endpoint (credentials and backups then travel unencrypted).
    #[serde(default)]
    pub allow_http: bool,
}

fn empty_secret() -> SecretString {
    SecretString::from(String::new())
}

/// Backups as objects in an S3 bucket, under a prefix. An upload is a multipart
/// upload sent part by part (16 MiB, at most [`S3_PARTS_IN_FLIGHT`] in flight) that
/// becomes visible only when completed by [`Upload::commit`]; uploads under one
/// part are sent as a single PUT at commit.
///
/// Abandoned multipart uploads (a crash of dbops mid-upload) stay invisible but
/// are billed until aborted: give the bucket a lifecycle rule
/// `AbortIncompleteMultipartUpload` (for example after one day).
pub struct S3Storage {
    store: Arc<dyn ObjectStore>,
    bucket: String,
    prefix: String,
    endpoint: Option<String>,
    scrub: Arc<Scrubber>,
}

/// Removes credentials from error texts (S3 error bodies may echo the key id).
struct Scrubber(Vec<String>);

impl Scrubber {
    /// The message without credentials, an S3 XML error body reduced to its gist.
    fn clean(&self, message: &str) -> String {
        let message = self.scrub(message);
        condense_s3_error(&message).unwrap_or(message)
    }

    fn scrub(&self, message: &str) -> String {
        let mut out = message.to_string();
        for s in &self.0 {
            if !s.is_empty() {
                out = out.replace(s.as_str(), "[redacted]");
            }
        }
        out
    }
}

impl S3Storage {
    /// Builds the client (no request is made: a wrong bucket or credentials show
    /// at the first operation).
    pub fn new(cfg: &S3Settings) -> Result<Self, StorageError> {
        // object_store and other crates bring rustls; pick aws-lc-rs so none panics.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();

        let bucket = cfg.bucket.trim();
        if bucket.is_empty() {
            return Err(StorageError::Config("no S3 bucket is configured".into()));
        }
        let prefix = cfg.prefix.trim_matches('/');
        if !prefix.is_empty() {
            validate_key(prefix).map_err(|e| {
                StorageError::Config(format!("the S3 prefix {prefix:?} is not usable: {e}"))
            })?;
        }
        let region = match cfg.region.trim() {
            "" => "us-east-1",
            r => r,
        };
        let secret = cfg.secret_access_key.expose_secret();
        let builder = match (cfg.access_key_id.is_empty(), secret.is_empty()) {
            (false, false) => AmazonS3Builder::new()
                .with_access_key_id(&cfg.access_key_id)
                .with_secret_access_key(secret),
            (true, true) => AmazonS3Builder::from_env(),
            _ => {
                return Err(StorageError::Config(
                    "give both the S3 access key id and its secret, or neither (to use the \
                     ambient AWS credentials)"
                        .into(),
                ));
            }
        };
        let mut builder = builder
            .with_bucket_name(bucket)
            .with_region(region)
            .with_allow_http(cfg.allow_http)
            .with_virtual_hosted_style_request(false)
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(cfg.allow_http)
                    .with_connect_timeout(Duration::from_secs(10))
                    // No limit on a whole request (a download of a big backup may take
                    // hours); instead every request must get an answer, and every
                    // read some bytes, within 5 minutes (a 16 MiB part at ≥ 55 kB/s).
                    .with_timeout_disabled()
                    .with_read_timeout(Duration::from_secs(300)),
            );
        let mut endpoint_shown = None;
        if let Some(endpoint) = cfg
            .endpoint
            .as_deref()
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            let url = url::Url::parse(endpoint)
                .map_err(|e| StorageError::Config(format!("the S3 endpoint is not a URL ({e})")))?;
            if !url.username().is_empty() || url.password().is_some() {
                return Err(StorageError::Config(
                    "the S3 endpoint URL must not contain credentials; use access_key_id and \
                     secret_access_key"
                        .into(),
                ));
            }
            match url.scheme() {
                "https" => {}
                "http" if cfg.allow_http => {}
                "http" => {
                    return Err(StorageError::Config(format!(
                        "the S3 endpoint {url} uses plain http; set allow_http to allow it \
                         (credentials and backups would travel unencrypted)"
                    )));
                }
                other => {
                    return Err(StorageError::Config(format!(
                        "the S3 endpoint must be an http(s) URL, not {other}:"
                    )));
                }
            }
            endpoint_shown = Some(endpoint.trim_end_matches('/').to_string());
            builder = builder.with_endpoint(endpoint.trim_end_matches('/'));
        }
        let scrub = Arc::new(Scrubber(vec![
            secret.to_string(),
            cfg.access_key_id.clone(),
        ]));
        let store = builder.build().map_err(|e| {
            StorageError::Config(format!(
                "the S3 settings are not usable: {}",
                scrub.clean(&e.to_string())
            ))
        })?;
        Ok(S3Storage {
            store: Arc::new(store),
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            endpoint: endpoint_shown,
            scrub,
        })
    }

    fn location(&self, key: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(key)
        } else {
            ObjectPath::from(format!("{}/{key}", self.prefix))
        }
    }

    fn url(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}/{key}", self.bucket)
        } else {
            format!("s3://{}/{}/{key}", self.bucket, self.prefix)
        }
    }

    fn error(&self, e: object_store::Error, doing: &str, key: &str) -> StorageError {
        s3_error(&self.scrub, &self.bucket, e, doing, &self.url(key))
    }
}

/// Turns an object_store error into a sentence (without credentials).
fn s3_error(
    scrub: &Scrubber,
    bucket: &str,
    e: object_store::Error,
    doing: &str,
    url: &str,
) -> StorageError {
    let raw = e.to_string();
    tracing::debug!(error = %scrub.scrub(&raw), "S3 request failed");
    let detail = scrub.clean(&raw);
    if raw.contains("<Code>NoSuchBucket</Code>") {
        return StorageError::Config(format!(
            "the S3 bucket {bucket} does not exist ({doing} {url})"
        ));
    }
    match e {
        object_store::Error::NotFound { .. } => StorageError::NotFound(url.to_string()),
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => StorageError::Io(format!(
            "the S3 service refused {doing} {url}: check the credentials and the bucket \
                 policy ({detail})"
        )),
        _ => StorageError::Io(format!("{doing} {url} failed: {detail}")),
    }
}

/// Shortens an S3 error that carries an XML body to its status, message and code
/// (`HTTP 404 Not Found: The specified bucket does not exist (NoSuchBucket)`).
fn condense_s3_error(detail: &str) -> Option<String> {
    let tag = |t: &str| -> Option<&str> {
        let open = format!("<{t}>");
        let start = detail.find(&open)? + open.len();
        let end = start + detail[start..].find(&format!("</{t}>"))?;
        Some(&detail[start..end])
    };
    let code = tag("Code")?;
    let message = tag("Message").unwrap_or("no message");
    let status = detail
        .split_once("status code: ")
        .and_then(|(_, rest)| rest.split(':').next())
        .map(str::trim)
        .filter(|s| !s.is_empty());
    Some(match status {
        Some(status) => format!("HTTP {status}: {message} ({code})"),
        None => format!("{message} ({code})"),
    })
}

impl S3Storage {
    /// The storage `[backups.s3]` describes.
    pub fn from_config(s3: &crate::config::S3Config) -> Result<S3Storage, StorageError> {
        S3Storage::new(&S3Settings {
            bucket: s3.bucket.clone(),
            prefix: s3.prefix.clone(),
            region: s3.region.clone(),
            endpoint: s3.endpoint.clone(),
            access_key_id: s3.access_key_id.clone(),
            secret_access_key: s3.secret_access_key.clone(),
            allow_http: s3.allow_http,
        })
    }
}

/// Checkpoints of the operations log kept in the same bucket
/// (`audit-checkpoints/…`; see [`crate::audit::checkpoint`]).
impl crate::audit::checkpoint::ObjectWitness for S3Storage {
    fn put<'a>(&'a self, key: &'a str, bytes: Vec<u8>) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            use tokio::io::AsyncWriteExt;
            let mut up = self.create(key).await.map_err(|e| e.to_string())?;
            up.write_all(&bytes).await.map_err(|e| e.to_string())?;
            up.commit().await.map_err(|e| e.to_string())
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, String>> {
        Box::pin(async move { Storage::list(self, prefix).await.map_err(|e| e.to_string()) })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Vec<u8>, String>> {
        Box::pin(async move {
            use tokio::io::AsyncReadExt;
            let mut r = self.open(key).await.map_err(|e| e.to_string())?;
            let mut out = vec![];
            r.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
            Ok(out)
        })
    }
}

impl Storage for S3Storage {
    fn kind(&self) -> &'static str {
        "s3"
    }

    fn describe(&self) -> String {
        let mut out = format!("s3://{}", self.bucket);
        if !self.prefix.is_empty() {
            out.push('/');
            out.push_str(&self.prefix);
        }
        if let Some(e) = &self.endpoint {
            out.push_str(" at ");
            out.push_str(e);
        }
        out
    }

    fn create<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Box<dyn Upload>, StorageError>> {
        Box::pin(async move {
            validate_key(key)?;
            let writer =
                BufWriter::with_capacity(Arc::clone(&self.store), self.location(key), S3_PART_SIZE)
                    .with_max_concurrency(S3_PARTS_IN_FLIGHT);
            Ok(Box::new(S3Upload {
                writer: Some(writer),
                failed: None,
                url: self.url(key),
                scrub: Arc::clone(&self.scrub),
            }) as Box<dyn Upload>)
        })
    }

    fn open<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Pin<Box<dyn AsyncRead + Send>>, StorageError>> {
        Box::pin(
            async move {
                validate_key(key)?;
                let got = self
                    .store
                    .get(&self.location(key))
                    .await
                    .map_err(|e| self.error(e, "reading", key))?;
                let scrub = Arc::clone(&self.scrub);
                let url = self.url(key);
                let stream = got.into_stream().map_err(move |e| {
                    let kind = match e {
                        object_store::Error::NotFound { .. } => io::ErrorKind::NotFound,
                        _ => io::ErrorKind::Other,
                    };
                    io::Error::new(
                        kind,
                        format!("reading {url} failed: {}", scrub.clean(&e.to_string())),
                    )
                });
                Ok(Box::pin(tokio_util::io::StreamReader::new(stream))
                    as Pin<Box<dyn AsyncRead + Send>>)
            }
            .instrument(tracing::debug_span!("storage_open", kind = "s3", key)),
        )
    }

    fn size<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<u64, StorageError>> {
        Box::pin(
            async move {
                validate_key(key)?;
                let meta = self
                    .store
                    .head(&self.location(key))
                    .await
                    .map_err(|e| self.error(e, "reading the size of", key))?;
                Ok(meta.size)
            }
            .instrument(tracing::debug_span!("storage_size", kind = "s3", key)),
        )
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(
            async move {
                validate_key(key)?;
                match self.store.delete(&self.location(key)).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(self.error(e, "deleting", key)),
                }
            }
            .instrument(tracing::debug_span!("storage_delete", kind = "s3", key)),
        )
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, StorageError>> {
        Box::pin(
            async move {
                let prefix = validate_prefix(prefix)?;
                let full = match (self.prefix.is_empty(), prefix.is_empty()) {
                    (true, true) => None,
                    (false, true) => Some(ObjectPath::from(self.prefix.as_str())),
                    (true, false) => Some(ObjectPath::from(prefix)),
                    (false, false) => Some(ObjectPath::from(format!("{}/{prefix}", self.prefix))),
                };
                let strip = if self.prefix.is_empty() {
                    String::new()
                } else {
                    format!("{}/", self.prefix)
                };
                let mut stream = self.store.list(full.as_ref());
                let mut keys = Vec::new();
                while let Some(meta) = stream.next().await {
                    let meta = meta.map_err(|e| {
                        let url = match prefix {
                            "" => self.describe(),
                            p => self.url(p),
                        };
                        s3_error(&self.scrub, &self.bucket, e, "listing", &url)
                    })?;
                    if let Some(key) = meta.location.as_ref().strip_prefix(&strip)
                        && validate_key(key).is_ok()
                    {
                        keys.push(key.to_string());
                    }
                }
                keys.sort();
                Ok(keys)
            }
            .instrument(tracing::debug_span!("storage_list", kind = "s3", prefix)),
        )
    }

    /// object_store 0.14 cannot list a bucket's unfinished multipart uploads, so
    /// this removes nothing and returns `Ok(0)`. Uploads are aborted when
    /// [`Upload::abort`] is called, when a commit fails, and (in the background)
    /// when an upload is dropped; for a crash, rely on the bucket's
    /// `AbortIncompleteMultipartUpload` lifecycle rule.
    fn remove_partials<'a>(&'a self) -> BoxFuture<'a, Result<u64, StorageError>> {
        Box::pin(async { Ok(0) })
    }
}

/// An S3 multipart upload in progress.
struct S3Upload {
    /// `None` once committed or aborted.
    writer: Option<BufWriter>,
    /// The first write error: the writer must not be polled again after one.
    failed: Option<(io::ErrorKind, String)>,
    url: String,
    scrub: Arc<Scrubber>,
}

impl S3Upload {
    fn closed() -> io::Error {
        io::Error::other("this backup upload was already committed or aborted")
    }

    /// Polls the writer unless an earlier call failed, remembering a failure.
    fn guarded<T>(
        &mut self,
        poll: impl FnOnce(Pin<&mut BufWriter>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if let Some((kind, msg)) = &self.failed {
            return Poll::Ready(Err(io::Error::new(*kind, msg.clone())));
        }
        let Some(w) = self.writer.as_mut() else {
            return Poll::Ready(Err(Self::closed()));
        };
        match poll(Pin::new(w)) {
            Poll::Ready(Err(e)) => {
                let msg = format!(
                    "uploading {} failed: {}",
                    self.url,
                    self.scrub.clean(&e.to_string())
                );
                self.failed = Some((e.kind(), msg.clone()));
                Poll::Ready(Err(io::Error::new(e.kind(), msg)))
            }
            other => other,
        }
    }

    async fn abort_writer(&mut self) -> Result<(), StorageError> {
        let Some(mut w) = self.writer.take() else {
            return Ok(());
        };
        w.abort().await.map_err(|e| {
            StorageError::Io(format!(
                "aborting the upload of {} failed: {}",
                self.url,
                self.scrub.clean(&e.to_string())
            ))
        })
    }
}

impl AsyncWrite for S3Upload {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.guarded(|w| w.poll_write(cx, buf))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.guarded(|w| w.poll_flush(cx))
    }

    /// Only flushes: completing the upload is [`Upload::commit`].
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_flush(cx)
    }
}

impl Upload for S3Upload {
    fn commit(mut self: Box<Self>) -> BoxFuture<'static, Result<(), StorageError>> {
        let span = tracing::debug_span!("storage_commit", kind = "s3", url = %self.url);
        Box::pin(
            async move {
                if let Some((_, msg)) = self.failed.clone() {
                    let _ = self.abort_writer().await;
                    return Err(StorageError::Io(msg));
                }
                let mut w = self.writer.take().ok_or_else(Self::closed)?;
                // Completes the multipart upload (or sends the single PUT); on failure
                // object_store aborts the multipart upload itself.
                w.shutdown().await.map_err(|e| {
                    StorageError::Io(format!(
                        "uploading {} failed: {}",
                        self.url,
                        self.scrub.clean(&e.to_string())
                    ))
                })
            }
            .instrument(span),
        )
    }

    fn abort(mut self: Box<Self>) -> BoxFuture<'static, Result<(), StorageError>> {
        let span = tracing::debug_span!("storage_abort", kind = "s3", url = %self.url);
        Box::pin(async move { self.abort_writer().await }.instrument(span))
    }
}

impl Drop for S3Upload {
    fn drop(&mut self) {
        // Cancelled without commit or abort: abort the multipart upload in the
        // background so that its parts are not kept (and billed).
        if let Some(mut w) = self.writer.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let url = self.url.clone();
            rt.spawn(async move {
                if let Err(e) = w.abort().await {
                    tracing::warn!(%url, "could not abort a dropped upload: {e}");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
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
