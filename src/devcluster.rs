//! Throwaway PostgreSQL clusters and Redis servers built from the machine's own binaries.
//!
//! Used by `dbops demo` and by the integration tests when no real PostgreSQL/Redis is
//! reachable (and by fault tests that stop and restart a server). Everything lives in a
//! caller-supplied base directory; nothing is registered with the system's service manager.
//!
//! * [`ensure_binaries`] finds `initdb`/`pg_ctl` and `redis-server`, installing the Debian
//!   packages with `apt-get` when they are missing and that is possible.
//! * [`PgCluster`] runs `initdb` + `pg_ctl` on a free `127.0.0.1` port with trust
//!   authentication (there is no password anywhere). When the process runs as root, the
//!   cluster is created and run as the `postgres` system user, because PostgreSQL refuses to
//!   run as root; the base directory is then chowned to that user.
//! * [`RedisServer`] runs `redis-server` as a child process without persistence.
//!
//! Keep base directories short and world-traversable (e.g. a fresh directory under `/tmp`):
//! PostgreSQL puts its Unix socket there and socket paths are limited to ~107 bytes.
//!
//! Over 600 lines: one throwaway PostgreSQL or Redis server's life (find the
//! binaries, install them, pick a port, run as the postgres user, start, wait,
//! stop) is one sequence that reads best in one place; the tests take the last 130
//! lines.

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use sqlx::Connection as _;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgSslMode};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Name of the database superuser created by `initdb -U`.
pub const PG_SUPERUSER: &str = "postgres";
/// System user the cluster runs as when this process runs as root.
const PG_SYSTEM_USER: &str = "postgres";
/// How many times a start is retried on a fresh port when the chosen one got taken.
const PORT_ATTEMPTS: usize = 5;
/// Longest base dir for which `<base>/.s.PGSQL.<port>.lock` still fits in `sun_path`.
const MAX_SOCKET_DIR_LEN: usize = 107 - "/.s.PGSQL.65535.lock".len();

// ---------------------------------------------------------------------------------------------
// Binaries
// ---------------------------------------------------------------------------------------------

/// Makes sure the PostgreSQL server binaries (`initdb`, `pg_ctl`, `postgres`) and
/// `redis-server` are available, installing them when they are not.
///
/// PostgreSQL is looked up on `PATH` first (following symlinks to the real bin directory),
/// then in the highest `/usr/lib/postgresql/<version>/bin`; `redis-server` on `PATH`.
///
/// When something is missing and the process runs as root, this runs `apt-get update` and
/// `DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends` for the
/// missing packages (`postgresql`, `redis-server`), telling the user on stderr what it
/// installs and why. When not root it tries the same through passwordless `sudo -n`.
/// Otherwise it fails with a message naming the packages to install.
///
/// This is blocking (it may run apt for a minute); from async code call it through
/// `tokio::task::spawn_blocking`.
pub fn ensure_binaries() -> Result<()> {
    let missing = missing_packages();
    if missing.is_empty() {
        return Ok(());
    }
    let packages: Vec<&str> = missing.iter().map(|(pkg, _)| *pkg).collect();
    let what: Vec<&str> = missing.iter().map(|(_, what)| *what).collect();
    let manual_hint = format!(
        "install them and try again, e.g. `sudo apt-get install {}` on Debian/Ubuntu, or put \
         the binaries on PATH",
        packages.join(" ")
    );

    let Some(apt_get) = find_executable("apt-get", &["/usr/bin/apt-get"]) else {
        bail!(
            "{} not found and apt-get is not available to install them; {manual_hint}",
            what.join(" and ")
        );
    };

    // The command prefix that gives us root: nothing when we are root, `sudo -n` otherwise.
    let prefix: Vec<String> = if is_root() {
        Vec::new()
    } else {
        let Some(sudo) = find_executable("sudo", &["/usr/bin/sudo"]) else {
            bail!(
                "{} not found, not running as root and sudo is not available; {manual_hint}",
                what.join(" and ")
            );
        };
        let sudo_ok = crate::process::tool_command_sync(&sudo)
            .args(["-n", "true"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !sudo_ok {
            bail!(
                "{} not found, not running as root and passwordless `sudo -n` is not \
                 possible; {manual_hint}",
                what.join(" and ")
            );
        }
        vec![sudo.to_string_lossy().into_owned(), "-n".to_owned()]
    };

    eprintln!(
        "dbops: {} not found; installing the package(s) {} with apt-get{} so that throwaway \
         PostgreSQL/Redis servers can be started",
        what.join(" and "),
        packages.join(" "),
        if prefix.is_empty() { "" } else { " (via sudo)" },
    );

    let apt = apt_get.to_string_lossy().into_owned();
    let mut update: Vec<String> = prefix.clone();
    update.extend([apt.clone(), "update".to_owned()]);
    if let Err(err) = run_to_stderr(&update) {
        // A stale package index may still be good enough; let the install decide.
        eprintln!("dbops: `apt-get update` failed ({err:#}); trying the install anyway");
    }

    let mut install: Vec<String> = prefix;
    install.extend(
        [
            "env",
            "DEBIAN_FRONTEND=noninteractive",
            &apt,
            "install",
            "-y",
            "--no-install-recommends",
        ]
        .map(str::to_owned),
    );
    install.extend(packages.iter().map(|p| (*p).to_owned()));
    run_to_stderr(&install)
        .with_context(|| format!("installing {} failed; {manual_hint}", packages.join(" ")))?;

    let still_missing = missing_packages();
    if !still_missing.is_empty() {
        let what: Vec<&str> = still_missing.iter().map(|(_, what)| *what).collect();
        bail!(
            "{} still not found after installing {}; {manual_hint}",
            what.join(" and "),
            packages.join(" ")
        );
    }
    eprintln!("dbops: installed {}", packages.join(" "));
    Ok(())
}

/// The packages whose binaries are missing, with a human description of what is missing.
fn missing_packages() -> Vec<(&'static str, &'static str)> {
    let mut missing = Vec::new();
    if find_pg_bin_dir().is_none() {
        missing.push(("postgresql", "PostgreSQL server binaries (initdb, pg_ctl)"));
    }
    if find_redis_server().is_none() {
        missing.push(("redis-server", "redis-server"));
    }
    missing
}

/// Runs a command (argv) with stdout and stderr both sent to our stderr.
fn run_to_stderr(argv: &[String]) -> Result<()> {
    let (program, args) = argv.split_first().context("empty command")?;
    let mut cmd = crate::process::tool_command_sync(program);
    // apt-get may need the machine's proxy to reach its mirrors.
    crate::process::inherit(
        &mut cmd,
        &[
            "http_proxy",
            "https_proxy",
            "no_proxy",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "NO_PROXY",
        ],
    );
    let status = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::io::stderr())
        .stderr(std::io::stderr())
        .status()
        .with_context(|| format!("could not run {program}"))?;
    if !status.success() {
        bail!("`{}` exited with {status}", argv.join(" "));
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Looks `name` up on `PATH`, then in the given fallback locations.
fn find_executable(name: &str, fallbacks: &[&str]) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .filter(|dir| dir.is_absolute())
            .map(|dir| dir.join(name))
            .find(|candidate| is_executable(candidate))
    });
    on_path.or_else(|| {
        fallbacks
            .iter()
            .map(PathBuf::from)
            .find(|candidate| is_executable(candidate))
    })
}

/// A directory holding `initdb`, `pg_ctl` and `postgres` together.
fn is_pg_bin_dir(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"]
        .iter()
        .all(|bin| is_executable(&dir.join(bin)))
}

/// Finds the PostgreSQL server bin directory: `initdb` on `PATH` (its real location, so a
/// symlink in /usr/local/bin leads to /usr/lib/postgresql/N/bin), then the highest
/// `/usr/lib/postgresql/<version>/bin`.
fn find_pg_bin_dir() -> Option<PathBuf> {
    if let Some(initdb) = find_executable("initdb", &[]) {
        let mut candidates = Vec::new();
        if let Some(dir) = std::fs::canonicalize(&initdb)
            .ok()
            .and_then(|real| real.parent().map(Path::to_path_buf))
        {
            candidates.push(dir);
        }
        if let Some(dir) = initdb.parent() {
            candidates.push(dir.to_path_buf());
        }
        if let Some(dir) = candidates.into_iter().find(|dir| is_pg_bin_dir(dir)) {
            return Some(dir);
        }
    }

    let mut versions: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version = name
                .split('.')
                .map(|part| part.parse::<u32>().ok())
                .collect::<Option<Vec<u32>>>()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, bin)| is_pg_bin_dir(bin))
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn find_redis_server() -> Option<PathBuf> {
    find_executable(
        "redis-server",
        &["/usr/bin/redis-server", "/usr/local/bin/redis-server"],
    )
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

/// A port that was free a moment ago on 127.0.0.1 (bind to port 0, read it, release it).
fn pick_free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))
        .context("could not bind 127.0.0.1:0 to find a free port")?;
    Ok(listener.local_addr()?.port())
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// The log text written after byte `offset`.
fn log_since(path: &Path, offset: u64) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let start = usize::try_from(offset).unwrap_or(0).min(bytes.len());
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// The last `lines` lines of a log file, formatted for an error message.
fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => format_tail(path, &String::from_utf8_lossy(&bytes), lines),
        Err(err) => format!("could not read {}: {err}", path.display()),
    }
}

/// The last `lines` lines of `text` (read from `path`), formatted for an error message.
fn format_tail(path: &Path, text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let tail = all[all.len().saturating_sub(lines)..].join("\n");
    if tail.trim().is_empty() {
        format!("(nothing new in {})", path.display())
    } else {
        format!("last lines of {}:\n{tail}", path.display())
    }
}

fn output_text(output: &Output) -> String {
    let mut text = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !stderr.trim().is_empty() {
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(stderr.trim());
    }
    text
}

fn shell_quote(arg: &str) -> String {
    format!("'{}'", arg.replace('\'', r"'\''"))
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("path {} is not valid UTF-8", path.display()))
}

/// Creates `base_dir` (and parents) and returns its absolute, symlink-free form.
fn prepare_base_dir(base_dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(base_dir)
        .with_context(|| format!("could not create {}", base_dir.display()))?;
    std::fs::canonicalize(base_dir)
        .with_context(|| format!("could not resolve {}", base_dir.display()))
}

/// uid and gid of a system user.
fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let cname = CString::new(name).ok()?;
    // SAFETY: `passwd` is plain old data; getpwnam_r only writes into `pwd` and `buf`, which
    // outlive the call, and we read uid/gid (not the pointers into `buf`) afterwards.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        );
        if rc != 0 || result.is_null() {
            return None;
        }
        Some((pwd.pw_uid, pwd.pw_gid))
    }
}

// ---------------------------------------------------------------------------------------------
// Running PostgreSQL tools as the right user
// ---------------------------------------------------------------------------------------------

/// How PostgreSQL tools are run: as ourselves, or (when we are root) as the `postgres` user.
#[derive(Debug, Clone)]
enum RunAs {
    /// Directly, as the current (non-root) user.
    CurrentUser,
    /// `runuser -u <user> -- <program> <args>`.
    Runuser { runuser: PathBuf, user: String },
    /// `su <user> -s /bin/sh -c '<program> <args>'` (when runuser is not available).
    Su { su: PathBuf, user: String },
}

/// The system user PostgreSQL runs as when we are root: (name, uid, gid).
#[derive(Debug, Clone)]
struct SystemUser {
    name: String,
    uid: u32,
    gid: u32,
}

impl RunAs {
    /// Decides how to run PostgreSQL tools in this process.
    fn detect() -> Result<(RunAs, Option<SystemUser>)> {
        if !is_root() {
            return Ok((RunAs::CurrentUser, None));
        }
        let (uid, gid) = lookup_user(PG_SYSTEM_USER).ok_or_else(|| {
            anyhow!(
                "running as root, but PostgreSQL refuses to run as root and there is no \
                 `{PG_SYSTEM_USER}` system user to run it as; create one (e.g. `useradd \
                 --system --create-home {PG_SYSTEM_USER}`, or install the `postgresql` package, \
                 which creates it) or run as a non-root user"
            )
        })?;
        if uid == 0 {
            bail!("the `{PG_SYSTEM_USER}` system user has uid 0; PostgreSQL cannot run as root");
        }
        let user = SystemUser {
            name: PG_SYSTEM_USER.to_owned(),
            uid,
            gid,
        };
        let runas = if let Some(runuser) = find_executable(
            "runuser",
            &["/usr/sbin/runuser", "/sbin/runuser", "/usr/bin/runuser"],
        ) {
            RunAs::Runuser {
                runuser,
                user: user.name.clone(),
            }
        } else if let Some(su) = find_executable("su", &["/bin/su", "/usr/bin/su"]) {
            RunAs::Su {
                su,
                user: user.name.clone(),
            }
        } else {
            bail!(
                "running as root, but neither `runuser` nor `su` is available to run \
                 PostgreSQL as the `{PG_SYSTEM_USER}` user"
            );
        };
        Ok((runas, Some(user)))
    }

    /// A `std::process::Command` running `program args...` as the right user.
    fn command(&self, program: &Path, args: &[&str]) -> std::process::Command {
        match self {
            RunAs::CurrentUser => {
                let mut cmd = crate::process::tool_command_sync(program);
                cmd.args(args);
                cmd
            }
            RunAs::Runuser { runuser, user } => {
                let mut cmd = crate::process::tool_command_sync(runuser);
                cmd.args(["-u", user, "--"]).arg(program).args(args);
                cmd
            }
            RunAs::Su { su, user } => {
                let mut line = shell_quote(&program.to_string_lossy());
                for arg in args {
                    line.push(' ');
                    line.push_str(&shell_quote(arg));
                }
                let mut cmd = crate::process::tool_command_sync(su);
                cmd.args([user.as_str(), "-s", "/bin/sh", "-c", &line]);
                cmd
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------------------------

/// A throwaway PostgreSQL cluster (`initdb` + `pg_ctl`) listening on `127.0.0.1` with trust
/// authentication for the superuser `postgres`.
///
/// Dropping it stops the server (`pg_ctl stop -m immediate`, synchronously, usually
/// ~0.1 s); the base directory itself is left for the caller to remove. The server is a
/// daemon, not our child: a cluster kept in a `static` (never dropped) or leaked by a
/// crashed process keeps running, so call [`PgCluster::stop`] explicitly in that case.
#[derive(Debug)]
pub struct PgCluster {
    base_dir: PathBuf,
    data_dir: PathBuf,
    log_file: PathBuf,
    port: u16,
    bin_dir: PathBuf,
    run_as: RunAs,
}

/// Why a `pg_ctl start` failed.
enum StartFailure {
    /// The port was taken between picking and binding it; retry on another.
    PortInUse(anyhow::Error),
    Other(anyhow::Error),
}

impl PgCluster {
    /// Creates a new cluster in `base_dir/pgdata` and starts it on a free port.
    ///
    /// Runs `initdb -A trust -U postgres -E UTF8 --locale=C --no-sync`, configures
    /// `listen_addresses = '127.0.0.1'`, `unix_socket_directories = '<base_dir>'`, `fsync = off`,
    /// starts it with `pg_ctl` (log in `base_dir/pg.log`) and waits until it accepts connections
    /// (up to ~30 s; the error then includes the end of the log).
    ///
    /// `base_dir` is created if needed; `base_dir/pgdata` must not exist yet. The path must be
    /// short (at most 87 bytes, for the Unix socket). As root, the cluster runs as the `postgres`
    /// system user: `base_dir` is chowned to it and every parent directory must be
    /// traversable by others (true for a fresh directory under `/tmp`).
    ///
    /// Typical duration: 1–3 s (mostly `initdb`).
    pub async fn start(base_dir: &Path) -> Result<PgCluster> {
        Self::start_with(base_dir, "").await
    }

    /// [`PgCluster::start`] with more `postgresql.conf` lines (`archive_mode = on`,
    /// `archive_command = …` for point-in-time recovery tests).
    pub async fn start_with(base_dir: &Path, extra_conf: &str) -> Result<PgCluster> {
        let bin_dir = find_pg_bin_dir().ok_or_else(|| {
            anyhow!(
                "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found on PATH or in \
                 /usr/lib/postgresql/*/bin; install the `postgresql` package (or call \
                 devcluster::ensure_binaries())"
            )
        })?;
        let (run_as, system_user) = RunAs::detect()?;

        let base_dir = prepare_base_dir(base_dir)?;
        let base = path_str(&base_dir)?;
        if base.len() > MAX_SOCKET_DIR_LEN {
            bail!(
                "base dir {base} is too long ({} bytes) for PostgreSQL's Unix socket path; use \
                 a directory of at most {MAX_SOCKET_DIR_LEN} bytes, e.g. under /tmp",
                base.len()
            );
        }
        if base.contains(['\'', '"', ',', '\\', '\n', '\r']) {
            bail!("base dir {base} contains quotes, commas or backslashes; pick a plainer path");
        }
        let data_dir = base_dir.join("pgdata");
        if data_dir.exists() {
            bail!(
                "{} already exists; PgCluster::start needs a base dir without a pgdata \
                 directory (use start_again() to restart an existing cluster)",
                data_dir.display()
            );
        }

        if let Some(user) = &system_user {
            check_traversable(&base_dir, user)?;
            std::os::unix::fs::chown(&base_dir, Some(user.uid), Some(user.gid)).with_context(
                || format!("could not chown {} to {}", base_dir.display(), user.name),
            )?;
        }

        let mut cluster = PgCluster {
            log_file: base_dir.join("pg.log"),
            data_dir,
            base_dir,
            port: 0,
            bin_dir,
            run_as,
        };
        cluster.initdb().await?;
        cluster.write_config()?;
        if !extra_conf.is_empty() {
            let conf = cluster.data_dir.join("postgresql.conf");
            OpenOptions::new()
                .append(true)
                .open(&conf)
                .and_then(|mut file| writeln!(file, "{extra_conf}"))
                .with_context(|| format!("could not update {}", conf.display()))?;
        }

        // From here on, an error drops `cluster`, which stops a half-started server.
        let mut last_error = None;
        for _ in 0..PORT_ATTEMPTS {
            cluster.port = pick_free_port()?;
            match cluster.pg_ctl_start().await {
                Ok(()) => {
                    cluster.wait_until_ready().await?;
                    tracing::debug!(
                        port = cluster.port,
                        data_dir = %cluster.data_dir.display(),
                        "throwaway PostgreSQL cluster started"
                    );
                    return Ok(cluster);
                }
                Err(StartFailure::PortInUse(err)) => {
                    tracing::debug!(port = cluster.port, "port taken, retrying on another one");
                    last_error = Some(err);
                }
                Err(StartFailure::Other(err)) => return Err(err),
            }
        }
        Err(last_error
            .unwrap_or_else(|| anyhow!("no attempt made"))
            .context(format!(
                "PostgreSQL could not bind a free port after {PORT_ATTEMPTS} attempts"
            )))
    }

    /// The base directory (its socket directory).
    pub fn base_path(&self) -> &Path {
        &self.base_dir
    }

    /// The TCP port the server listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connection URL for `database` as the superuser: `postgres://postgres@127.0.0.1:PORT/database`.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://{PG_SUPERUSER}@127.0.0.1:{}/{database}",
            self.port
        )
    }

    /// Creates a database (the name is quoted as an identifier, so any name works).
    pub async fn create_database(&self, name: &str) -> Result<()> {
        if name.is_empty() {
            bail!("database name must not be empty");
        }
        let mut conn = self.connect("postgres").await?;
        let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
        sqlx::raw_sql(&sql)
            .execute(&mut conn)
            .await
            .with_context(|| format!("could not create database {name:?}"))?;
        conn.close().await.ok();
        Ok(())
    }

    /// Stops the server (`pg_ctl stop -m fast`), waiting until it is down. Does nothing if
    /// it is not running, so calling it twice is fine.
    pub async fn stop(&self) -> Result<()> {
        if !self.is_running().await? {
            return Ok(());
        }
        let data = path_str(&self.data_dir)?;
        let output = self
            .run_pg_ctl(&["stop", "-D", data, "-m", "fast", "-w", "-t", "60"])
            .await?;
        if output.status.success() || !self.is_running().await? {
            tracing::debug!(port = self.port, "throwaway PostgreSQL cluster stopped");
            return Ok(());
        }
        bail!(
            "pg_ctl stop failed: {}\n{}",
            output_text(&output),
            log_tail(&self.log_file, 30)
        )
    }

    /// Starts the same data directory again on the same port (after [`PgCluster::stop`]) and
    /// waits until it accepts connections. Does nothing if it is already running. Fails if
    /// the port has been taken by something else in the meantime.
    pub async fn start_again(&self) -> Result<()> {
        if self.is_running().await? {
            return Ok(());
        }
        match self.pg_ctl_start().await {
            Ok(()) => self.wait_until_ready().await,
            Err(StartFailure::PortInUse(err)) => Err(err.context(format!(
                "port {} is now used by another process, cannot restart there",
                self.port
            ))),
            Err(StartFailure::Other(err)) => Err(err),
        }
    }

    fn pid_file(&self) -> PathBuf {
        self.data_dir.join("postmaster.pid")
    }

    fn tool(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    /// Runs a PostgreSQL tool as the right user, capturing its output.
    async fn run_tool(&self, tool: &str, args: &[&str]) -> Result<Output> {
        let mut cmd = self.run_as.command(&self.tool(tool), args);
        // The postgres user may not be able to enter our cwd (e.g. /root).
        cmd.current_dir(&self.base_dir).stdin(Stdio::null());
        // `cmd` comes from crate::process (a clean environment).
        let mut cmd: tokio::process::Command = cmd.into();
        cmd.output()
            .await
            .with_context(|| format!("could not run {tool}"))
    }

    async fn run_pg_ctl(&self, args: &[&str]) -> Result<Output> {
        self.run_tool("pg_ctl", args).await
    }

    async fn initdb(&self) -> Result<()> {
        let data = path_str(&self.data_dir)?;
        let output = self
            .run_tool(
                "initdb",
                &[
                    "-D",
                    data,
                    "-U",
                    PG_SUPERUSER,
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
            )
            .await?;
        if !output.status.success() {
            bail!(
                "initdb failed ({}):\n{}",
                output.status,
                output_text(&output)
            );
        }
        Ok(())
    }

    /// Appends our settings to postgresql.conf (the port is passed on the command line).
    fn write_config(&self) -> Result<()> {
        let conf = self.data_dir.join("postgresql.conf");
        let base = path_str(&self.base_dir)?;
        let settings = format!(
            "\n# Added by dbops devcluster: throwaway cluster, never use these settings in production.\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{base}'\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n"
        );
        OpenOptions::new()
            .append(true)
            .open(&conf)
            .and_then(|mut file| file.write_all(settings.as_bytes()))
            .with_context(|| format!("could not update {}", conf.display()))
    }

    /// `pg_ctl start -w` on `self.port`.
    async fn pg_ctl_start(&self) -> std::result::Result<(), StartFailure> {
        let offset = file_len(&self.log_file);
        let (data, log) = match (path_str(&self.data_dir), path_str(&self.log_file)) {
            (Ok(data), Ok(log)) => (data, log),
            (Err(err), _) | (_, Err(err)) => return Err(StartFailure::Other(err)),
        };
        let port_option = format!("-p {}", self.port);
        let output = self
            .run_pg_ctl(&[
                "start",
                "-D",
                data,
                "-l",
                log,
                "-w",
                "-t",
                "30",
                "-o",
                &port_option,
            ])
            .await
            .map_err(StartFailure::Other)?;
        if output.status.success() {
            return Ok(());
        }
        let new_log = log_since(&self.log_file, offset);
        let err = anyhow!(
            "pg_ctl start on port {} failed ({}): {}\n{}",
            self.port,
            output.status,
            output_text(&output),
            format_tail(&self.log_file, &new_log, 30)
        );
        if new_log.contains("Address already in use") || new_log.contains("could not bind") {
            // The postmaster exits by itself when it cannot bind.
            Err(StartFailure::PortInUse(err))
        } else {
            Err(StartFailure::Other(err))
        }
    }

    /// `pg_ctl status`: exit code 0 = running, 3 = not running.
    async fn is_running(&self) -> Result<bool> {
        if !self.pid_file().exists() {
            return Ok(false);
        }
        let data = path_str(&self.data_dir)?;
        let output = self.run_pg_ctl(&["status", "-D", data]).await?;
        match output.status.code() {
            Some(0) => Ok(true),
            Some(3) => Ok(false),
            _ => bail!("pg_ctl status failed: {}", output_text(&output)),
        }
    }

    fn connect_options(&self, database: &str) -> PgConnectOptions {
        PgConnectOptions::new()
            .host("127.0.0.1")
            .port(self.port)
            .username(PG_SUPERUSER)
            .database(database)
            .ssl_mode(PgSslMode::Disable)
            .application_name("dbops-devcluster")
    }

    async fn connect(&self, database: &str) -> Result<PgConnection> {
        PgConnection::connect_with(&self.connect_options(database))
            .await
            .with_context(|| {
                format!(
                    "could not connect to the throwaway cluster on port {}",
                    self.port
                )
            })
    }

    /// Waits (up to 30 s) until a `SELECT 1` succeeds.
    async fn wait_until_ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let attempt = async {
                let mut conn = self.connect("postgres").await?;
                sqlx::raw_sql("SELECT 1").execute(&mut conn).await?;
                conn.close().await.ok();
                anyhow::Ok(())
            };
            let err = match tokio::time::timeout(Duration::from_secs(5), attempt).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(err)) => err,
                Err(_) => anyhow!("connection attempt timed out"),
            };
            if Instant::now() >= deadline {
                return Err(err.context(format!(
                    "PostgreSQL on port {} did not accept connections within 30 s\n{}",
                    self.port,
                    log_tail(&self.log_file, 30)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for PgCluster {
    /// Best effort: `pg_ctl stop -m immediate` if a postmaster.pid is present.
    fn drop(&mut self) {
        if !self.pid_file().exists() {
            return;
        }
        let Some(data) = self.data_dir.to_str() else {
            return;
        };
        let mut cmd = self.run_as.command(
            &self.tool("pg_ctl"),
            &["stop", "-D", data, "-m", "immediate", "-w", "-t", "10"],
        );
        let _ = cmd
            .current_dir(&self.base_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// As root, checks that the `postgres` user can reach `base_dir` through its parents.
fn check_traversable(base_dir: &Path, user: &SystemUser) -> Result<()> {
    for dir in base_dir.ancestors().skip(1) {
        let meta =
            std::fs::metadata(dir).with_context(|| format!("could not stat {}", dir.display()))?;
        let mode = meta.mode();
        let traversable = mode & 0o001 != 0
            || (meta.uid() == user.uid && mode & 0o100 != 0)
            || (meta.gid() == user.gid && mode & 0o010 != 0);
        if !traversable {
            bail!(
                "PostgreSQL runs as the `{}` user (we are root), which cannot reach {}: {} has \
                 mode {:o}; use a base dir whose parents are world-traversable, e.g. under /tmp",
                user.name,
                base_dir.display(),
                dir.display(),
                mode & 0o7777
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Existing data directories (point-in-time recovery's scratch servers)
// ---------------------------------------------------------------------------------------------

/// The server binaries of PostgreSQL `major` (`/usr/lib/postgresql/<major>/bin`, or
/// `initdb`'s directory on `PATH` when it is that version).
pub fn pg_bin_dir_for(major: u32) -> Option<PathBuf> {
    let debian = PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"));
    if is_pg_bin_dir(&debian) {
        return Some(debian);
    }
    let dir = find_pg_bin_dir()?;
    let out = crate::process::tool_command_sync(dir.join("postgres"))
        .arg("--version")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let found: u32 = text
        .split_whitespace()
        .nth(2)?
        .split('.')
        .next()?
        .parse()
        .ok()?;
    (found == major).then_some(dir)
}

/// Gives `path` (recursively) to the user PostgreSQL runs as (when we are root),
/// so a data directory unpacked by dbops can be started. Data directories get
/// mode 0700, as PostgreSQL demands.
pub fn give_to_server_user(path: &Path) -> Result<()> {
    let (_, user) = RunAs::detect()?;
    let Some(user) = user else {
        return Ok(());
    };
    check_traversable(path, &user)?;
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        std::os::unix::fs::lchown(&p, Some(user.uid), Some(user.gid))
            .with_context(|| format!("could not chown {} to {}", p.display(), user.name))?;
        let meta = std::fs::symlink_metadata(&p)?;
        if meta.is_dir() {
            for e in std::fs::read_dir(&p)? {
                stack.push(e?.path());
            }
        }
    }
    Ok(())
}

impl PgCluster {
    /// A cluster for an existing data directory `data_dir` (its configuration
    /// written by the caller), run by the server binaries in `bin_dir`, logging to
    /// `base_dir/pg.log`. Nothing is started: see [`PgCluster::launch`].
    pub fn adopt(base_dir: &Path, data_dir: &Path, bin_dir: &Path, port: u16) -> Result<PgCluster> {
        let (run_as, _) = RunAs::detect()?;
        Ok(PgCluster {
            base_dir: base_dir.to_path_buf(),
            data_dir: data_dir.to_path_buf(),
            log_file: base_dir.join("pg.log"),
            port,
            bin_dir: bin_dir.to_path_buf(),
            run_as,
        })
    }

    /// A port that is free now on 127.0.0.1, for [`PgCluster::adopt`].
    pub fn free_port() -> Result<u16> {
        pick_free_port()
    }

    /// Starts the server without waiting for it to accept connections (a
    /// recovering server accepts none until it is done): `pg_ctl start -W`.
    pub async fn launch(&self) -> Result<()> {
        let data = path_str(&self.data_dir)?;
        let log = path_str(&self.log_file)?;
        let port_option = format!("-p {}", self.port);
        let output = self
            .run_pg_ctl(&["start", "-D", data, "-l", log, "-W", "-o", &port_option])
            .await?;
        if !output.status.success() {
            bail!(
                "pg_ctl start failed ({}): {}\n{}",
                output.status,
                output_text(&output),
                log_tail(&self.log_file, 20)
            );
        }
        Ok(())
    }

    /// Whether the server runs (`pg_ctl status`).
    pub async fn running(&self) -> Result<bool> {
        self.is_running().await
    }

    /// The server's log file.
    pub fn log_path(&self) -> &Path {
        &self.log_file
    }

    /// The data directory.
    pub fn data_path(&self) -> &Path {
        &self.data_dir
    }

    /// Stops the server at once (`pg_ctl stop -m immediate`): a scratch server
    /// whose data is thrown away next.
    pub async fn stop_now(&self) -> Result<()> {
        if !self.is_running().await? {
            return Ok(());
        }
        let data = path_str(&self.data_dir)?;
        let output = self
            .run_pg_ctl(&["stop", "-D", data, "-m", "immediate", "-w", "-t", "30"])
            .await?;
        if output.status.success() || !self.is_running().await? {
            return Ok(());
        }
        bail!("pg_ctl stop failed: {}", output_text(&output))
    }

    /// Forgets the server without stopping it (it outlives this value: a
    /// recovered scratch server stays up until a person is done with it).
    pub fn detach(self) {
        std::mem::forget(self);
    }
}

// ---------------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------------

/// A throwaway `redis-server` on `127.0.0.1` without persistence, run as a child process
/// (SIGKILLed when dropped). Like any child, it outlives us if it is never dropped (e.g.
/// kept in a `static`): call [`RedisServer::stop`] explicitly in that case.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    child: Option<tokio::process::Child>,
    log_file: PathBuf,
}

impl RedisServer {
    /// Starts `redis-server --port P --bind 127.0.0.1 --save "" --appendonly no --dir base_dir
    /// --daemonize no --logfile base_dir/redis.log` on a free port and waits (up to ~10 s)
    /// until it answers `PING`. Typical duration: well under a second.
    pub async fn start(base_dir: &Path) -> Result<RedisServer> {
        let redis_server = find_redis_server().ok_or_else(|| {
            anyhow!(
                "redis-server not found on PATH; install the `redis-server` package (or call \
                 devcluster::ensure_binaries())"
            )
        })?;
        let base_dir = prepare_base_dir(base_dir)?;
        let log_file = base_dir.join("redis.log");
        let base = path_str(&base_dir)?.to_owned();
        let log = path_str(&log_file)?.to_owned();

        let mut last_error = None;
        for _ in 0..PORT_ATTEMPTS {
            let port = pick_free_port()?;
            let offset = file_len(&log_file);
            // Early errors (bad arguments) go to stdout before the log file is opened.
            let open_log = || {
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log_file)
                    .with_context(|| format!("could not open {}", log_file.display()))
            };
            let port_arg = port.to_string();
            let child = crate::process::tool_command(&redis_server)
                .args([
                    "--port",
                    port_arg.as_str(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    base.as_str(),
                    "--daemonize",
                    "no",
                    "--logfile",
                    log.as_str(),
                ])
                .current_dir(&base_dir)
                .stdin(Stdio::null())
                .stdout(open_log()?)
                .stderr(open_log()?)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("could not run {}", redis_server.display()))?;
            let mut server = RedisServer {
                port,
                child: Some(child),
                log_file: log_file.clone(),
            };

            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if redis_ping(port).await {
                    tracing::debug!(port, "throwaway Redis server started");
                    return Ok(server);
                }
                let exited = match server.child.as_mut() {
                    Some(child) => child.try_wait()?,
                    None => None,
                };
                if let Some(status) = exited {
                    server.child = None;
                    let err = anyhow!(
                        "redis-server on port {port} exited with {status}\n{}",
                        log_tail(&log_file, 20)
                    );
                    if log_since(&log_file, offset).contains("Address already in use") {
                        last_error = Some(err);
                        break; // retry on another port
                    }
                    return Err(err);
                }
                if Instant::now() >= deadline {
                    server.stop().await.ok();
                    bail!(
                        "redis-server on port {port} did not answer PING within 10 s\n{}",
                        log_tail(&log_file, 20)
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Err(last_error
            .unwrap_or_else(|| anyhow!("no attempt made"))
            .context(format!(
                "redis-server could not bind a free port after {PORT_ATTEMPTS} attempts"
            )))
    }

    /// The TCP port the server listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connection URL: `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Stops the server (SIGTERM, then SIGKILL after 10 s) and reaps it. Does nothing if it
    /// is already stopped.
    pub async fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        if let Some(pid) = child.id().and_then(|pid| libc::pid_t::try_from(pid).ok()) {
            // SAFETY: kill(2) with a pid we spawned and have not reaped yet.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
            Ok(status) => {
                status.context("waiting for redis-server to exit")?;
            }
            Err(_) => {
                tracing::warn!(
                    port = self.port,
                    "redis-server ignored SIGTERM for 10 s, killing it\n{}",
                    log_tail(&self.log_file, 10)
                );
                child.kill().await.context("could not kill redis-server")?;
            }
        }
        tracing::debug!(port = self.port, "throwaway Redis server stopped");
        Ok(())
    }
}

/// Plain-TCP `PING`; true when the server answers `+PONG`.
async fn redis_ping(port: u16) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream.write_all(b"PING\r\n").await?;
        let mut buf = [0u8; 64];
        let n = stream.read(&mut buf).await?;
        std::io::Result::Ok(buf[..n].starts_with(b"+PONG"))
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(500), attempt).await,
        Ok(Ok(true))
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh short directory under /tmp (not $TMPDIR: it must be short and, as root,
    /// reachable by the postgres user), removed on drop (declare it before the servers so
    /// it is dropped after them).
    pub(crate) struct TempBase(pub(crate) PathBuf);

    impl TempBase {
        pub(crate) fn new(tag: &str) -> TempBase {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let dir =
                Path::new("/tmp").join(format!("dbops-{tag}-{}-{nanos:x}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("create temp base dir");
            TempBase(dir)
        }
    }

    impl Drop for TempBase {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Whether the binaries are here; tests are skipped (with a note) when they are not.
    pub(crate) fn binaries_available() -> bool {
        let ok = find_pg_bin_dir().is_some() && find_redis_server().is_some();
        if !ok {
            eprintln!("skipping: PostgreSQL server binaries or redis-server not installed");
        }
        ok
    }

    #[test]
    fn shell_quote_escapes_single_quotes() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    /// As root, both ways of switching to the postgres user pass arguments through intact.
    #[test]
    fn run_as_postgres_user_keeps_arguments() {
        if !is_root() || lookup_user(PG_SYSTEM_USER).is_none() {
            return;
        }
        let user = PG_SYSTEM_USER.to_owned();
        let mut ways = Vec::new();
        if let Some(runuser) = find_executable("runuser", &["/usr/sbin/runuser", "/sbin/runuser"]) {
            ways.push(RunAs::Runuser {
                runuser,
                user: user.clone(),
            });
        }
        if let Some(su) = find_executable("su", &["/bin/su", "/usr/bin/su"]) {
            ways.push(RunAs::Su { su, user });
        }
        for way in ways {
            let output = way
                .command(
                    Path::new("/bin/sh"),
                    &["-c", "id -un; echo \"$1\"", "sh", "it's a \"b\""],
                )
                .current_dir("/")
                .output()
                .expect("run as postgres");
            assert!(output.status.success(), "{way:?}: {}", output_text(&output));
            let stdout = String::from_utf8_lossy(&output.stdout);
            assert_eq!(stdout, "postgres\nit's a \"b\"\n", "{way:?}");
        }
    }

    #[tokio::test]
    async fn pg_cluster_lifecycle() -> Result<()> {
        if !binaries_available() {
            return Ok(());
        }
        let base = TempBase::new("pgtest");
        let cluster = PgCluster::start(&base.0).await?;
        assert!(
            cluster
                .url("postgres")
                .ends_with(&format!(":{}/postgres", cluster.port()))
        );

        cluster.create_database("app test").await?;
        let mut conn = PgConnection::connect_with(&cluster.connect_options("app test")).await?;
        let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&mut conn).await?;
        assert_eq!(one, 1);
        conn.close().await?;

        cluster.stop().await?;
        cluster.stop().await?; // idempotent
        assert!(
            PgConnection::connect(&cluster.url("postgres"))
                .await
                .is_err()
        );

        cluster.start_again().await?;
        let mut conn = PgConnection::connect(&cluster.url("app test")).await?;
        let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&mut conn).await?;
        assert_eq!(one, 1);
        conn.close().await?;

        let pid_file = cluster.pid_file();
        drop(cluster); // immediate stop
        assert!(!pid_file.exists(), "postmaster still running after drop");
        Ok(())
    }

    #[tokio::test]
    async fn redis_server_lifecycle() -> Result<()> {
        if !binaries_available() {
            return Ok(());
        }
        let base = TempBase::new("redistest");
        let mut server = RedisServer::start(&base.0).await?;
        assert_eq!(server.url(), format!("redis://127.0.0.1:{}", server.port()));
        assert!(redis_ping(server.port()).await);
        server.stop().await?;
        server.stop().await?; // idempotent
        assert!(!redis_ping(server.port()).await);
        Ok(())
    }
}
