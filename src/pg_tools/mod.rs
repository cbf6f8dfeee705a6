//! Running `pg_dump`, `pg_restore --list` and friends for a PostgreSQL target.
//!
//! - The tool is chosen by version: the lowest installed major that is at least
//!   the server's (a newer `pg_dump` can dump an older server; the same major keeps
//!   the archive readable by that server's `pg_restore`).
//! - Connection details go in `PG*` environment variables and the password in a
//!   0600 passfile (`PGPASSFILE`) that is removed afterwards: never on the command
//!   line, where `/proc/<pid>/cmdline` would show it to every local user.
//! - Output is streamed: stdout goes through a SHA-256 hasher into the storage
//!   upload as it is produced, so memory stays flat whatever the database size.
//! - stderr is kept (the last lines) and common failures are translated into what
//!   an operator would say.
//!
//! Over 600 lines: running pg_dump, pg_restore and psql shares the connection
//! details, passfile, scratch locks, stderr explanations and streaming; the next
//! split is the dump and restore halves into files of their own (issue 15).

use std::{
    io::Write as _,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
};

use secrecy::{ExposeSecret, SecretString};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWrite};
use tokio_util::sync::CancellationToken;

use crate::{
    jobs::Progress,
    storage::{
        CopyRules,
        compress::{self, Zstd},
    },
};

/// How to reach the database, parsed from the target's URL.
#[derive(Clone)]
pub struct PgConn {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub dbname: String,
    password: Option<SecretString>,
    pub sslmode: Option<String>,
    /// TLS files named in the URL (`sslrootcert`, `sslcert`, `sslkey`, `sslcrl`),
    /// as the libpq variables that carry them: the tools get no `PG*` variable of
    /// dbops' own environment, so these go in the target's URL.
    pub ssl_files: Vec<(&'static str, String)>,
}

impl std::fmt::Debug for PgConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}@{}:{}/{}",
            self.user, self.host, self.port, self.dbname
        )
    }
}

fn decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

impl PgConn {
    /// Parses `postgres://user:password@host:port/dbname?sslmode=…&host=/socket/dir`.
    pub fn from_url(url: &str) -> Result<PgConn, String> {
        let u = url::Url::parse(url).map_err(|e| format!("the target's URL is not valid ({e})"))?;
        let mut host = u.host_str().unwrap_or("").to_string();
        let mut sslmode = None;
        let mut ssl_files = vec![];
        let mut dbname = u.path().trim_start_matches('/').to_string();
        let mut user = decode(u.username());
        for (k, v) in u.query_pairs() {
            match k.as_ref() {
                "host" => host = v.into_owned(),
                "sslmode" => sslmode = Some(v.into_owned()),
                "sslrootcert" => ssl_files.push(("PGSSLROOTCERT", v.into_owned())),
                "sslcert" => ssl_files.push(("PGSSLCERT", v.into_owned())),
                "sslkey" => ssl_files.push(("PGSSLKEY", v.into_owned())),
                "sslcrl" => ssl_files.push(("PGSSLCRL", v.into_owned())),
                "dbname" => dbname = v.into_owned(),
                "user" => user = v.into_owned(),
                _ => {}
            }
        }
        if host.is_empty() {
            host = "localhost".into();
        }
        if user.is_empty() {
            user = "postgres".into();
        }
        if dbname.is_empty() {
            dbname = user.clone();
        }
        Ok(PgConn {
            host,
            port: u.port().unwrap_or(5432),
            user,
            dbname: decode(&dbname),
            password: u.password().map(|p| SecretString::from(decode(p))),
            sslmode,
            ssl_files,
        })
    }

    /// The same server, another database.
    pub fn with_database(&self, dbname: &str) -> PgConn {
        PgConn {
            dbname: dbname.to_string(),
            ..self.clone()
        }
    }
}

/// A scratch directory, removed (with everything in it) when dropped. While it
/// lives, `<dir>.lock` next to it is held locked (flock), so that a process that
/// died (SIGKILL, OOM) leaves an unlocked lock file behind and
/// [`remove_stale_scratch`] can tell its leftovers from work in progress.
struct RemoveDir {
    dir: PathBuf,
    lock: Option<std::fs::File>,
}

impl RemoveDir {
    fn new(dir: PathBuf) -> RemoveDir {
        let lock = lock_scratch(&dir);
        RemoveDir { dir, lock }
    }
}

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        if self.lock.take().is_some() {
            let _ = std::fs::remove_file(scratch_lock_path(&self.dir));
        }
    }
}

fn scratch_lock_path(dir: &Path) -> PathBuf {
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    dir.with_file_name(format!("{name}.lock"))
}

fn flock_now(f: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor we own for the duration of the call.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Locks `<dir>.lock`: created and locked under a temporary name, then renamed,
/// so that nobody ever sees it unlocked while its owner lives.
fn lock_scratch(dir: &Path) -> Option<std::fs::File> {
    let name = dir.file_name()?.to_string_lossy().into_owned();
    let tmp = dir.with_file_name(format!(".{name}.locking"));
    let _ = std::fs::create_dir_all(dir.parent()?);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&tmp)
        .ok()?;
    if !flock_now(&f) || std::fs::rename(&tmp, scratch_lock_path(dir)).is_err() {
        let _ = std::fs::remove_file(&tmp);
        return None;
    }
    Some(f)
}

/// Removes what dead processes left in a scratch directory: each `<dir>.lock`
/// nobody holds, with its `<dir>`, and (after ten minutes) directories without a
/// lock. Work in progress, of this or another process on this machine, holds its
/// lock and is left alone. Returns how many it removed.
pub fn remove_stale_scratch(scratch: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(scratch) else {
        return 0;
    };
    let old = |p: &Path| {
        std::fs::metadata(p)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|e| e.as_secs() > 600))
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(dir) = name.strip_suffix(".lock") {
            let Ok(f) = std::fs::OpenOptions::new().write(true).open(&path) else {
                continue;
            };
            if flock_now(&f) {
                let _ = std::fs::remove_dir_all(scratch.join(dir));
                let _ = std::fs::remove_file(&path);
                removed += 1;
            }
        } else if name.ends_with(".locking") {
            if old(&path) {
                let _ = std::fs::remove_file(&path);
            }
        } else if path.is_dir() && !scratch_lock_path(&path).exists() && old(&path) {
            let _ = std::fs::remove_dir_all(&path);
            removed += 1;
        }
    }
    removed
}

/// A passfile holding one line for this connection, removed when dropped.
/// A 0600 file with the target's password, removed when dropped: keep it alive
/// while the tool runs.
pub struct PassFile(PathBuf);

impl Drop for PassFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn passfile_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace(':', "\\:")
}

fn write_passfile(conn: &PgConn) -> Result<Option<PassFile>, String> {
    let Some(pw) = &conn.password else {
        return Ok(None);
    };
    let path = std::env::temp_dir().join(format!("dbops-pgpass-{}", uuid::Uuid::new_v4().simple()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| {
            format!(
                "cannot write a passfile in {}: {e}",
                std::env::temp_dir().display()
            )
        })?;
    let line = format!(
        "*:*:*:{}:{}\n",
        passfile_escape(&conn.user),
        passfile_escape(pw.expose_secret())
    );
    f.write_all(line.as_bytes())
        .map_err(|e| format!("cannot write the passfile: {e}"))?;
    Ok(Some(PassFile(path)))
}

/// A `pg_dump`/`pg_restore`/`psql` command with the connection in its environment.
pub struct Tool {
    pub path: PathBuf,
    pub major: u32,
}

impl Tool {
    /// A command for this tool, connected through environment variables and a
    /// passfile (kept alive by the returned guard).
    pub fn command(
        &self,
        conn: &PgConn,
    ) -> Result<(tokio::process::Command, Option<PassFile>), String> {
        let pass = write_passfile(conn)?;
        // A clean environment: no PGPASSWORD/PGSERVICE/PGOPTIONS of our own, and
        // none of dbops' secrets (target URLs, DATABASE_URL, S3 keys).
        let mut cmd = crate::process::tool_command(&self.path);
        cmd.env("PGHOST", &conn.host)
            .env("PGPORT", conn.port.to_string())
            .env("PGUSER", &conn.user)
            .env("PGDATABASE", &conn.dbname)
            .env("PGAPPNAME", "dbops")
            .env("PGCONNECT_TIMEOUT", "10");
        match &pass {
            Some(p) => cmd.env("PGPASSFILE", &p.0),
            // A path that does not exist: libpq then reads no ~/.pgpass and, unlike
            // with /dev/null, warns about nothing (the warning ended up in errors).
            None => cmd.env("PGPASSFILE", "/nonexistent/dbops-no-passfile"),
        };
        if let Some(m) = &conn.sslmode {
            cmd.env("PGSSLMODE", m);
        }
        for (var, path) in &conn.ssl_files {
            cmd.env(var, path);
        }
        cmd.stdin(Stdio::null()).kill_on_drop(true);
        Ok((cmd, pass))
    }
}

/// The installed copies of a client tool (`pg_dump`, `pg_restore`, `psql`), with
/// their major versions, highest first.
pub fn installed(tool: &str) -> Vec<Tool> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin").join(tool))
                .filter(|p| p.exists())
                .collect()
        })
        .unwrap_or_default();
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(tool);
            if p.exists() {
                paths.push(p);
            }
        }
    }
    let mut tools: Vec<Tool> = paths
        .into_iter()
        .filter_map(|p| {
            let out = crate::process::tool_command_sync(&p)
                .arg("--version")
                .output()
                .ok()?;
            let text = String::from_utf8_lossy(&out.stdout);
            // "pg_dump (PostgreSQL) 15.20 (Debian …)"
            let version = text.split_whitespace().nth(2)?;
            let major = version.split('.').next()?.parse().ok()?;
            Some(Tool { path: p, major })
        })
        .collect();
    tools.sort_by_key(|t| std::cmp::Reverse(t.major));
    tools.dedup_by(|a, b| a.major == b.major);
    tools
}

/// Picks the tool for a server of `server_major`: the lowest installed major that
/// is at least the server's.
pub fn pick(tool: &str, server_major: u32) -> Result<Tool, String> {
    let all = installed(tool);
    if all.is_empty() {
        return Err(format!(
            "{tool} is not installed on the dbops machine: install the PostgreSQL client package (postgresql-client-{server_major})"
        ));
    }
    let found: Vec<String> = all.iter().map(|t| t.major.to_string()).collect();
    all.into_iter()
        .filter(|t| t.major >= server_major)
        .min_by_key(|t| t.major)
        .ok_or_else(|| {
            format!(
                "the server is PostgreSQL {server_major} but the newest {tool} here is version {} (installed: {}); a {tool} older than the server cannot work with it: install postgresql-client-{server_major}",
                found[0],
                found.join(", ")
            )
        })
}

/// The dump format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// `-Fc`: compressed, restorable selectively and in parallel. The default.
    Custom,
    /// `-Fd`: one file per table, dumped with several jobs in parallel.
    Directory,
    /// `-Fp`: a plain SQL script.
    Plain,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "custom" => Some(Format::Custom),
            "directory" => Some(Format::Directory),
            "plain" => Some(Format::Plain),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Custom => "custom",
            Format::Directory => "directory",
            Format::Plain => "plain",
        }
    }

    /// The artifact's file name ending.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Custom => "dump",
            Format::Directory => "dir.tar",
            Format::Plain => "sql",
        }
    }
}

/// What to dump and how.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DumpOptions {
    pub format: Format,
    /// Parallel jobs for the directory format.
    #[serde(default = "one")]
    pub jobs: u32,
    #[serde(default)]
    pub schema_only: bool,
    #[serde(default)]
    pub data_only: bool,
    #[serde(default)]
    pub no_owner: bool,
    #[serde(default)]
    pub schemas: Vec<String>,
    #[serde(default)]
    pub exclude_schemas: Vec<String>,
    #[serde(default)]
    pub tables: Vec<String>,
    #[serde(default)]
    pub exclude_tables: Vec<String>,
}

fn one() -> u32 {
    1
}

impl Default for DumpOptions {
    fn default() -> Self {
        DumpOptions {
            format: Format::Custom,
            jobs: 1,
            schema_only: false,
            data_only: false,
            no_owner: false,
            schemas: vec![],
            exclude_schemas: vec![],
            tables: vec![],
            exclude_tables: vec![],
        }
    }
}

impl DumpOptions {
    /// Checks the options, with a sentence for the page when they make no sense.
    pub fn validate(&self) -> Result<(), String> {
        if self.schema_only && self.data_only {
            return Err("Choose schema only or data only, not both.".into());
        }
        if self.jobs == 0 || self.jobs > 32 {
            return Err("Parallel jobs must be between 1 and 32.".into());
        }
        if self.jobs > 1 && self.format != Format::Directory {
            return Err("Parallel jobs need the directory format.".into());
        }
        for p in self
            .schemas
            .iter()
            .chain(&self.exclude_schemas)
            .chain(&self.tables)
            .chain(&self.exclude_tables)
        {
            if p.is_empty() || p.len() > 200 || p.chars().any(|c| c.is_control()) {
                return Err(format!("“{p}” is not a schema or table pattern."));
            }
        }
        Ok(())
    }

    fn args(&self) -> Vec<String> {
        let mut a = vec![
            format!(
                "--format={}",
                match self.format {
                    Format::Custom => "custom",
                    Format::Directory => "directory",
                    Format::Plain => "plain",
                }
            ),
            "--verbose".to_string(),
        ];
        if self.format == Format::Directory {
            a.push(format!("--jobs={}", self.jobs));
        }
        if self.schema_only {
            a.push("--schema-only".into());
        }
        if self.data_only {
            a.push("--data-only".into());
        }
        if self.no_owner {
            a.push("--no-owner".into());
        }
        // `--opt=value` keeps a pattern that starts with '-' from being read as an option.
        for s in &self.schemas {
            a.push(format!("--schema={s}"));
        }
        for s in &self.exclude_schemas {
            a.push(format!("--exclude-schema={s}"));
        }
        for t in &self.tables {
            a.push(format!("--table={t}"));
        }
        for t in &self.exclude_tables {
            a.push(format!("--exclude-table={t}"));
        }
        a
    }
}

/// The last lines a tool wrote to stderr, without its progress chatter.
struct StderrTail {
    lines: std::collections::VecDeque<String>,
}

impl StderrTail {
    fn push(&mut self, line: String) {
        if self.lines.len() == 20 {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }

    fn text(&self) -> String {
        self.lines.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

/// Turns a tool's stderr into the sentence an operator needs, keeping the tool's
/// own words after it.
pub fn explain(tool: &str, stderr: &str) -> String {
    let l = stderr.to_lowercase();
    let hint = if l.contains("password authentication failed") {
        Some("the target's user or password was refused (password authentication failed)")
    } else if l.contains("no pg_hba.conf entry") {
        Some("the server's pg_hba.conf does not allow this connection from the dbops machine")
    } else if l.contains("connection refused") {
        Some("the server refused the connection: is PostgreSQL running and listening there?")
    } else if l.contains("timeout expired") || l.contains("timed out") {
        Some("the server did not answer in time")
    } else if l.contains("server version mismatch")
        || l.contains("aborting because of server version mismatch")
    {
        Some("the server is newer than this pg_dump")
    } else if l.contains("permission denied") {
        Some("the target's role lacks a privilege the dump needs")
    } else if l
        .lines()
        .any(|x| x.contains("database \"") && x.contains("does not exist"))
    {
        // `database "x" does not exist` (not a schema or table that does not exist).
        Some("the database does not exist")
    } else if l.contains("could not obtain lock") || l.contains("lock timeout") {
        Some("a table was locked by another session")
    } else if l.contains("no matching tables were found")
        || l.contains("no matching schemas were found")
    {
        Some("no table or schema matches the given pattern")
    } else {
        None
    };
    let detail = stderr
        .lines()
        .filter(|line| !line.contains(": last built-in OID") && !line.trim().is_empty())
        .filter(|line| {
            let t = line.to_lowercase();
            t.contains("error")
                || t.contains("fatal")
                || t.contains("detail")
                || t.contains("hint")
                || !t.starts_with(&format!("{tool}: "))
        })
        .take(6)
        .collect::<Vec<_>>()
        .join(" / ");
    match (hint, detail.is_empty()) {
        (Some(h), true) => format!("{tool} failed: {h}"),
        (Some(h), false) => format!("{tool} failed: {h} ({detail})"),
        (None, false) => format!("{tool} failed: {detail}"),
        (None, true) => format!("{tool} failed without saying why"),
    }
}

/// What a finished dump produced.
#[derive(Debug, Clone)]
pub struct DumpResult {
    /// The stored bytes and their SHA-256.
    pub bytes: u64,
    pub sha256: String,
    /// What the tool wrote, before dbops compressed it (= `bytes` without).
    pub raw_bytes: u64,
    /// Tables whose data was dumped (from `--verbose`).
    pub tables: u64,
}

/// One `pg_dump` run: which tool, which database, what to dump, and optionally an
/// exported snapshot to dump from (so row counts taken in that snapshot match).
pub struct Dump<'a> {
    pub tool: &'a Tool,
    pub conn: &'a PgConn,
    pub opts: &'a DumpOptions,
    pub snapshot: Option<&'a str>,
    /// Compress in dbops ([`crate::storage::compress`]): `pg_dump` then writes
    /// uncompressed (`-Z0`). `None`: `pg_dump`'s own compression, as before.
    pub compress: Option<Zstd>,
}

/// Lets a tool run at the compressor's lower CPU priority: the web server's
/// threads go first while a backup runs.
fn in_background(cmd: &mut tokio::process::Command) {
    // SAFETY: between fork and exec only setpriority, a plain system call that
    // touches no memory of the parent, runs.
    unsafe {
        cmd.pre_exec(|| {
            libc::setpriority(
                libc::PRIO_PROCESS,
                0,
                crate::storage::compress::BACKGROUND_NICE,
            );
            Ok(())
        });
    }
}

impl Dump<'_> {
    /// The `pg_dump` command with its options and snapshot, stderr piped (the
    /// passfile guard must live until it ends).
    fn command(&self) -> Result<(tokio::process::Command, Option<PassFile>), String> {
        let (mut cmd, pass) = self.tool.command(self.conn)?;
        cmd.args(self.opts.args()).stderr(Stdio::piped());
        if self.compress.is_some() {
            cmd.arg("--compress=0");
        }
        if let Some(s) = self.snapshot {
            cmd.arg(format!("--snapshot={s}"));
        }
        in_background(&mut cmd);
        Ok((cmd, pass))
    }

    /// Copies what the tool writes into `out`: compressed when asked, hashed.
    async fn store(
        &self,
        input: &mut (dyn tokio::io::AsyncRead + Send + Unpin),
        out: &mut (dyn AsyncWrite + Send + Unpin),
        progress: &Progress,
        cancel: &CancellationToken,
    ) -> Result<(u64, String, u64), String> {
        match self.compress {
            Some(z) => {
                let c =
                    compress::copy_compressed(input, out, z, &|n| progress.add_bytes(n), cancel)
                        .await?;
                Ok((c.bytes, c.sha256, c.raw_bytes))
            }
            None => {
                let (bytes, sha) = copy_hashed(input, out, progress, cancel).await?;
                Ok((bytes, sha, bytes))
            }
        }
    }
}

/// Streams a custom or plain dump into `out`, hashing on the way. Cancelling the
/// token kills `pg_dump`. The caller commits or aborts `out`.
pub async fn dump_stream(
    d: &Dump<'_>,
    out: &mut (dyn AsyncWrite + Send + Unpin),
    progress: &Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<DumpResult, String> {
    if d.opts.format == Format::Directory {
        return Err("the directory format is written with dump_directory".into());
    }
    let (mut cmd, _pass) = d.command()?;
    cmd.stdout(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", d.tool.path.display()))?;
    let mut stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    let stderr_task = tokio::spawn(read_stderr(stderr, progress.clone()));

    let copy = d.store(&mut stdout, out, progress, cancel).await;
    if copy.is_err() {
        let _ = child.kill().await;
    }
    let status = child
        .wait()
        .await
        .map_err(|e| format!("waiting for pg_dump failed: {e}"))?;
    let (tail, tables) = stderr_task.await.unwrap_or_else(|_| (String::new(), 0));
    let (bytes, sha256, raw_bytes) = copy?;
    if !status.success() {
        return Err(explain("pg_dump", &tail));
    }
    Ok(DumpResult {
        bytes,
        sha256,
        raw_bytes,
        tables,
    })
}

/// Reads a tool's stderr: keeps the last lines, counts tables as their data is
/// dumped or restored.
async fn read_stderr(
    stderr: tokio::process::ChildStderr,
    progress: Arc<Progress>,
) -> (String, u64) {
    let mut tail = StderrTail {
        lines: Default::default(),
    };
    let mut tables = 0u64;
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.contains("dumping contents of table") || line.contains("processing data for table")
        {
            tables += 1;
            progress.add_items(1);
            continue;
        }
        tail.push(line);
    }
    (tail.text(), tables)
}

/// Dumps in the directory format with `--jobs` into `dir` (which must not exist),
/// then streams it as one tar archive into `out`, hashing on the way. The
/// directory is removed afterwards, whatever happens.
pub async fn dump_directory(
    d: &Dump<'_>,
    dir: &Path,
    out: &mut (dyn AsyncWrite + Send + Unpin),
    progress: &Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<DumpResult, String> {
    let _cleanup = RemoveDir::new(dir.to_path_buf());
    let (mut cmd, _pass) = d.command()?;
    cmd.arg(format!("--file={}", dir.display()))
        .stdout(Stdio::null());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", d.tool.path.display()))?;
    let stderr = child.stderr.take().expect("piped stderr");
    let stderr_task = tokio::spawn(read_stderr(stderr, progress.clone()));
    let status = tokio::select! {
        s = child.wait() => s.map_err(|e| format!("waiting for pg_dump failed: {e}"))?,
        _ = cancel.cancelled() => {
            let _ = child.kill().await;
            return Err("cancelled".into());
        }
    };
    let (tail, tables) = stderr_task.await.unwrap_or_else(|_| (String::new(), 0));
    if !status.success() {
        return Err(explain("pg_dump", &tail));
    }
    // One archive of the directory: `tar` from the machine, streamed.
    progress.set_phase("archiving");
    let mut tar = crate::process::tool_command("tar");
    tar.arg("-C")
        .arg(dir)
        .args(["-cf", "-", "."])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    in_background(&mut tar);
    let mut tar = tar.spawn().map_err(|e| format!("cannot start tar: {e}"))?;
    let mut stdout = tar.stdout.take().expect("piped stdout");
    let (bytes, sha256, raw_bytes) = d.store(&mut stdout, out, progress, cancel).await?;
    let tar_out = tar
        .wait_with_output()
        .await
        .map_err(|e| format!("tar failed: {e}"))?;
    if !tar_out.status.success() {
        return Err(format!(
            "tar failed: {}",
            String::from_utf8_lossy(&tar_out.stderr).trim()
        ));
    }
    Ok(DumpResult {
        bytes,
        sha256,
        raw_bytes,
        tables,
    })
}

/// Copies `input` into `out`, hashing and counting what is written; stops
/// when cancelled.
pub async fn copy_hashed(
    input: &mut (dyn tokio::io::AsyncRead + Send + Unpin),
    out: &mut (dyn AsyncWrite + Send + Unpin),
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<(u64, String), String> {
    let mut hashing = crate::storage::HashingWriter::new(out);
    crate::storage::copy(
        input,
        &mut hashing,
        &|n| progress.add_bytes(n),
        cancel,
        CopyRules::strict("writing the backup failed"),
    )
    .await?;
    Ok(hashing.finish())
}

/// Copies `input` into `out` (a tool's stdin, a scratch file) without hashing:
/// what a restore feeds was checked before; stops when cancelled.
async fn copy_plain(
    input: &mut (dyn tokio::io::AsyncRead + Send + Unpin),
    out: &mut (dyn AsyncWrite + Send + Unpin),
    cancel: &CancellationToken,
) -> Result<u64, String> {
    crate::storage::copy(
        input,
        out,
        &|_| {},
        cancel,
        CopyRules::strict("writing failed"),
    )
    .await
}

/// Like [`copy_hashed`], but the reader of `out` may stop early (a closed pipe):
/// the rest of `input` is then still read and hashed, just not written.
async fn copy_hashed_tee(
    input: &mut (dyn tokio::io::AsyncRead + Send + Unpin),
    out: &mut (dyn AsyncWrite + Send + Unpin),
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<(u64, String), String> {
    let mut hashing = crate::storage::HashingReader::new(input);
    crate::storage::copy(
        &mut hashing,
        out,
        &|n| progress.add_bytes(n),
        cancel,
        CopyRules {
            writing: "feeding the archive to pg_restore failed",
            reader_may_stop: true,
        },
    )
    .await?;
    hashing
        .finish()
        .await
        .map_err(|e| format!("reading failed: {e}"))
}

/// What verification found.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ListCheck {
    /// Entries in the archive's table of contents.
    pub entries: u64,
    /// Of which table data entries.
    pub table_data: u64,
    /// The tables whose data the archive holds, as `schema.table` (from the
    /// `TABLE DATA` entries, unquoted; a name with spaces is kept whole).
    #[serde(default)]
    pub tables: Vec<String>,
}

/// Feeds an archive (custom format, or a tar of a directory-format dump) to
/// `pg_restore --list`, hashing it on the way: one read both proves the archive is
/// readable and re-checks its checksum.
pub async fn verify_archive(
    restore: &Tool,
    format: Format,
    input: &mut (dyn tokio::io::AsyncRead + Send + Unpin),
    scratch: &Path,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<(ListCheck, u64, String), String> {
    match format {
        Format::Custom => {
            let mut cmd = crate::process::tool_command(&restore.path);
            cmd.arg("--list")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true);
            in_background(&mut cmd);
            let mut child = cmd
                .spawn()
                .map_err(|e| format!("cannot start pg_restore: {e}"))?;
            let mut stdin = child.stdin.take().expect("piped stdin");
            let stdout = child.stdout.take().expect("piped stdout");
            let list_task = tokio::spawn(async move {
                let mut text = String::new();
                let mut r = tokio::io::BufReader::new(stdout);
                let _ = r.read_to_string(&mut text).await;
                text
            });
            // pg_restore --list stops reading once it has the table of contents;
            // the rest of the archive is still read, to re-check the checksum of
            // every byte.
            let copied = copy_hashed_tee(input, &mut stdin, progress, cancel).await;
            drop(stdin);
            let out = child
                .wait_with_output()
                .await
                .map_err(|e| format!("pg_restore failed: {e}"))?;
            let list = list_task.await.unwrap_or_default();
            let (bytes, sha) = copied?;
            if !out.status.success() {
                return Err(explain("pg_restore", &String::from_utf8_lossy(&out.stderr)));
            }
            Ok((count_list(&list), bytes, sha))
        }
        Format::Directory => {
            // Unpack, then list the directory.
            let (unpacked, bytes, sha) = untar(input, scratch, "verify", progress, cancel).await?;
            let dir = &unpacked.dir;
            let out = crate::process::tool_command(&restore.path)
                .arg("--list")
                .arg(dir)
                .output()
                .await
                .map_err(|e| format!("cannot start pg_restore: {e}"))?;
            if !out.status.success() {
                return Err(explain("pg_restore", &String::from_utf8_lossy(&out.stderr)));
            }
            Ok((
                count_list(&String::from_utf8_lossy(&out.stdout)),
                bytes,
                sha,
            ))
        }
        Format::Plain => {
            // A plain script has no table of contents: check that pg_dump finished
            // writing it (its last line) while re-hashing.
            let mut tail = TailWriter::default();
            let (bytes, sha) = copy_hashed(input, &mut tail, progress, cancel).await?;
            if !tail.text().contains("PostgreSQL database dump complete") {
                return Err(
                    "the SQL script is incomplete: it does not end with pg_dump's completion line"
                        .into(),
                );
            }
            Ok((
                ListCheck {
                    entries: 0,
                    table_data: 0,
                    tables: vec![],
                },
                bytes,
                sha,
            ))
        }
    }
}

/// Restores an archive (custom format, or a tar of a directory-format dump) into
/// the database `conn` names, with `pg_restore --exit-on-error --no-owner`; with
/// `jobs` > 1 in parallel (a custom archive is then spooled to a scratch file
/// first, as parallel pg_restore cannot read a pipe). A restore with any error
/// fails (never "succeeded with warnings").
/// Where and how to restore.
pub struct RestoreTo<'a> {
    pub tool: &'a Tool,
    pub conn: &'a PgConn,
    pub format: Format,
    pub jobs: u32,
    /// Drop each object before re-creating it (`--clean --if-exists`): restoring
    /// over an existing database.
    pub clean: bool,
    /// More `pg_restore` options (selection, ownership, `--single-transaction`),
    /// each one argument; without `--no-owner`-style choices here, ownership and
    /// privileges are skipped (`--no-owner --no-privileges`).
    pub extra: &'a [String],
    /// Keep the archive's owners and privileges (then the role restoring must be
    /// able to set them).
    pub keep_owner: bool,
}

pub async fn restore_archive(
    to: &RestoreTo<'_>,
    input: &mut (dyn tokio::io::AsyncRead + Send + Unpin),
    scratch: &Path,
    progress: &Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<(), String> {
    let (format, jobs) = (to.format, to.jobs);
    let (mut cmd, _pass) = restore_command(to)?;
    let _cleanup;
    // A custom archive streams into pg_restore's stdin; in parallel (`jobs` > 1)
    // pg_restore needs to seek, so it is first copied to a scratch file.
    let streamed = format == Format::Custom && jobs <= 1;
    match format {
        Format::Custom if streamed => {
            cmd.stdin(Stdio::piped());
        }
        Format::Custom => {
            let dir = scratch.join(format!("restore-{}", uuid::Uuid::new_v4().simple()));
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            let guard = RemoveDir::new(dir.clone());
            let file = dir.join("archive.dump");
            let mut out = tokio::fs::File::create(&file)
                .await
                .map_err(|e| format!("cannot write {}: {e}", file.display()))?;
            copy_plain(input, &mut out, cancel).await?;
            drop(out);
            cmd.arg(format!("--jobs={jobs}")).arg(&file);
            _cleanup = guard;
        }
        Format::Directory => {
            let (dir, _, _) =
                untar(input, scratch, "restore", &Progress::default(), cancel).await?;
            cmd.arg(format!("--jobs={}", jobs.max(1))).arg(&dir.dir);
            _cleanup = dir;
        }
        Format::Plain => {
            return Err("a plain SQL backup is restored with psql, not pg_restore".into());
        }
    }
    let feed = if streamed { Some(input) } else { None };
    run_tool("pg_restore", cmd, feed, progress, cancel).await
}

/// The `pg_restore` command for `to`, without its input.
fn restore_command(
    to: &RestoreTo<'_>,
) -> Result<(tokio::process::Command, Option<PassFile>), String> {
    let (mut cmd, pass) = to.tool.command(to.conn)?;
    if to.clean {
        cmd.args(["--clean", "--if-exists"]);
    }
    if !to.keep_owner {
        cmd.args(["--no-owner", "--no-privileges"]);
    }
    cmd.args(["--exit-on-error", "--verbose"])
        .args(to.extra)
        .arg(format!("--dbname={}", to.conn.dbname))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    Ok((cmd, pass))
}

/// Restores a custom-format archive that already is a file on this machine (a
/// backup in local storage, as `pg_dump` wrote it), reading it in place: a
/// parallel `pg_restore` needs to seek, and this file can be, so no scratch copy
/// is made. The caller has checked its checksum.
pub async fn restore_archive_file(
    to: &RestoreTo<'_>,
    file: &Path,
    progress: &Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<(), String> {
    if to.format != Format::Custom {
        return Err("only a custom-format archive is restored from its file".into());
    }
    let (mut cmd, _pass) = restore_command(to)?;
    cmd.arg(format!("--jobs={}", to.jobs.max(1))).arg(file);
    run_tool("pg_restore", cmd, None, progress, cancel).await
}

/// Runs a client tool to its end: feeds `input` to its stdin when given (the
/// caller has piped stdin), keeps its stderr (counting tables into `progress`),
/// kills it when cancelled, and turns a failure into a sentence. A tool that stops
/// reading early (at its first error) shows as its own failure, not a broken pipe.
async fn run_tool(
    name: &str,
    mut cmd: tokio::process::Command,
    input: Option<&mut (dyn tokio::io::AsyncRead + Send + Unpin)>,
    progress: &Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<(), String> {
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {name}: {e}"))?;
    let stderr = child.stderr.take().expect("piped stderr");
    let stderr_task = tokio::spawn(read_stderr(stderr, progress.clone()));
    if let Some(input) = input {
        let mut stdin = child.stdin.take().expect("piped stdin");
        let fed = copy_plain(input, &mut stdin, cancel).await;
        drop(stdin);
        if let Err(e) = fed
            && !e.contains("Broken pipe")
        {
            let _ = child.kill().await;
            return Err(e);
        }
    }
    let status = tokio::select! {
        s = child.wait() => s.map_err(|e| format!("waiting for {name} failed: {e}"))?,
        _ = cancel.cancelled() => {
            let _ = child.kill().await;
            return Err("cancelled".into());
        }
    };
    let (tail, _) = stderr_task.await.unwrap_or_else(|_| (String::new(), 0));
    if !status.success() {
        return Err(explain(name, &tail));
    }
    Ok(())
}

/// Restores a plain SQL script into the database `conn` names: `psql -X -q -v
/// ON_ERROR_STOP=1` reading the script on stdin (the password in a passfile, as
/// everywhere). The first error stops it and fails the restore.
pub async fn restore_plain(
    psql: &Tool,
    conn: &PgConn,
    single_transaction: bool,
    input: &mut (dyn tokio::io::AsyncRead + Send + Unpin),
    progress: &Arc<Progress>,
    cancel: &CancellationToken,
) -> Result<(), String> {
    let (mut cmd, _pass) = psql.command(conn)?;
    cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1"]);
    if single_transaction {
        cmd.arg("--single-transaction");
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    run_tool("psql", cmd, Some(input), progress, cancel).await
}

/// Unpacks a tar stream into a new directory under `scratch` (removed when the
/// returned guard drops), hashing what it reads.
async fn untar(
    input: &mut (dyn tokio::io::AsyncRead + Send + Unpin),
    scratch: &Path,
    purpose: &str,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<(RemoveDir, u64, String), String> {
    let dir = scratch.join(format!("{purpose}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let guard = RemoveDir::new(dir.clone());
    let mut tar = crate::process::tool_command("tar")
        .arg("-C")
        .arg(&dir)
        .args(["-xf", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start tar: {e}"))?;
    let mut stdin = tar.stdin.take().expect("piped stdin");
    let (bytes, sha) = copy_hashed(input, &mut stdin, progress, cancel).await?;
    drop(stdin);
    let t = tar
        .wait_with_output()
        .await
        .map_err(|e| format!("tar failed: {e}"))?;
    if !t.status.success() {
        return Err(format!(
            "the archive does not unpack: {}",
            String::from_utf8_lossy(&t.stderr).trim()
        ));
    }
    Ok((guard, bytes, sha))
}

fn count_list(list: &str) -> ListCheck {
    let entries = list
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .count() as u64;
    // `3359; 0 16390 TABLE DATA public orders owner`: the schema, the name and
    // the owner, separated by spaces and not quoted. The owner is the last word,
    // so a table name with spaces in it (`order lines`) is everything between.
    let tables: Vec<String> = list
        .lines()
        .filter_map(|l| l.split_once(" TABLE DATA ").map(|(_, rest)| rest))
        .filter_map(|rest| {
            let words: Vec<&str> = rest.split(' ').collect();
            let name = match words.len() {
                0 | 1 => return None,
                2 => words[1].to_string(),
                n => words[1..n - 1].join(" "),
            };
            Some(format!("{}.{name}", words[0]))
        })
        .collect();
    ListCheck {
        entries,
        table_data: tables.len() as u64,
        tables,
    }
}

/// An AsyncWrite that keeps only the last 4 KiB written.
#[derive(Default)]
struct TailWriter {
    buf: Vec<u8>,
}

impl TailWriter {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf).into_owned()
    }
}

impl AsyncWrite for TailWriter {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.buf.extend_from_slice(data);
        if self.buf.len() > 8192 {
            let cut = self.buf.len() - 4096;
            self.buf.drain(..cut);
        }
        std::task::Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_list_keeps_names_with_spaces_whole() {
        let list = ";\n; Archive created at 2026-12-03\n\
                    215; 1259 16390 TABLE public orders app\n\
                    3359; 0 16390 TABLE DATA public orders app\n\
                    3360; 0 16395 TABLE DATA public order lines app\n\
                    3361; 0 16399 TABLE DATA sales q4  totals app\n";
        let c = count_list(list);
        assert_eq!(c.entries, 4);
        assert_eq!(c.table_data, 3);
        assert_eq!(
            c.tables,
            vec!["public.orders", "public.order lines", "sales.q4  totals"]
        );
    }

    #[test]
    fn urls_become_connection_details_with_the_password_kept_secret() {
        let c = PgConn::from_url("postgres://app%40x:p%3Ass@db.example:6432/shop?sslmode=require")
            .unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.user.as_str(), c.dbname.as_str()),
            ("db.example", 6432, "app@x", "shop")
        );
        assert_eq!(c.password.as_ref().unwrap().expose_secret(), "p:ss");
        assert_eq!(c.sslmode.as_deref(), Some("require"));
        assert!(!format!("{c:?}").contains("p:ss"));
        let t = PgConn::from_url("postgres://h/db?sslmode=verify-full&sslrootcert=/etc/ca.pem")
            .unwrap();
        assert_eq!(t.ssl_files, [("PGSSLROOTCERT", "/etc/ca.pem".to_string())]);
        let s = PgConn::from_url("postgresql:///shop?host=/var/run/postgresql").unwrap();
        assert_eq!(s.host, "/var/run/postgresql");
        assert_eq!(passfile_escape("a:b\\c"), "a\\:b\\\\c");
    }

    #[test]
    fn options_are_checked_and_patterns_cannot_become_flags() {
        let mut o = DumpOptions::default();
        assert!(o.validate().is_ok());
        o.jobs = 4;
        assert!(o.validate().is_err(), "jobs need the directory format");
        o.format = Format::Directory;
        assert!(o.validate().is_ok());
        o.tables = vec!["-f/etc/passwd".into()];
        assert!(o.args().contains(&"--table=-f/etc/passwd".to_string()));
        o.schema_only = true;
        o.data_only = true;
        assert!(o.validate().is_err());
    }

    #[test]
    fn scratch_left_by_a_dead_process_is_removed_and_live_scratch_is_kept() {
        let base = std::env::temp_dir().join(format!(
            "dbops-scratch-test-{}",
            uuid::Uuid::new_v4().simple()
        ));
        let live_dir = base.join("restore-live");
        std::fs::create_dir_all(&live_dir).unwrap();
        let live = RemoveDir::new(live_dir.clone());
        // A process that died: its directory and an unlocked lock file.
        let dead = base.join("restore-dead");
        std::fs::create_dir_all(&dead).unwrap();
        std::fs::write(dead.join("archive.dump"), b"x").unwrap();
        std::fs::write(base.join("restore-dead.lock"), b"").unwrap();
        assert_eq!(remove_stale_scratch(&base), 1);
        assert!(live_dir.exists() && base.join("restore-live.lock").exists());
        assert!(!dead.exists() && !base.join("restore-dead.lock").exists());
        drop(live);
        assert!(!live_dir.exists() && !base.join("restore-live.lock").exists());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn common_failures_are_explained() {
        let e = explain(
            "pg_dump",
            "pg_dump: error: connection to server at \"x\" failed: FATAL:  password authentication failed for user \"app\"",
        );
        assert!(e.contains("user or password was refused"), "{e}");
        let e = explain(
            "pg_dump",
            "pg_dump: error: aborting because of server version mismatch",
        );
        assert!(e.contains("newer than this pg_dump"), "{e}");
    }
}
