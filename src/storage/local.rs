//! Backups as files under a directory ([`LocalStorage`]).

use super::*;

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
pub(super) fn io_sentence(e: &io::Error, doing: &str, path: &Path, volume: &Path) -> String {
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

    fn local_path(&self, key: &str) -> Option<PathBuf> {
        validate_key(key).ok()?;
        let path = self.root.join(key);
        path.is_file().then_some(path)
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
