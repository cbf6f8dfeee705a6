//! Settings: a TOML file (path from `--config` or `DBOPS_CONFIG`) plus environment
//! overrides. Target connection strings are secrets: they are read from the
//! environment variable or file a target names, kept as [`SecretString`], and never
//! formatted into a page, a log line or a command line.
//!
//! Over 600 lines: every setting's raw form, its default, its check and its error
//! message sit together so a key cannot be added half-way; about 200 lines are the
//! parsing tests.

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// A configuration problem, always naming the key it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// How careful dbops must be with a target; decides which actions need approval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    Production,
    Staging,
    Dev,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Production => "production",
            Policy::Staging => "staging",
            Policy::Dev => "dev",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    database_url: Option<String>,
    database_url_env: Option<String>,
    database_url_file: Option<PathBuf>,
    /// The console database as the role that owns dbops' schema (runs the
    /// migrations); `dbops migrate` uses it, `serve` never needs it.
    owner_database_url_env: Option<String>,
    owner_database_url_file: Option<PathBuf>,
    /// `[audit]`: the operations log's protection.
    #[serde(default)]
    audit: RawAudit,
    #[serde(default)]
    log_format: Option<String>,
    #[serde(default)]
    session: RawSession,
    /// `[metrics]`: who may read `/metrics`.
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    lockout: RawLockout,
    #[serde(default)]
    targets: RawTargetDefaults,
    #[serde(default)]
    approvals: RawApprovals,
    #[serde(default)]
    notifications: RawNotifications,
    #[serde(default)]
    activity: RawActivity,
    /// `[reports]`: index, bloat and health reports (see `crate::reports::settings`).
    #[serde(default)]
    reports: crate::reports::settings::RawReports,
    #[serde(default)]
    backups: RawBackups,
    /// `[jobs]`: how many jobs this process runs at once (0: none; a web-only replica).
    #[serde(default)]
    jobs: RawJobs,
    /// `[restores]`: how long a database replaced by a restore is kept.
    #[serde(default)]
    restores: RawRestores,
    /// `[sign_in]`: the console's public URL and two-factor requirements.
    #[serde(default)]
    sign_in: RawSignIn,
    /// `[[oidc]]`: OpenID Connect providers for single sign-on.
    #[serde(default)]
    oidc: Vec<crate::auth::oidc::RawOidc>,
    /// `[windows]`: maintenance windows (templates, how long their backups are kept).
    #[serde(default)]
    windows: WindowSettings,
    #[serde(default)]
    postgres: Vec<RawTarget>,
    #[serde(default)]
    redis: Vec<RawTarget>,
}

/// `[windows]`: maintenance windows (see `crate::windows`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowSettings {
    /// Days a window's backups stay pinned after the backup (default 30).
    #[serde(default)]
    pub keep_backups_days: Option<u32>,
    /// `[[windows.templates]]`: more templates (a built-in's name replaces it).
    #[serde(default)]
    pub templates: Vec<WindowTemplateConfig>,
}

/// One `[[windows.templates]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowTemplateConfig {
    pub name: String,
    pub title: Option<String>,
    pub description: Option<String>,
    pub steps: Vec<WindowStepConfig>,
}

/// One step of a configured template: `kind` is `manual` or an automatic kind
/// (`announce`, `backup`, `restore_point`, `migrations_before`,
/// `migrations_after`, `health_url`, `target_health`, `announce_close`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowStepConfig {
    pub kind: String,
    pub title: Option<String>,
    /// `health_url`: the status that counts as healthy (default: any 2xx).
    pub expect_status: Option<u16>,
    /// `health_url`: text the body must contain.
    pub contains: Option<String>,
    /// `health_url`: how long to keep asking (default 120 s).
    pub timeout_seconds: Option<u64>,
}

/// The step kinds a configured template may name.
const WINDOW_STEP_KINDS: [&str; 9] = [
    "announce",
    "backup",
    "restore_point",
    "migrations_before",
    "migrations_after",
    "health_url",
    "target_health",
    "announce_close",
    "manual",
];

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSession {
    idle_timeout_minutes: Option<u64>,
    absolute_timeout_hours: Option<u64>,
    secure_cookies: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSignIn {
    public_url: Option<String>,
    require_two_factor: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    token_env: Option<String>,
    token_file: Option<PathBuf>,
    public: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLockout {
    max_failures: Option<u32>,
    lock_minutes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTargetDefaults {
    connect_timeout_seconds: Option<u64>,
    statement_timeout_seconds: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApprovals {
    expiry_minutes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotifications {
    webhook_url_env: Option<String>,
    webhook_url_file: Option<PathBuf>,
    notify_success: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawActivity {
    long_running_seconds: Option<u64>,
    refresh_seconds: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    name: String,
    url_env: Option<String>,
    url_file: Option<PathBuf>,
    policy: Policy,
    #[serde(default)]
    description: Option<String>,
    /// Plain text shown wherever a destructive action on this target is asked for
    /// or decided (what emptying it does, whom to call).
    #[serde(default)]
    notes: Option<String>,
    /// An approver may run a gated action on their own request in an incident.
    #[serde(default)]
    break_glass: bool,
    #[serde(default)]
    backup: Option<RawBackupPolicy>,
    /// PostgreSQL only: more databases on the same server to inspect (migration
    /// status), besides the URL's.
    #[serde(default)]
    databases: Vec<String>,
    /// PostgreSQL only: local migrations directories to compare with what is applied.
    #[serde(default)]
    migrations: Vec<RawMigrationsDir>,
    /// PostgreSQL only: continuous WAL archiving and base backups (point-in-time recovery).
    #[serde(default)]
    archive: Option<RawArchive>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawArchive {
    enabled: Option<bool>,
    slot: Option<String>,
    storage: Option<String>,
    objective_minutes: Option<u64>,
    snapshot_seconds: Option<u64>,
    slot_warn_mb: Option<u64>,
    base_backup_schedule: Option<String>,
    keep_base_backups: Option<u32>,
    recovery_hours: Option<u64>,
    compression: Option<String>,
    compression_level: Option<i32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMigrationsDir {
    database: Option<String>,
    tool: String,
    directory: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackupPolicy {
    schedule: Option<String>,
    timezone: Option<String>,
    format: Option<String>,
    jobs: Option<u32>,
    storage: Option<String>,
    objective_hours: Option<u64>,
    keep_last: Option<u32>,
    daily: Option<u32>,
    weekly: Option<u32>,
    monthly: Option<u32>,
    test_restore: Option<bool>,
    test_restore_schedule: Option<String>,
    compression: Option<String>,
    compression_level: Option<i32>,
    compression_threads: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    refuse_owner_runtime: Option<bool>,
    #[serde(default)]
    checkpoints: RawCheckpoints,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheckpoints {
    signing_key_env: Option<String>,
    signing_key_file: Option<PathBuf>,
    public_key: Option<String>,
    file: Option<PathBuf>,
    s3: Option<bool>,
    webhook: Option<bool>,
    interval_seconds: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRestores {
    keep_previous_days: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJobs {
    workers: Option<usize>,
    lease_seconds: Option<u64>,
    backups: Option<u32>,
    backups_per_target: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackups {
    directory: Option<PathBuf>,
    workers: Option<usize>,
    lease_seconds: Option<u64>,
    s3: Option<RawS3>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawS3 {
    bucket: String,
    #[serde(default)]
    prefix: String,
    region: Option<String>,
    endpoint: Option<String>,
    access_key_id_env: String,
    secret_access_key_env: String,
    #[serde(default)]
    allow_http: bool,
}

/// Session cookie and timeout settings.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    pub idle_timeout: Duration,
    pub absolute_timeout: Duration,
    /// `[session] secure_cookies` as configured; `None`: decided by the address
    /// dbops listens on ([`SessionSettings::secure_cookies_for`]).
    pub secure_cookies: Option<bool>,
}

impl SessionSettings {
    /// Whether the session cookie is marked `Secure` (sent over https only) when
    /// dbops listens on `listen`: as configured, else on unless `listen` is a
    /// loopback address (a console reached from other machines is behind a
    /// TLS-terminating proxy; a local one is plain http on 127.0.0.1).
    pub fn secure_cookies_for(&self, listen: SocketAddr) -> bool {
        self.secure_cookies
            .unwrap_or_else(|| !listen.ip().is_loopback())
    }

    /// The start-up warning when cookies are not `Secure` though dbops listens
    /// on an address other machines can reach.
    pub fn cookie_warning(&self, listen: SocketAddr) -> Option<String> {
        (!self.secure_cookies_for(listen) && !listen.ip().is_loopback()).then(|| {
            format!(
                "[session] secure_cookies = false while dbops listens on {listen}: the session \
                 cookie is also sent over plain http, where anyone on the path can take over the \
                 session. Serve dbops behind https and remove the setting (it defaults to on for \
                 addresses other than loopback)"
            )
        })
    }
}

/// Who may read `/metrics` (`[metrics]`). Without a token and without
/// `public = true` it answers 404, as if there were no such page.
#[derive(Debug, Clone, Default)]
pub struct MetricsSettings {
    /// A bearer token the scraper sends (`Authorization: Bearer …`), read from
    /// `token_env` or `token_file`.
    pub token: Option<SecretString>,
    /// Anyone may read it (chosen explicitly with `public = true`).
    pub public: bool,
}

/// `[sign_in]`.
#[derive(Debug, Clone, Default)]
pub struct SignInSettings {
    /// The URL people reach dbops at (`https://dbops.example.com`), for the
    /// providers' redirect URLs; `None`: taken from the request's `Host`.
    pub public_url: Option<String>,
    /// Admins and approvers with a password must use a second factor (TOTP).
    pub require_two_factor: bool,
}

/// Failed-login throttling.
#[derive(Debug, Clone)]
pub struct LockoutSettings {
    pub max_failures: u32,
    pub lock_for: Duration,
}

/// Where and when to send notifications.
#[derive(Debug, Clone, Default)]
pub struct NotificationSettings {
    /// A Slack-compatible incoming-webhook URL (a secret: it authorizes posting).
    pub webhook_url: Option<SecretString>,
    /// Also notify when things go well (backups that succeed), not only failures.
    pub notify_success: bool,
}

/// The activity page's settings.
#[derive(Debug, Clone)]
pub struct ActivitySettings {
    /// A query running at least this long is "long-running".
    pub long_running: Duration,
    /// How often the open page refreshes itself.
    pub refresh: Duration,
}

/// Where backups are kept.
#[derive(Debug, Clone)]
pub struct BackupSettings {
    /// The local storage root (also the scratch space for directory-format dumps).
    pub directory: PathBuf,
    /// S3-compatible object storage, for targets whose policy says `storage = "s3"`.
    pub s3: Option<S3Config>,
}

/// The one job runtime (`[jobs]`): how much one process runs, the lease, and
/// the limits of the kinds that declare them.
#[derive(Debug, Clone)]
pub struct JobSettings {
    /// Jobs (backups, restores, reports, bulk deletes, maintenance) one dbops
    /// process runs at the same time; 0 makes a web-only replica that leaves them
    /// to others.
    pub workers: usize,
    /// A running job whose heartbeat is older than this is taken to be orphaned
    /// (its dbops died) and ends `interrupted`.
    pub lease: Duration,
    /// Backups running at once across every replica (`[jobs] backups`; the old
    /// `[backups] workers`).
    pub backups: u32,
    /// Backups of one target running at once (`[jobs] backups_per_target`).
    pub backups_per_target: u32,
}

/// S3-compatible object storage; the keys come from environment variables.
#[derive(Debug, Clone)]
pub struct S3Config {
    pub bucket: String,
    pub prefix: String,
    pub region: String,
    pub endpoint: Option<String>,
    pub access_key_id: String,
    pub secret_access_key: SecretString,
    pub allow_http: bool,
}

/// A target's backup policy.
#[derive(Debug, Clone)]
pub struct BackupPolicy {
    /// A cron expression (5 fields) in `timezone`; none = only on demand.
    pub schedule: Option<String>,
    pub timezone: String,
    /// `custom` (default), `directory` or `plain` for PostgreSQL; `rdb` or `logical` for Redis.
    pub format: String,
    pub jobs: u32,
    /// `local` or `s3`.
    pub storage: String,
    /// The newest good backup should be younger than this; the overview turns red.
    pub objective: Duration,
    pub keep_last: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
    /// Restore every backup into a scratch database and compare row counts.
    pub test_restore: bool,
    /// A cron expression (in `timezone`) for backups that are test-restored even
    /// when `test_restore` is off (say weekly, when a full check every night costs
    /// too much).
    pub test_restore_schedule: Option<String>,
    /// `zstd` (default): the tool writes uncompressed and dbops compresses with
    /// zstd as the bytes stream to storage; `pg_dump` (PostgreSQL): pg_dump's own
    /// gzip, as before; `none` (Redis): stored as exported.
    pub compression: String,
    /// The zstd level (1 to 19; default 3).
    pub compression_level: i32,
    /// The compressor's threads (1 to 16; default 2, or 1 on a 1-core machine).
    pub compression_threads: u32,
}

impl BackupPolicy {
    /// The zstd settings when dbops compresses this target's backups.
    pub fn zstd(&self) -> Option<crate::storage::compress::Zstd> {
        (self.compression == "zstd").then_some(crate::storage::compress::Zstd {
            level: self.compression_level,
            threads: self.compression_threads,
        })
    }
}

/// Which kind of server a target is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    Postgres,
    Redis,
}

impl TargetKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetKind::Postgres => "postgres",
            TargetKind::Redis => "redis",
        }
    }
}

/// A PostgreSQL database or Redis server that dbops operates.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    pub name: String,
    pub kind: TargetKind,
    pub policy: Policy,
    pub description: Option<String>,
    /// The operators' notes on this target (plain text, several lines allowed):
    /// shown on the pages where a destructive action is asked for or decided.
    /// `None` when unset or blank.
    pub notes: Option<String>,
    /// `break_glass = true`: an approver (or admin) may run a gated action on
    /// their own request, with an incident reason, reviewed afterwards by another
    /// approver. Off by default.
    pub break_glass: bool,
    /// The connection URL. A secret: it usually carries a password.
    pub url: SecretString,
    pub backup: BackupPolicy,
    /// More databases on the same server whose migration status is shown (the
    /// URL's database always is).
    pub databases: Vec<String>,
    /// Local migrations directories, for pending migrations and checksum drift.
    pub migrations: Vec<MigrationsDir>,
    /// Continuous WAL archiving (`[postgres.archive]`), for point-in-time recovery.
    pub archive: Option<ArchiveSettings>,
}

/// A PostgreSQL target's continuous archiving (`[postgres.archive]`): dbops streams
/// its WAL with `pg_receivewal` over a physical replication slot into storage and
/// takes base backups with `pg_basebackup`, so that it can recover to any second
/// since the oldest kept base backup.
#[derive(Debug, Clone)]
pub struct ArchiveSettings {
    /// `enabled = false` keeps the settings and the archive but stops streaming.
    pub enabled: bool,
    /// The physical replication slot dbops creates and streams from.
    pub slot: String,
    /// `local` or `s3` (default: the backup policy's storage).
    pub storage: String,
    /// The recovery point objective: the overview turns red when the newest stored
    /// WAL is older than this.
    pub objective: Duration,
    /// How often the segment being written is stored as a snapshot (so the recovery
    /// point is seconds old even on a quiet server, whose segments fill slowly).
    pub snapshot_interval: Duration,
    /// Warn when the slot holds more WAL than this on the server.
    pub slot_warn_bytes: u64,
    /// A cron expression (in the backup policy's time zone) for base backups.
    pub base_backup_schedule: Option<String>,
    /// How many good base backups to keep (the WAL they need is kept with them).
    pub keep_base_backups: u32,
    /// A recovery's scratch server is removed after this long.
    pub recovery_limit: Duration,
    /// How archived WAL is stored: zstd (`compression = "zstd"`, the default, at
    /// `compression_level` 1 on one thread: WAL is written all day) or as
    /// `pg_receivewal` wrote it (`"none"`).
    pub compression: Option<crate::storage::compress::Zstd>,
}

/// The replication slot name dbops uses for a target when none is configured:
/// `dbops_` and the target's name, lower-cased, anything outside `[a-z0-9_]` as `_`.
pub fn default_slot_name(target: &str) -> String {
    let mut s: String = format!("dbops_{target}")
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    s.truncate(63);
    s
}

/// A local migrations directory of a PostgreSQL target (`[[postgres.migrations]]`).
#[derive(Debug, Clone)]
pub struct MigrationsDir {
    /// The database it belongs to; `None` = the URL's database.
    pub database: Option<String>,
    /// One of [`crate::migration_status::disk::DIRECTORY_TOOLS`].
    pub tool: String,
    /// Resolved against the config file's directory.
    pub directory: PathBuf,
}

/// The whole, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub database_url: SecretString,
    pub json_logs: bool,
    pub session: SessionSettings,
    /// `[metrics]`.
    pub metrics: MetricsSettings,
    pub lockout: LockoutSettings,
    /// `[sign_in]`.
    pub sign_in: SignInSettings,
    /// `[[oidc]]`: single sign-on providers, in the order of their buttons.
    pub oidc: Vec<crate::auth::oidc::OidcConfig>,
    pub connect_timeout: Duration,
    pub statement_timeout: Duration,
    /// How long an approval request stays valid (pending or approved, unexecuted).
    pub approval_expiry: Duration,
    pub notifications: NotificationSettings,
    pub activity: ActivitySettings,
    /// How reports are computed and kept (`[reports]`).
    pub reports: crate::reports::ReportSettings,
    pub backups: BackupSettings,
    /// `[jobs]`.
    pub jobs: JobSettings,
    /// What the file says in an old way that still works (logged at start).
    pub warnings: Vec<String>,
    /// `[restores]`.
    pub restores: RestoreSettings,
    /// `[audit]`.
    pub audit: AuditSettings,
    /// The console database as the owner of dbops' schema (`owner_database_url_env`
    /// / `_file`), for `dbops migrate`; `None`: `database_url` is used.
    pub owner_database_url: Option<SecretString>,
    /// `[windows]`.
    pub windows: WindowSettings,
    pub targets: Vec<TargetConfig>,
}

/// The operations log's protection (`[audit]`).
#[derive(Debug, Clone, Default)]
pub struct AuditSettings {
    /// Refuse to start when the role dbops runs as owns the log (or is
    /// superuser); by default dbops only warns.
    pub refuse_owner_runtime: bool,
    pub checkpoints: CheckpointSettings,
}

/// Signed checkpoints of the log's chain head, written outside the database
/// (`[audit.checkpoints]`, see [`crate::audit::checkpoint`]).
#[derive(Debug, Clone, Default)]
pub struct CheckpointSettings {
    /// The Ed25519 signing key's 32-byte seed (hex), from env or a file; a
    /// machine that only verifies needs [`CheckpointSettings::public_key`].
    pub signing_key: Option<SecretString>,
    /// The Ed25519 public key (hex) checkpoints are verified with; default: the
    /// signing key's.
    pub public_key: Option<String>,
    /// Append each checkpoint (a JSON line) to this file.
    pub file: Option<PathBuf>,
    /// Also store each in the `[backups.s3]` bucket under `audit-checkpoints/`.
    pub s3: bool,
    /// Also post each to the webhook.
    pub webhook: bool,
    /// How often (at most) a checkpoint is written; also after every approved action.
    pub interval: Duration,
}

impl CheckpointSettings {
    /// Checkpoints are written (a key and at least one witness).
    pub fn enabled(&self) -> bool {
        self.signing_key.is_some() && (self.file.is_some() || self.s3 || self.webhook)
    }
}

/// Restores over a database (`[restores]`).
#[derive(Debug, Clone)]
pub struct RestoreSettings {
    /// How long the database a restore replaced is kept (renamed
    /// `<db>_before_restore_<id>`) before dbops drops it; `None` (`keep_previous_days
    /// = 0`): until a person drops it. Default 7 days.
    pub keep_previous: Option<Duration>,
}

/// The default console database when nothing is configured: the local server as
/// the machine's services start it.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/dbops";

impl Config {
    /// Loads the config file named by `path` (or `DBOPS_CONFIG`); without either,
    /// the defaults with no targets. `DATABASE_URL` overrides the console database.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let env_path = std::env::var_os("DBOPS_CONFIG").map(PathBuf::from);
        let path = path.map(Path::to_path_buf).or(env_path);
        let (text, base) = match &path {
            Some(p) => (
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.clone(),
                    source,
                })?,
                p.parent().map(Path::to_path_buf).unwrap_or_default(),
            ),
            None => (String::new(), PathBuf::from(".")),
        };
        let display = path.unwrap_or_else(|| PathBuf::from("<defaults>"));
        Self::from_toml(&text, &display, &base, |k| std::env::var(k).ok())
    }

    /// Parses and validates TOML text. `env` looks up environment variables (a
    /// parameter so that tests need not touch the process environment).
    pub fn from_toml(
        text: &str,
        path: &Path,
        base_dir: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;

        let listen_text = raw.listen.as_deref().unwrap_or("127.0.0.1:8080");
        let listen = listen_text.parse::<SocketAddr>().map_err(|_| {
            invalid(
                "listen",
                format!("`{listen_text}` is not an address like 127.0.0.1:8080"),
            )
        })?;

        let database_url = if let Some(url) = env("DATABASE_URL").filter(|s| !s.is_empty()) {
            url
        } else if let Some(var) = &raw.database_url_env {
            env(var).filter(|s| !s.is_empty()).ok_or_else(|| {
                invalid(
                    "database_url_env",
                    format!("environment variable {var} is not set"),
                )
            })?
        } else if let Some(file) = &raw.database_url_file {
            read_secret_file(&base_dir.join(file), "database_url_file")?
        } else {
            raw.database_url
                .clone()
                .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_string())
        };
        check_url(&database_url, &["postgres", "postgresql"], "database_url")?;

        let json_logs = match raw.log_format.as_deref() {
            None | Some("text") => false,
            Some("json") => true,
            Some(other) => {
                return Err(invalid(
                    "log_format",
                    format!("`{other}` is not one of text, json"),
                ));
            }
        };

        let idle = raw.session.idle_timeout_minutes.unwrap_or(30);
        let absolute = raw.session.absolute_timeout_hours.unwrap_or(12);
        if idle == 0 {
            return Err(invalid(
                "session.idle_timeout_minutes",
                "must be at least 1",
            ));
        }
        if absolute == 0 {
            return Err(invalid(
                "session.absolute_timeout_hours",
                "must be at least 1",
            ));
        }
        let max_failures = raw.lockout.max_failures.unwrap_or(5);
        if max_failures == 0 {
            return Err(invalid("lockout.max_failures", "must be at least 1"));
        }
        let lock_minutes = raw.lockout.lock_minutes.unwrap_or(15);
        if lock_minutes == 0 {
            return Err(invalid("lockout.lock_minutes", "must be at least 1"));
        }
        let connect_timeout = raw.targets.connect_timeout_seconds.unwrap_or(3);
        if !(1..=60).contains(&connect_timeout) {
            return Err(invalid(
                "targets.connect_timeout_seconds",
                "must be between 1 and 60",
            ));
        }
        let statement_timeout = raw.targets.statement_timeout_seconds.unwrap_or(15);
        if !(1..=3600).contains(&statement_timeout) {
            return Err(invalid(
                "targets.statement_timeout_seconds",
                "must be between 1 and 3600",
            ));
        }

        let expiry = raw.approvals.expiry_minutes.unwrap_or(60);
        if !(1..=7 * 24 * 60).contains(&expiry) {
            return Err(invalid(
                "approvals.expiry_minutes",
                "must be between 1 and 10080 (a week)",
            ));
        }
        let webhook_url = match (
            &raw.notifications.webhook_url_env,
            &raw.notifications.webhook_url_file,
        ) {
            (None, None) => None,
            (Some(var), None) => Some(env(var).filter(|s| !s.is_empty()).ok_or_else(|| {
                invalid(
                    "notifications.webhook_url_env",
                    format!("environment variable {var} is not set"),
                )
            })?),
            (None, Some(file)) => Some(read_secret_file(
                &base_dir.join(file),
                "notifications.webhook_url_file",
            )?),
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "notifications",
                    "give one of webhook_url_env or webhook_url_file, not both",
                ));
            }
        };
        if let Some(url) = &webhook_url {
            check_url(url, &["http", "https"], "notifications webhook URL")?;
        }
        let long_running = raw.activity.long_running_seconds.unwrap_or(60);
        if long_running == 0 {
            return Err(invalid(
                "activity.long_running_seconds",
                "must be at least 1",
            ));
        }
        let refresh = raw.activity.refresh_seconds.unwrap_or(5);
        if !(1..=300).contains(&refresh) {
            return Err(invalid(
                "activity.refresh_seconds",
                "must be between 1 and 300",
            ));
        }

        let backups_s3 = match &raw.backups.s3 {
            None => None,
            Some(s3) => {
                let get = |var: &str, key: &str| {
                    env(var).filter(|v| !v.is_empty()).ok_or_else(|| {
                        invalid(
                            format!("backups.s3.{key}"),
                            format!("environment variable {var} is not set"),
                        )
                    })
                };
                if let Some(e) = &s3.endpoint {
                    check_url(e, &["http", "https"], "backups.s3.endpoint")?;
                }
                Some(S3Config {
                    bucket: s3.bucket.clone(),
                    prefix: s3.prefix.trim_matches('/').to_string(),
                    region: s3.region.clone().unwrap_or_else(|| "us-east-1".into()),
                    endpoint: s3.endpoint.clone(),
                    access_key_id: get(&s3.access_key_id_env, "access_key_id_env")?,
                    secret_access_key: SecretString::from(get(
                        &s3.secret_access_key_env,
                        "secret_access_key_env",
                    )?),
                    allow_http: s3.allow_http,
                })
            }
        };
        let mut warnings = Vec::new();
        // `[backups] workers` and `lease_seconds` moved to `[jobs]` when backups
        // joined the one job runtime; the old keys keep working.
        if let Some(w) = raw.backups.workers {
            if !(1..=16).contains(&w) {
                return Err(invalid("backups.workers", "must be between 1 and 16"));
            }
            if raw.jobs.backups.is_some() {
                return Err(invalid(
                    "backups.workers",
                    "is the old name of jobs.backups: set only jobs.backups",
                ));
            }
            warnings.push(format!(
                "[backups] workers is deprecated: write `backups = {w}` under [jobs] (backups running at once)"
            ));
        }
        if let Some(l) = raw.backups.lease_seconds {
            if raw.jobs.lease_seconds.is_some() {
                return Err(invalid(
                    "backups.lease_seconds",
                    "is the old name of jobs.lease_seconds: set only jobs.lease_seconds",
                ));
            }
            warnings.push(format!(
                "[backups] lease_seconds is deprecated: write `lease_seconds = {l}` under [jobs]"
            ));
        }
        let backups_at_once = raw
            .jobs
            .backups
            .unwrap_or(raw.backups.workers.unwrap_or(2) as u32);
        if !(1..=64).contains(&backups_at_once) {
            return Err(invalid("jobs.backups", "must be between 1 and 64"));
        }
        let backups_per_target = raw.jobs.backups_per_target.unwrap_or(1);
        if !(1..=16).contains(&backups_per_target) {
            return Err(invalid(
                "jobs.backups_per_target",
                "must be between 1 and 16",
            ));
        }
        let job_workers = raw.jobs.workers.unwrap_or(6);
        if job_workers > 32 {
            return Err(invalid("jobs.workers", "must be between 0 and 32"));
        }
        let lease = raw
            .jobs
            .lease_seconds
            .or(raw.backups.lease_seconds)
            .unwrap_or(60);
        if lease < 2 {
            return Err(invalid(
                "jobs.lease_seconds",
                "must be at least 2 (a running job writes its heartbeat every second)",
            ));
        }
        let jobs = JobSettings {
            workers: job_workers,
            lease: Duration::from_secs(lease),
            backups: backups_at_once,
            backups_per_target,
        };
        let backups = BackupSettings {
            directory: raw
                .backups
                .directory
                .as_ref()
                .map(|d| base_dir.join(d))
                .unwrap_or_else(|| PathBuf::from("/var/lib/dbops/backups")),
            s3: backups_s3.clone(),
        };

        let mut names = HashSet::new();
        let mut targets = Vec::new();
        for (kind, list) in [
            (TargetKind::Postgres, &raw.postgres),
            (TargetKind::Redis, &raw.redis),
        ] {
            for (i, t) in list.iter().enumerate() {
                let key = format!("{}[{i}]", kind.as_str());
                if !valid_target_name(&t.name) {
                    return Err(invalid(
                        format!("{key}.name"),
                        format!(
                            "`{}` must be 1-63 characters of a-z, 0-9, '-' or '_', starting with a letter",
                            t.name
                        ),
                    ));
                }
                if !names.insert(t.name.clone()) {
                    return Err(invalid(
                        format!("{key}.name"),
                        format!("target name `{}` is used twice", t.name),
                    ));
                }
                let url = match (&t.url_env, &t.url_file) {
                    (Some(var), None) => env(var).filter(|s| !s.is_empty()).ok_or_else(|| {
                        invalid(
                            format!("{key}.url_env"),
                            format!("environment variable {var} is not set"),
                        )
                    })?,
                    (None, Some(file)) => {
                        read_secret_file(&base_dir.join(file), &format!("{key}.url_file"))?
                    }
                    _ => {
                        return Err(invalid(
                            key.to_string(),
                            "give exactly one of url_env or url_file (connection strings never go in the file itself)",
                        ));
                    }
                };
                let schemes: &[&str] = match kind {
                    TargetKind::Postgres => &["postgres", "postgresql"],
                    TargetKind::Redis => &[
                        "redis",
                        "rediss",
                        "redis-cluster",
                        "rediss-cluster",
                        "redis-sentinel",
                        "rediss-sentinel",
                    ],
                };
                check_url(&url, schemes, &format!("{key} connection URL"))?;
                let backup = backup_policy(&key, kind, t.backup.as_ref(), backups_s3.is_some())?;
                let (databases, migrations) = migration_settings(&key, kind, t, base_dir)?;
                let archive = archive_settings(&key, kind, t, &backup, backups_s3.is_some())?;
                targets.push(TargetConfig {
                    name: t.name.clone(),
                    kind,
                    policy: t.policy,
                    description: t.description.clone(),
                    notes: target_notes(&key, t.notes.as_deref())?,
                    break_glass: t.break_glass,
                    url: SecretString::from(url),
                    backup,
                    databases,
                    migrations,
                    archive,
                });
            }
        }

        Ok(Config {
            listen,
            database_url: SecretString::from(database_url),
            json_logs,
            session: SessionSettings {
                idle_timeout: Duration::from_secs(idle * 60),
                absolute_timeout: Duration::from_secs(absolute * 3600),
                secure_cookies: raw.session.secure_cookies,
            },
            metrics: metrics_settings(&raw.metrics, base_dir, &env)?,
            sign_in: SignInSettings {
                public_url: match &raw.sign_in.public_url {
                    None => None,
                    Some(u) => {
                        check_url(u, &["https", "http"], "sign_in.public_url")?;
                        Some(u.trim_end_matches('/').to_string())
                    }
                },
                require_two_factor: raw.sign_in.require_two_factor.unwrap_or(false),
            },
            oidc: {
                let mut out: Vec<crate::auth::oidc::OidcConfig> = vec![];
                for (i, o) in raw.oidc.iter().enumerate() {
                    let c = o
                        .validate(&format!("oidc[{i}]"), base_dir, &env, |p, k| {
                            read_secret_file(p, k).map_err(|e| (k.to_string(), e.to_string()))
                        })
                        .map_err(|(k, m)| invalid(k, m))?;
                    for (j, m) in c.target_roles.iter().enumerate() {
                        if let crate::auth::roles::Selector::Target(t) = &m.selector
                            && !targets.iter().any(|x: &TargetConfig| x.name == *t)
                        {
                            return Err(invalid(
                                format!("oidc[{i}].target_roles[{j}].target"),
                                format!("there is no target called {t}"),
                            ));
                        }
                    }
                    if out.iter().any(|x| x.name == c.name) {
                        return Err(invalid(
                            format!("oidc[{i}].name"),
                            format!("two providers are called {}", c.name),
                        ));
                    }
                    out.push(c);
                }
                out
            },
            lockout: LockoutSettings {
                max_failures,
                lock_for: Duration::from_secs(lock_minutes * 60),
            },
            connect_timeout: Duration::from_secs(connect_timeout),
            statement_timeout: Duration::from_secs(statement_timeout),
            approval_expiry: Duration::from_secs(expiry * 60),
            notifications: NotificationSettings {
                webhook_url: webhook_url.map(SecretString::from),
                notify_success: raw.notifications.notify_success.unwrap_or(false),
            },
            backups,
            jobs,
            warnings,
            windows: {
                for t in &raw.windows.templates {
                    if t.name.trim().is_empty()
                        || !t
                            .name
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                    {
                        return Err(invalid(
                            "windows.templates.name",
                            format!("`{}`: use letters, digits, - and _", t.name),
                        ));
                    }
                    if t.steps.is_empty() {
                        return Err(invalid(
                            "windows.templates.steps",
                            format!("template {} has no steps", t.name),
                        ));
                    }
                    for st in &t.steps {
                        if !WINDOW_STEP_KINDS.contains(&st.kind.as_str()) {
                            return Err(invalid(
                                "windows.templates.steps.kind",
                                format!(
                                    "template {}: `{}` is not a step kind ({})",
                                    t.name,
                                    st.kind,
                                    WINDOW_STEP_KINDS.join(", ")
                                ),
                            ));
                        }
                        if st.kind == "manual"
                            && st.title.as_deref().is_none_or(|t| t.trim().is_empty())
                        {
                            return Err(invalid(
                                "windows.templates.steps.title",
                                format!("template {}: a manual step needs a title", t.name),
                            ));
                        }
                    }
                }
                raw.windows.clone()
            },
            audit: AuditSettings {
                refuse_owner_runtime: raw.audit.refuse_owner_runtime.unwrap_or(false),
                checkpoints: {
                    let c = &raw.audit.checkpoints;
                    let signing_key = match (&c.signing_key_env, &c.signing_key_file) {
                        (Some(_), Some(_)) => {
                            return Err(invalid(
                                "audit.checkpoints.signing_key_env",
                                "set signing_key_env or signing_key_file, not both",
                            ));
                        }
                        (Some(var), None) => {
                            Some(env(var).filter(|s| !s.is_empty()).ok_or_else(|| {
                                invalid(
                                    "audit.checkpoints.signing_key_env",
                                    format!("environment variable {var} is not set"),
                                )
                            })?)
                        }
                        (None, Some(file)) => Some(read_secret_file(
                            &base_dir.join(file),
                            "audit.checkpoints.signing_key_file",
                        )?),
                        (None, None) => None,
                    };
                    if let Some(k) = &signing_key
                        && crate::audit::checkpoint::parse_seed(k).is_err()
                    {
                        return Err(invalid(
                            "audit.checkpoints.signing_key",
                            "must be 64 hex digits (make one with `dbops audit keygen`)",
                        ));
                    }
                    if let Some(p) = &c.public_key
                        && crate::audit::checkpoint::parse_public(p).is_err()
                    {
                        return Err(invalid(
                            "audit.checkpoints.public_key",
                            "must be 64 hex digits (an Ed25519 public key)",
                        ));
                    }
                    let s3 = c.s3.unwrap_or(false);
                    if s3 && backups_s3.is_none() {
                        return Err(invalid(
                            "audit.checkpoints.s3",
                            "needs [backups.s3] (the bucket checkpoints are stored in)",
                        ));
                    }
                    let interval = c.interval_seconds.unwrap_or(300);
                    if !(10..=86_400).contains(&interval) {
                        return Err(invalid(
                            "audit.checkpoints.interval_seconds",
                            "must be between 10 and 86400",
                        ));
                    }
                    CheckpointSettings {
                        signing_key: signing_key.map(SecretString::from),
                        public_key: c.public_key.clone(),
                        file: c.file.as_ref().map(|f| base_dir.join(f)),
                        s3,
                        webhook: c.webhook.unwrap_or(false),
                        interval: Duration::from_secs(interval),
                    }
                },
            },
            owner_database_url: match (&raw.owner_database_url_env, &raw.owner_database_url_file) {
                (Some(var), _) => Some(SecretString::from(
                    env(var).filter(|s| !s.is_empty()).ok_or_else(|| {
                        invalid(
                            "owner_database_url_env",
                            format!("environment variable {var} is not set"),
                        )
                    })?,
                )),
                (None, Some(file)) => Some(SecretString::from(read_secret_file(
                    &base_dir.join(file),
                    "owner_database_url_file",
                )?)),
                (None, None) => None,
            },
            restores: RestoreSettings {
                keep_previous: match raw.restores.keep_previous_days.unwrap_or(7) {
                    0 => None,
                    d if d > 3650 => {
                        return Err(invalid(
                            "restores.keep_previous_days",
                            "must be between 0 (keep until a person drops it) and 3650",
                        ));
                    }
                    d => Some(Duration::from_secs(d * 86_400)),
                },
            },
            activity: ActivitySettings {
                long_running: Duration::from_secs(long_running),
                refresh: Duration::from_secs(refresh),
            },
            reports: raw
                .reports
                .validate()
                .map_err(|(key, message)| invalid(key, message))?,
            targets,
        })
    }

    /// The configured target called `name`.
    pub fn target(&self, name: &str) -> Option<&TargetConfig> {
        self.targets.iter().find(|t| t.name == name)
    }

    /// Every secret in the configuration, so that tests and log scrubbing can make
    /// sure none of them is ever shown.
    pub fn secrets(&self) -> Vec<String> {
        let mut out = vec![];
        if let Some(w) = &self.notifications.webhook_url {
            out.push(w.expose_secret().to_string());
        }
        if let Some(t) = &self.metrics.token {
            out.push(t.expose_secret().to_string());
        }
        for o in &self.oidc {
            if let Some(s) = &o.client_secret {
                out.push(s.expose_secret().to_string());
            }
        }
        for url in std::iter::once(&self.database_url).chain(self.targets.iter().map(|t| &t.url)) {
            if let Ok(u) = url::Url::parse(url.expose_secret())
                && let Some(p) = u.password()
            {
                out.push(p.to_string());
            }
        }
        out
    }
}

/// `[metrics]`: a token from the environment or a file, or `public = true`.
fn metrics_settings(
    raw: &RawMetrics,
    base_dir: &Path,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<MetricsSettings, ConfigError> {
    let token = match (&raw.token_env, &raw.token_file) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "metrics.token_env",
                "set token_env or token_file, not both",
            ));
        }
        (Some(var), None) => Some((
            "metrics.token_env",
            env(var)
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    invalid(
                        "metrics.token_env",
                        format!("environment variable {var} is not set"),
                    )
                })?,
        )),
        (None, Some(file)) => Some((
            "metrics.token_file",
            read_secret_file(&base_dir.join(file), "metrics.token_file")?,
        )),
        (None, None) => None,
    };
    let public = raw.public.unwrap_or(false);
    if let Some((key, t)) = &token {
        if t.len() < 16 {
            return Err(invalid(
                *key,
                "the token must be at least 16 characters long",
            ));
        }
        if public {
            return Err(invalid(
                "metrics.public",
                "public = true and a token contradict each other: choose one",
            ));
        }
    }
    Ok(MetricsSettings {
        token: token.map(|(_, t)| SecretString::from(t)),
        public,
    })
}

/// A storage name a target may use: `local`, or `s3` when `[backups.s3]` is set.
fn check_storage(key: String, storage: &str, have_s3: bool) -> Result<(), ConfigError> {
    match storage {
        "local" => Ok(()),
        "s3" if have_s3 => Ok(()),
        "s3" => Err(invalid(key, "`s3` needs a [backups.s3] section")),
        other => Err(invalid(key, format!("`{other}` is not one of local, s3"))),
    }
}

fn archive_settings(
    key: &str,
    kind: TargetKind,
    t: &RawTarget,
    backup: &BackupPolicy,
    have_s3: bool,
) -> Result<Option<ArchiveSettings>, ConfigError> {
    let Some(raw) = &t.archive else {
        return Ok(None);
    };
    let k = |f: &str| format!("{key}.archive.{f}");
    if kind != TargetKind::Postgres {
        return Err(invalid(
            format!("{key}.archive"),
            "continuous archiving is for PostgreSQL targets",
        ));
    }
    let slot = raw
        .slot
        .clone()
        .unwrap_or_else(|| default_slot_name(&t.name));
    if slot.is_empty()
        || slot.len() > 63
        || !slot
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err(invalid(
            k("slot"),
            "a replication slot name is 1 to 63 characters of a-z, 0-9 and _",
        ));
    }
    let storage = raw
        .storage
        .clone()
        .unwrap_or_else(|| backup.storage.clone());
    check_storage(k("storage"), &storage, have_s3)?;
    let objective = raw.objective_minutes.unwrap_or(15);
    if objective == 0 {
        return Err(invalid(k("objective_minutes"), "must be at least 1"));
    }
    let snapshot = raw.snapshot_seconds.unwrap_or(10);
    if !(1..=3600).contains(&snapshot) {
        return Err(invalid(k("snapshot_seconds"), "must be 1 to 3600"));
    }
    if let Some(expr) = &raw.base_backup_schedule {
        crate::schedules::Schedule::parse(expr, &backup.timezone)
            .map_err(|m| invalid(k("base_backup_schedule"), m))?;
    }
    let keep = raw.keep_base_backups.unwrap_or(7);
    if keep == 0 {
        return Err(invalid(
            k("keep_base_backups"),
            "keep at least one base backup: without one nothing can be recovered",
        ));
    }
    let hours = raw.recovery_hours.unwrap_or(4);
    if !(1..=168).contains(&hours) {
        return Err(invalid(k("recovery_hours"), "must be 1 to 168"));
    }
    let compression = match raw.compression.as_deref().unwrap_or("zstd") {
        "zstd" => {
            let level = raw.compression_level.unwrap_or(1);
            if !(1..=19).contains(&level) {
                return Err(invalid(k("compression_level"), "must be 1 to 19"));
            }
            Some(crate::storage::compress::Zstd { level, threads: 1 })
        }
        "none" => None,
        other => {
            return Err(invalid(
                k("compression"),
                format!("`{other}` is not one of zstd, none"),
            ));
        }
    };
    Ok(Some(ArchiveSettings {
        compression,
        enabled: raw.enabled.unwrap_or(true),
        slot,
        storage,
        objective: Duration::from_secs(objective * 60),
        snapshot_interval: Duration::from_secs(snapshot),
        slot_warn_bytes: raw.slot_warn_mb.unwrap_or(1024).saturating_mul(1024 * 1024),
        base_backup_schedule: raw.base_backup_schedule.clone(),
        keep_base_backups: keep,
        recovery_limit: Duration::from_secs(hours * 3600),
    }))
}

fn backup_policy(
    key: &str,
    kind: TargetKind,
    raw: Option<&RawBackupPolicy>,
    have_s3: bool,
) -> Result<BackupPolicy, ConfigError> {
    let empty = RawBackupPolicy::default();
    let raw = raw.unwrap_or(&empty);
    let k = |f: &str| format!("{key}.backup.{f}");
    let timezone = raw.timezone.clone().unwrap_or_else(|| "UTC".into());
    // Checked even without a schedule: retention reads it too.
    crate::schedules::Zone::parse(&timezone).map_err(|m| invalid(k("timezone"), m))?;
    if let Some(expr) = &raw.schedule {
        crate::schedules::Schedule::parse(expr, &timezone)
            .map_err(|m| invalid(k("schedule"), m))?;
    }
    if let Some(expr) = &raw.test_restore_schedule {
        if kind != TargetKind::Postgres {
            return Err(invalid(
                k("test_restore_schedule"),
                "test restores are for PostgreSQL targets",
            ));
        }
        crate::schedules::Schedule::parse(expr, &timezone)
            .map_err(|m| invalid(k("test_restore_schedule"), m))?;
    }
    let default_format = match kind {
        TargetKind::Postgres => "custom",
        TargetKind::Redis => "logical",
    };
    let format = raw.format.clone().unwrap_or_else(|| default_format.into());
    let formats: &[&str] = match kind {
        TargetKind::Postgres => &["custom", "directory", "plain"],
        TargetKind::Redis => &["logical", "rdb"],
    };
    if !formats.contains(&format.as_str()) {
        return Err(invalid(
            k("format"),
            format!("`{format}` is not one of {}", formats.join(", ")),
        ));
    }
    let jobs = raw
        .jobs
        .unwrap_or(if format == "directory" { 2 } else { 1 });
    if !(1..=32).contains(&jobs) || (jobs > 1 && format != "directory") {
        return Err(invalid(
            k("jobs"),
            "must be 1, or 2 to 32 with the directory format",
        ));
    }
    let storage = raw.storage.clone().unwrap_or_else(|| "local".into());
    check_storage(k("storage"), &storage, have_s3)?;
    let objective = raw.objective_hours.unwrap_or(26);
    if objective == 0 {
        return Err(invalid(k("objective_hours"), "must be at least 1"));
    }
    let compression = raw.compression.clone().unwrap_or_else(|| "zstd".into());
    let compressions: &[&str] = match kind {
        TargetKind::Postgres => &["zstd", "pg_dump"],
        TargetKind::Redis => &["zstd", "none"],
    };
    if !compressions.contains(&compression.as_str()) {
        return Err(invalid(
            k("compression"),
            format!("`{compression}` is not one of {}", compressions.join(", ")),
        ));
    }
    let compression_level = raw.compression_level.unwrap_or(3);
    if !(1..=19).contains(&compression_level) {
        return Err(invalid(k("compression_level"), "must be 1 to 19"));
    }
    let compression_threads = raw
        .compression_threads
        .unwrap_or_else(crate::storage::compress::Zstd::default_threads);
    if !(1..=16).contains(&compression_threads) {
        return Err(invalid(k("compression_threads"), "must be 1 to 16"));
    }
    let policy = BackupPolicy {
        compression,
        compression_level,
        compression_threads,
        schedule: raw.schedule.clone(),
        timezone,
        format,
        jobs,
        storage,
        objective: Duration::from_secs(objective * 3600),
        keep_last: raw.keep_last.unwrap_or(3),
        daily: raw.daily.unwrap_or(7),
        weekly: raw.weekly.unwrap_or(4),
        monthly: raw.monthly.unwrap_or(6),
        test_restore: raw.test_restore.unwrap_or(false),
        test_restore_schedule: raw.test_restore_schedule.clone(),
    };
    if policy.keep_last + policy.daily + policy.weekly + policy.monthly == 0 {
        return Err(invalid(
            k("keep_last"),
            "a retention of nothing would delete every backup: keep at least one",
        ));
    }
    Ok(policy)
}

/// A PostgreSQL target's extra databases and migrations directories, checked.
fn migration_settings(
    key: &str,
    kind: TargetKind,
    t: &RawTarget,
    base_dir: &Path,
) -> Result<(Vec<String>, Vec<MigrationsDir>), ConfigError> {
    if kind != TargetKind::Postgres {
        if !t.databases.is_empty() {
            return Err(invalid(
                format!("{key}.databases"),
                "extra databases are for PostgreSQL targets",
            ));
        }
        if !t.migrations.is_empty() {
            return Err(invalid(
                format!("{key}.migrations"),
                "migrations directories are for PostgreSQL targets",
            ));
        }
        return Ok((vec![], vec![]));
    }
    let valid_db = |d: &str| !d.is_empty() && d.len() <= 63 && !d.contains('\0');
    let mut seen = HashSet::new();
    for (i, d) in t.databases.iter().enumerate() {
        if !valid_db(d) {
            return Err(invalid(
                format!("{key}.databases[{i}]"),
                "a database name is 1 to 63 characters",
            ));
        }
        if !seen.insert(d.as_str()) {
            return Err(invalid(
                format!("{key}.databases[{i}]"),
                format!("database `{d}` is listed twice"),
            ));
        }
    }
    let tools = crate::migration_status::disk::DIRECTORY_TOOLS;
    let mut dirs = Vec::new();
    for (i, m) in t.migrations.iter().enumerate() {
        let k = format!("{key}.migrations[{i}]");
        let tool = m.tool.trim().to_ascii_lowercase();
        if !tools.contains(&tool.as_str()) {
            return Err(invalid(
                format!("{k}.tool"),
                format!(
                    "`{}` is not a tool whose migrations directory dbops can read; use one of {}",
                    m.tool,
                    tools.join(", ")
                ),
            ));
        }
        if let Some(d) = &m.database
            && !valid_db(d)
        {
            return Err(invalid(
                format!("{k}.database"),
                "a database name is 1 to 63 characters",
            ));
        }
        if m.directory.as_os_str().is_empty() {
            return Err(invalid(format!("{k}.directory"), "must not be empty"));
        }
        dirs.push(MigrationsDir {
            database: m.database.clone(),
            tool,
            directory: base_dir.join(&m.directory),
        });
    }
    Ok((t.databases.clone(), dirs))
}

/// Longest `notes` text of a target, in characters.
const MAX_NOTES: usize = 4000;

/// A target's `notes`: trimmed, `None` when blank, at most [`MAX_NOTES`] characters.
fn target_notes(key: &str, notes: Option<&str>) -> Result<Option<String>, ConfigError> {
    let Some(text) = notes.map(str::trim).filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    if text.chars().count() > MAX_NOTES {
        return Err(invalid(
            format!("{key}.notes"),
            format!("is too long ({MAX_NOTES} characters at most)"),
        ));
    }
    Ok(Some(text.to_string()))
}

fn valid_target_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
        && name.len() <= 63
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

fn read_secret_file(path: &Path, key: &str) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?;
    let text = text.trim().to_string();
    if text.is_empty() {
        return Err(invalid(key, format!("{} is empty", path.display())));
    }
    Ok(text)
}

/// Checks the scheme without ever echoing the URL (it may hold a password).
fn check_url(url: &str, schemes: &[&str], key: &str) -> Result<(), ConfigError> {
    match url::Url::parse(url) {
        Ok(u) if schemes.contains(&u.scheme()) => Ok(()),
        Ok(u) => Err(invalid(
            key,
            format!(
                "scheme `{}` is not one of {}",
                u.scheme(),
                schemes.join(", ")
            ),
        )),
        Err(e) => Err(invalid(key, format!("not a valid URL ({e})"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("t.toml"), Path::new("."), |k| match k {
            "APP_URL" => Some("postgres://app:s3cret@db/app".into()),
            "CACHE_URL" => Some("redis://127.0.0.1:6379".into()),
            _ => None,
        })
    }

    #[test]
    fn a_full_config_parses_with_its_targets() {
        let c = parse(
            r#"
            listen = "127.0.0.1:9000"
            database_url = "postgres://postgres@127.0.0.1/dbops"
            [lockout]
            max_failures = 3
            [[postgres]]
            name = "app"
            url_env = "APP_URL"
            policy = "production"
            [[redis]]
            name = "cache"
            url_env = "CACHE_URL"
            policy = "dev"
            "#,
        )
        .unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.lockout.max_failures, 3);
        assert_eq!(c.targets.len(), 2);
        assert_eq!(c.target("app").unwrap().policy, Policy::Production);
        assert_eq!(c.secrets(), vec!["s3cret".to_string()]);
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "Debug must not show secrets"
        );
    }

    #[test]
    fn archived_wal_is_zstd_at_level_1_unless_the_config_says_otherwise() {
        let with = |extra: &str| {
            parse(&format!(
                "[[postgres]]\nname = \"app\"\nurl_env = \"APP_URL\"\npolicy = \"dev\"\n[postgres.archive]\n{extra}\n"
            ))
        };
        let c = with("").unwrap();
        let z = c
            .target("app")
            .unwrap()
            .archive
            .as_ref()
            .unwrap()
            .compression;
        assert_eq!(
            z,
            Some(crate::storage::compress::Zstd {
                level: 1,
                threads: 1
            })
        );
        let c = with("compression = \"none\"").unwrap();
        assert_eq!(
            c.target("app")
                .unwrap()
                .archive
                .as_ref()
                .unwrap()
                .compression,
            None
        );
        let c = with("compression_level = 9").unwrap();
        assert_eq!(
            c.target("app")
                .unwrap()
                .archive
                .as_ref()
                .unwrap()
                .compression
                .unwrap()
                .level,
            9
        );
        assert!(
            with("compression = \"lz4\"")
                .unwrap_err()
                .to_string()
                .contains("zstd, none")
        );
        assert!(with("compression_level = 0").is_err());
    }

    #[test]
    fn notes_of_both_kinds_of_target_are_optional_trimmed_and_bounded() {
        let c = parse(
            r#"
            [[postgres]]
            name = "app"
            url_env = "APP_URL"
            policy = "production"
            notes = """
              Orders live here.
              Call the payments team before touching it.
            """
            [[redis]]
            name = "cache"
            url_env = "CACHE_URL"
            policy = "dev"
            notes = "   "
            "#,
        )
        .unwrap();
        assert_eq!(
            c.target("app").unwrap().notes.as_deref(),
            Some("Orders live here.\n              Call the payments team before touching it.")
        );
        assert_eq!(c.target("cache").unwrap().notes, None);
        let long = "x".repeat(MAX_NOTES + 1);
        let err = parse(&format!(
            "[[redis]]\nname = \"cache\"\nurl_env = \"CACHE_URL\"\npolicy = \"dev\"\nnotes = \"{long}\"\n"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("redis[0].notes"), "{err}");
    }

    #[test]
    fn cookies_are_secure_by_default_unless_dbops_listens_on_loopback() {
        let loopback: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let everywhere: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        let lan: SocketAddr = "[2001:db8::1]:8080".parse().unwrap();
        let c = parse("").unwrap();
        assert_eq!(c.session.secure_cookies, None);
        assert!(!c.session.secure_cookies_for(loopback));
        assert!(c.session.secure_cookies_for(everywhere));
        assert!(c.session.secure_cookies_for(lan));
        assert_eq!(c.session.cookie_warning(everywhere), None);
        let off = parse("[session]\nsecure_cookies = false").unwrap();
        assert!(!off.session.secure_cookies_for(everywhere));
        let warning = off.session.cookie_warning(everywhere).unwrap();
        assert!(warning.contains("0.0.0.0:8080"), "{warning}");
        assert_eq!(off.session.cookie_warning(loopback), None);
        let on = parse("[session]\nsecure_cookies = true").unwrap();
        assert!(on.session.secure_cookies_for(loopback));
    }

    #[test]
    fn metrics_need_a_token_or_an_explicit_public() {
        let c = parse("").unwrap();
        assert!(c.metrics.token.is_none() && !c.metrics.public);
        let c = Config::from_toml(
            "[metrics]\ntoken_env = \"M\"",
            Path::new("t.toml"),
            Path::new("."),
            |k| (k == "M").then(|| "0123456789abcdef-token".to_string()),
        )
        .unwrap();
        assert_eq!(
            c.metrics.token.as_ref().unwrap().expose_secret(),
            "0123456789abcdef-token"
        );
        assert!(c.secrets().contains(&"0123456789abcdef-token".to_string()));
        assert!(!format!("{c:?}").contains("0123456789abcdef-token"));
        assert!(parse("[metrics]\npublic = true").unwrap().metrics.public);
        for (text, key) in [
            ("[metrics]\ntoken_env = \"NOPE\"", "metrics.token_env"),
            (
                "[metrics]\ntoken_env = \"APP_URL\"\npublic = true",
                "metrics.public",
            ),
            (
                "[metrics]\ntoken_env = \"A\"\ntoken_file = \"f\"",
                "metrics.token_env",
            ),
            ("[metrics]\ntoken = \"x\"", "token"),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn errors_name_the_key_that_is_wrong() {
        let cases = [
            ("listen = \"nope\"", "listen"),
            (
                "[[postgres]]\nname = \"app\"\nurl_env = \"MISSING\"\npolicy = \"dev\"",
                "postgres[0].url_env",
            ),
            (
                "[[postgres]]\nname = \"App!\"\nurl_env = \"APP_URL\"\npolicy = \"dev\"",
                "postgres[0].name",
            ),
            (
                "[[redis]]\nname = \"c\"\nurl_env = \"APP_URL\"\npolicy = \"dev\"",
                "redis[0] connection URL",
            ),
            ("[lockout]\nmax_failures = 0", "lockout.max_failures"),
            ("log_format = \"xml\"", "log_format"),
        ];
        for (text, key) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(key), "{err} should name {key}");
            assert!(!err.contains("s3cret"), "{err} leaks a secret");
        }
        let err = parse("[[postgres]]\nname = \"a\"\npolicy = \"prod\"\nurl_env=\"APP_URL\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("policy"), "{err}");
        let err = parse("listn = \"x\"").unwrap_err().to_string();
        assert!(err.contains("listn"), "{err}");
    }
}
