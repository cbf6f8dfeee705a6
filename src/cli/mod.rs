//! The command-line subcommands: `serve`, `migrate`, `user …`, `audit verify`,
//! `backup …`, `restore`.
//! Changes made here are written to the operations log like those made in the UI,
//! with the operating-system user as the actor (`cli:alice`).
//!
//! Over 600 lines: the subcommands that are each a few lines of glue (serve,
//! migrate, user, audit, backup, restore) stay together; bigger ones (archive,
//! pitr, redis) have files of their own.

pub mod archive;
pub mod pitr;
pub mod redis;
pub mod window;

use std::{io::IsTerminal, net::SocketAddr, path::Path, process::ExitCode};

use anyhow::{Context, bail};
use clap::Subcommand;
use serde_json::json;
use sqlx::PgPool;

use crate::{
    app::{self, AppState, Application},
    audit::{self, AuditCtx, Entry},
    auth::{
        Role, password,
        users::{self, Username},
    },
    config::Config,
};

/// `dbops migrations …`
#[derive(Subcommand)]
pub enum MigrationsCommand {
    /// Print the JSON manifest of a migrations directory (names and the checksums
    /// the tool keeps), read as the migrations page reads it, for a pipeline to
    /// post with its deploy (`POST /api/v1/targets/NAME/migrations/deploys`).
    /// Needs no config and no database.
    Manifest {
        /// The migrations directory (for Django the project folder holding the apps).
        #[arg(value_name = "DIR")]
        dir: std::path::PathBuf,
        /// The tool: sqlx, prisma, flyway, drizzle, alembic, django, knex,
        /// sequelize, typeorm, dbmate, node-pg-migrate, goose, golang-migrate,
        /// rails, diesel, refinery, liquibase, sqitch, atlas, graphile-migrate.
        #[arg(long, value_name = "TOOL")]
        tool: String,
    },
}

/// `dbops migrations manifest DIR --tool T`: the manifest on stdout; a directory
/// dbops cannot read is an error (exit 1) naming it.
pub fn migrations(cmd: MigrationsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        MigrationsCommand::Manifest { dir, tool } => {
            let manifest = crate::migration_status::deploys::Manifest::from_dir(&tool, &dir)
                .map_err(anyhow::Error::msg)?;
            println!("{}", serde_json::to_string_pretty(&manifest)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `dbops user …`
#[derive(Subcommand)]
pub enum UserCommand {
    /// Create a user. The password is read from stdin with --password-stdin, else
    /// asked for at a prompt.
    Add {
        #[arg(long)]
        username: String,
        #[arg(long)]
        role: String,
        #[arg(long)]
        password_stdin: bool,
    },
    /// List users.
    List,
    /// Disable a user (their sessions end at once).
    Disable {
        #[arg(long)]
        username: String,
    },
    /// Enable a disabled user.
    Enable {
        #[arg(long)]
        username: String,
    },
    /// Change a user's role.
    SetRole {
        #[arg(long)]
        username: String,
        #[arg(long)]
        role: String,
    },
    /// Set a new password (and lift a lockout).
    ResetPassword {
        #[arg(long)]
        username: String,
        #[arg(long)]
        password_stdin: bool,
    },
}

/// `dbops backup …`
#[derive(Subcommand)]
pub enum BackupCommand {
    /// Take a backup of a target with its policy. With --wait it runs here and now
    /// (no `dbops serve` needed) and the exit code says whether it is good;
    /// without, it is queued for the serving dbops' workers.
    Run {
        #[arg(long)]
        target: String,
        #[arg(long)]
        wait: bool,
        /// Override the policy's format (custom, directory, plain; logical, rdb).
        #[arg(long)]
        format: Option<String>,
    },
    /// The newest backups.
    List {
        #[arg(long)]
        target: Option<String>,
    },
}

/// Sets up logging: `RUST_LOG` decides the level (default info); JSON when the
/// config says `log_format = "json"`.
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,sqlx=warn,tower_sessions=warn")
    });
    // Colours only on a terminal: a journal, a file or a pipe gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

fn load(path: Option<&Path>) -> anyhow::Result<Config> {
    let config = Config::load(path)?;
    init_logging(config.json_logs);
    Ok(config)
}

async fn console(config: &Config) -> anyhow::Result<PgPool> {
    app::process_init();
    let db = app::connect_console(config).await?;
    app::migrate(&db).await?;
    Ok(db)
}

/// `dbops serve`
pub async fn serve(
    config_path: Option<&Path>,
    listen: Option<SocketAddr>,
) -> anyhow::Result<ExitCode> {
    let config = load(config_path)?;
    let addr = listen.unwrap_or(config.listen);
    let app = Application::build(config, addr).await?;
    bootstrap_admin(&app.state.db, |k| std::env::var(k).ok()).await?;
    app.run_until(app::shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// Creates the first admin of a console that has no user yet, from
/// `DBOPS_BOOTSTRAP_ADMIN` (the name) and `DBOPS_BOOTSTRAP_ADMIN_PASSWORD_FILE`
/// (a file holding the password: a container secret, never the environment).
/// Does nothing once any user exists, so the variables may stay set; replicas
/// starting together take turns (an advisory lock), so one admin is made.
pub async fn bootstrap_admin(
    db: &PgPool,
    env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<()> {
    const LOCK: i64 = 0x6462_6f70_735f_6261; // "dbops_ba"
    let Some(name) = env("DBOPS_BOOTSTRAP_ADMIN").filter(|n| !n.trim().is_empty()) else {
        return Ok(());
    };
    let Some(file) = env("DBOPS_BOOTSTRAP_ADMIN_PASSWORD_FILE").filter(|f| !f.is_empty()) else {
        bail!(
            "DBOPS_BOOTSTRAP_ADMIN is set but DBOPS_BOOTSTRAP_ADMIN_PASSWORD_FILE is not: the first admin's \
             password comes from a file (a secret), never from the environment"
        );
    };
    let mut tx = db.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(LOCK)
        .execute(&mut *tx)
        .await?;
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&mut *tx)
        .await?;
    if users > 0 {
        tracing::info!("the console has users: DBOPS_BOOTSTRAP_ADMIN is ignored");
        return Ok(());
    }
    let username =
        Username::parse(name.trim()).map_err(|m| anyhow::anyhow!("DBOPS_BOOTSTRAP_ADMIN: {m}"))?;
    let text = std::fs::read_to_string(&file).with_context(|| {
        format!(
            "reading the first admin's password from {file} (DBOPS_BOOTSTRAP_ADMIN_PASSWORD_FILE)"
        )
    })?;
    let pw = text.trim_end_matches(['\n', '\r']);
    password::check_strength(pw).map_err(|m| {
        anyhow::anyhow!("the password in {file} (DBOPS_BOOTSTRAP_ADMIN_PASSWORD_FILE): {m}")
    })?;
    let hash = password::hash(pw)?;
    let id = users::create(&mut *tx, &username, &hash, Role::Admin).await?;
    audit::record(
        &mut *tx,
        &AuditCtx::system(),
        Entry::new("user.create")
            .params(json!({ "username": username.as_str(), "role": "admin", "bootstrap": true }))
            .result(json!({ "user_id": id })),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(username = %username.as_str(), "created the first admin from DBOPS_BOOTSTRAP_ADMIN");
    Ok(())
}

/// `dbops healthcheck --port N`: asks `GET /healthz` on 127.0.0.1:N over plain
/// HTTP/1.0 (a few bytes; no HTTP client or TLS set-up) and exits 0 on a 200.
pub async fn healthcheck(port: u16) -> anyhow::Result<ExitCode> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let timeout = std::time::Duration::from_secs(4);
    let ask = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await?;
        let mut head = Vec::new();
        s.take(512).read_to_end(&mut head).await?;
        Ok::<_, std::io::Error>(head)
    };
    let answer = match tokio::time::timeout(timeout, ask).await {
        Ok(Ok(head)) => head,
        Ok(Err(e)) => {
            eprintln!("unhealthy: nothing answers on 127.0.0.1:{port}: {e}");
            return Ok(ExitCode::FAILURE);
        }
        Err(_) => {
            eprintln!("unhealthy: 127.0.0.1:{port} did not answer within {timeout:?}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let status = String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    if status.split_whitespace().nth(1) == Some("200") {
        println!("healthy");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("unhealthy: /healthz answered `{status}`");
        Ok(ExitCode::FAILURE)
    }
}

/// `dbops migrate [--runtime-role ROLE [--runtime-password-env VAR]]`: applies
/// the schema as its owner (`owner_database_url`, else `database_url`) and, when
/// asked, creates and grants the role dbops runs as.
pub async fn migrate(
    config_path: Option<&Path>,
    runtime_role: Option<&str>,
    runtime_password_env: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let mut config = load(config_path)?;
    if let Some(owner) = config.owner_database_url.clone() {
        config.database_url = owner;
    }
    let db = console(&config).await?;
    let mut done = json!({});
    if let Some(role) = runtime_role {
        if role.is_empty() || role.len() > 63 || role.chars().any(char::is_control) {
            bail!("the runtime role must be 1 to 63 characters, no control characters");
        }
        let password = match runtime_password_env {
            Some(var) => Some(
                std::env::var(var)
                    .ok()
                    .filter(|p| !p.is_empty())
                    .with_context(|| format!("environment variable {var} is not set"))?,
            ),
            None => None,
        };
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)")
                .bind(role)
                .fetch_one(&db)
                .await?;
        let quoted = app::quote_ident(role);
        if !exists {
            sqlx::query(&format!("CREATE ROLE {quoted} LOGIN"))
                .execute(&db)
                .await
                .with_context(|| {
                    format!("creating the role {role} (the owner needs CREATEROLE)")
                })?;
        }
        if let Some(pw) = password {
            // A literal, not a bind parameter: ALTER ROLE takes no parameters.
            // It never reaches a log line (dbops logs no statements).
            sqlx::query(&format!(
                "ALTER ROLE {quoted} LOGIN PASSWORD '{}'",
                pw.replace('\'', "''")
            ))
            .execute(&db)
            .await
            .with_context(|| format!("setting the password of {role}"))?;
        }
        sqlx::query("SELECT dbops_grant_runtime($1)")
            .bind(role)
            .execute(&db)
            .await
            .with_context(|| format!("granting {role} what dbops needs"))?;
        let owns: bool = sqlx::query_scalar(
            "SELECT pg_has_role($1, (SELECT relowner FROM pg_class WHERE oid = 'public.operations'::regclass), 'MEMBER')
                 OR (SELECT rolsuper FROM pg_roles WHERE rolname = $1)",
        )
        .bind(role)
        .fetch_one(&db)
        .await?;
        if owns {
            bail!(
                "{role} owns the operations log or is a superuser: it could switch the log's triggers off. \
                 Choose a role that owns nothing"
            );
        }
        done = json!({ "runtime_role": role, "created": !exists });
        println!(
            "{role} may read and write dbops' tables and owns nothing: set database_url to connect as {role}, and \
             owner_database_url_env (or _file) for `dbops migrate`."
        );
    }
    audit::record(
        &db,
        &AuditCtx::cli(),
        Entry::new("console.migrate").params(done),
    )
    .await?;
    println!("The console database is up to date.");
    Ok(ExitCode::SUCCESS)
}

/// `dbops audit verify`
pub async fn audit_verify(config_path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let config = load(config_path)?;
    let db = console(&config).await?;
    let report = audit::verify(&db).await?;
    if let Some((id, what)) = &report.first_problem {
        match id {
            Some(id) => {
                eprintln!("The operations log has been tampered with: operation {id}: {what}.")
            }
            None => eprintln!("The operations log has been tampered with: {what}."),
        }
        return Ok(ExitCode::from(1));
    }
    println!(
        "The hash chain is whole: {} finished operations verified.",
        report.checked
    );
    let settings = &config.audit.checkpoints;
    if settings.signing_key.is_none() && settings.public_key.is_none() {
        println!(
            "No checkpoints are configured ([audit.checkpoints]): whoever can rewrite the chain in the database \
             (the log's owner, a superuser) could change the log unnoticed."
        );
        return Ok(ExitCode::SUCCESS);
    }
    let s3 = s3_witness(&config)?;
    let object = s3
        .as_ref()
        .map(|s| s as &dyn audit::checkpoint::ObjectWitness);
    let cp = audit::checkpoint::verify(&db, settings, object)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    if cp.problem.is_some() {
        eprintln!(
            "The operations log has been tampered with: {}",
            cp.statement()
        );
        return Ok(ExitCode::from(1));
    }
    println!("{}", cp.statement());
    Ok(ExitCode::SUCCESS)
}

/// The `[backups.s3]` bucket as a checkpoint witness, when checkpoints go there.
fn s3_witness(config: &Config) -> anyhow::Result<Option<crate::storage::S3Storage>> {
    Ok(match (&config.backups.s3, config.audit.checkpoints.s3) {
        (Some(s3), true) => Some(
            crate::storage::S3Storage::from_config(s3)
                .map_err(|e| anyhow::anyhow!("backups.s3: {e}"))?,
        ),
        _ => None,
    })
}

/// `dbops audit checkpoint`
pub async fn audit_checkpoint(config_path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let config = load(config_path)?;
    if !config.audit.checkpoints.enabled() {
        bail!("[audit.checkpoints] needs a signing key and a witness (file, s3 or webhook)");
    }
    let db = console(&config).await?;
    let s3 = s3_witness(&config)?;
    let object = s3
        .as_ref()
        .map(|s| s as &dyn audit::checkpoint::ObjectWitness);
    let webhook = config.notifications.webhook_url.clone();
    let mut text = None;
    let cp = audit::checkpoint::write(
        &db,
        &config.audit.checkpoints,
        object,
        |t| text = Some(t),
        true,
    )
    .await
    .map_err(|e| anyhow::anyhow!(e))?
    .context("checkpoints are off")?;
    if let (Some(url), Some(text)) = (webhook, text) {
        use secrecy::ExposeSecret;
        reqwest::Client::new()
            .post(url.expose_secret())
            .timeout(std::time::Duration::from_secs(5))
            .json(&json!({ "text": text }))
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .context("posting the checkpoint to the webhook")?;
    }
    println!(
        "Signed chain position {} (head {}) at {}.",
        cp.seq, cp.head, cp.at
    );
    Ok(ExitCode::SUCCESS)
}

/// `dbops audit keygen --out FILE`
pub fn audit_keygen(out: &Path) -> anyhow::Result<ExitCode> {
    let (seed, public) = audit::checkpoint::generate();
    audit::checkpoint::write_key_file(&out.to_path_buf(), &seed).map_err(|e| anyhow::anyhow!(e))?;
    println!("{public}");
    eprintln!(
        "The signing key is in {} (keep it off the console database's machine). Put the public key above in \
         [audit.checkpoints] public_key on the machines that only verify.",
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Reads a password from stdin (one line) or, on a terminal, from a prompt that
/// does not echo.
fn read_password(from_stdin: bool) -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    let pw = if from_stdin || !stdin.is_terminal() {
        let mut line = String::new();
        stdin
            .read_line(&mut line)
            .context("reading the password from stdin")?;
        line.trim_end_matches(['\n', '\r']).to_string()
    } else {
        let first = prompt_hidden("Password: ")?;
        let again = prompt_hidden("Password again: ")?;
        if first != again {
            bail!("the two passwords differ");
        }
        first
    };
    password::check_strength(&pw).map_err(|m| anyhow::anyhow!(m))?;
    Ok(pw)
}

fn prompt_hidden(prompt: &str) -> anyhow::Result<String> {
    use std::io::Write;
    eprint!("{prompt}");
    std::io::stderr().flush()?;
    let fd = libc::STDIN_FILENO;
    // SAFETY: termios is plain data; tcgetattr/tcsetattr only read/write it for a
    // valid descriptor, and the old settings are restored before returning.
    let mut term: libc::termios = unsafe { std::mem::zeroed() };
    let have_tty = unsafe { libc::tcgetattr(fd, &mut term) } == 0;
    let old = term;
    if have_tty {
        term.c_lflag &= !libc::ECHO;
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &term) };
    }
    let mut line = String::new();
    let read = std::io::stdin().read_line(&mut line);
    if have_tty {
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &old) };
    }
    eprintln!();
    read?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

fn parse_role(s: &str) -> anyhow::Result<Role> {
    Role::parse(s).ok_or_else(|| {
        anyhow::anyhow!("`{s}` is not a role; use viewer, operator, approver or admin")
    })
}

async fn find(db: &PgPool, username: &str) -> anyhow::Result<users::User> {
    users::find_by_username(db, username)
        .await?
        .ok_or_else(|| anyhow::anyhow!("there is no user called {username}"))
}

/// `dbops backup …`
pub async fn backup(config_path: Option<&Path>, cmd: BackupCommand) -> anyhow::Result<ExitCode> {
    use crate::{
        backups::run::{self, BackupRequest, Trigger},
        pg_tools::{DumpOptions, Format},
    };
    let config = load(config_path)?;
    match cmd {
        BackupCommand::List { target } => {
            let db = console(&config).await?;
            println!(
                "{:>6}  {:<16} {:<11} {:<20} {:>10}  {:<8} sha256",
                "id", "target", "status", "started", "size", "took"
            );
            for b in crate::backups::list(&db, target.as_deref(), None, 50).await? {
                let started = b
                    .started_at
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                    .unwrap_or_default();
                println!(
                    "{:>6}  {:<16} {:<11} {:<20} {:>10}  {:<8} {}",
                    b.id,
                    b.target,
                    b.status,
                    started,
                    b.size(),
                    b.duration(),
                    b.checksum_prefix()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        BackupCommand::Run {
            target,
            wait,
            format,
        } => {
            let kind = config.target(&target).map(|t| t.kind).ok_or_else(|| {
                anyhow::anyhow!("there is no target called {target} in the config")
            })?;
            let mut req = BackupRequest::default();
            if let Some(f) = format {
                match kind {
                    crate::config::TargetKind::Postgres => {
                        let format = Format::parse(&f).ok_or_else(|| {
                            anyhow::anyhow!("`{f}` is not one of custom, directory, plain")
                        })?;
                        let jobs = config.target(&target).map(|t| t.backup.jobs).unwrap_or(1);
                        req.options = Some(DumpOptions {
                            format,
                            jobs: if format == Format::Directory {
                                jobs.max(2)
                            } else {
                                1
                            },
                            ..DumpOptions::default()
                        });
                    }
                    crate::config::TargetKind::Redis => req.redis_format = Some(f),
                }
            }
            let app = Application::build(config, "127.0.0.1:0".parse()?).await?;
            let state = app.state.clone();
            let ctx = AuditCtx::cli();
            if !wait {
                let id = run::request(&state, &ctx, &target, Trigger::Cli, req).await?;
                println!("Backup #{id} of {target} is queued; a serving dbops runs it.");
                return Ok(ExitCode::SUCCESS);
            }
            req.run_here = true;
            let id = run::request(&state, &ctx, &target, Trigger::Cli, req).await?;
            eprintln!("Backup #{id} of {target} is running here …");
            let cancel = state.shutdown.clone();
            let interrupt = tokio::spawn(async move {
                app::shutdown_signal().await;
                cancel.cancel();
            });
            run::run_here(&state, id, &state.shutdown.child_token()).await;
            interrupt.abort();
            let b = crate::backups::find(&state.db, id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("the backup row vanished"))?;
            if b.status == "good" {
                println!(
                    "Backup #{id} of {target} is good: {} in {}, sha256 {}, stored as {}",
                    b.size(),
                    b.duration(),
                    b.sha256.unwrap_or_default(),
                    b.storage_key.unwrap_or_default()
                );
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!(
                    "Backup #{id} of {target} {}: {}",
                    b.status,
                    b.error.unwrap_or_default()
                );
                Ok(ExitCode::from(1))
            }
        }
    }
}

/// `dbops restore`: restore a backup into a NEW database (`--backup ID --into
/// NAME [--target T]`), or run an approved restore over a database
/// (`--request ID --as USER`): the destructive kind only ever through a request
/// a second person approved.
#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// The backup's id (`dbops backup list`).
    #[arg(long, required_unless_present = "request")]
    backup: Option<i64>,
    /// The new database's name (must not exist).
    #[arg(long, value_name = "NAME", requires = "backup")]
    into: Option<String>,
    /// The target to restore into (default: the backup's own).
    #[arg(long, value_name = "TARGET", requires = "backup")]
    target: Option<String>,
    /// Parallel pg_restore jobs (default: the CPUs here, at most 8).
    #[arg(long)]
    jobs: Option<u32>,
    /// Only the definitions.
    #[arg(long)]
    schema_only: bool,
    /// Only the rows.
    #[arg(long)]
    data_only: bool,
    /// Only this schema (repeatable).
    #[arg(long = "schema", value_name = "SCHEMA")]
    schemas: Vec<String>,
    /// Only this table (repeatable).
    #[arg(long = "table", value_name = "TABLE")]
    tables: Vec<String>,
    /// Keep the archive's owners and privileges.
    #[arg(long)]
    keep_owner: bool,
    /// Restore as this role (SET ROLE).
    #[arg(long)]
    role: Option<String>,
    /// All or nothing (runs with one job).
    #[arg(long)]
    single_transaction: bool,
    /// Run this approved `restore.over` request.
    #[arg(long, value_name = "ID", conflicts_with_all = ["backup", "into", "target"])]
    request: Option<i64>,
    /// The dbops user running the request: its requester or an approver.
    #[arg(long = "as", value_name = "USER", requires = "request")]
    as_user: Option<String>,
}

/// Runs the restore's job here and waits for its end (a running `dbops serve`
/// may have taken the job first: then this waits for it there), printing the
/// outcome.
async fn wait_for_restore(state: &AppState, id: i64) -> anyhow::Result<ExitCode> {
    use crate::restores as restore;
    let r = restore::find(&state.db, id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("the restore row vanished"))?;
    eprintln!(
        "Restore #{id}: {} into {} on {} …",
        r.source(),
        r.database,
        r.target
    );
    let cancel = state.shutdown.clone();
    let interrupt = tokio::spawn(async move {
        app::shutdown_signal().await;
        cancel.cancel();
    });
    if let Some(job) = r.job_id {
        crate::jobs::run(state, job, &state.shutdown.child_token()).await;
    }
    let r = loop {
        let r = restore::find(&state.db, id)
            .await?
            .ok_or_else(|| anyhow::anyhow!("the restore row vanished"))?;
        if !r.is_active() || state.shutdown.is_cancelled() {
            break r;
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    };
    interrupt.abort();
    if r.status != "succeeded" {
        eprintln!(
            "Restore #{id} into {} {}: {}",
            r.database,
            r.status,
            r.error.unwrap_or_default()
        );
        return Ok(ExitCode::from(1));
    }
    println!(
        "Restore #{id}: {} restored into {} in {}: {} tables, {} rows.",
        r.source(),
        r.database,
        r.duration(),
        r.tables().len(),
        r.rows().unwrap_or(0)
    );
    for (table, rows, recorded) in r.tables() {
        match recorded {
            Some(b) => println!("  {table:<48} {rows:>12}   (backup: {b})"),
            None => println!("  {table:<48} {rows:>12}"),
        }
    }
    if let Some(c) = r.comparison() {
        println!("Compared: {c}.");
    }
    Ok(ExitCode::SUCCESS)
}

/// `dbops restore …` (see [`RestoreArgs`]).
pub async fn restore(config_path: Option<&Path>, args: RestoreArgs) -> anyhow::Result<ExitCode> {
    use crate::restores::{self, RestoreError, RestoreOptions, RestoreRequest};
    let config = load(config_path)?;
    let app = Application::build(config, "127.0.0.1:0".parse()?).await?;
    let state = app.state.clone();
    if let Some(request) = args.request {
        let Some(name) = args.as_user else {
            eprintln!("Say who runs the request: --as USER (its requester or an approver).");
            return Ok(ExitCode::from(2));
        };
        let Some(u) = users::find_by_username(&state.db, &name).await? else {
            eprintln!("There is no dbops user called {name}.");
            return Ok(ExitCode::from(1));
        };
        if u.disabled {
            eprintln!("The user {name} is disabled.");
            return Ok(ExitCode::from(1));
        }
        let user = crate::auth::CurrentUser {
            id: u.id,
            username: u.username.clone(),
            role: u.role(),
            csrf_token: String::new(),
        };
        let ctx = AuditCtx::cli().with_user(&user);
        match crate::approvals::find(&state.db, request).await? {
            Some(r) if r.kind == "restore.over" => {}
            Some(r) => {
                eprintln!("Request #{request} is a {} request, not a restore.", r.kind);
                return Ok(ExitCode::from(1));
            }
            None => {
                eprintln!("There is no request #{request}.");
                return Ok(ExitCode::from(1));
            }
        }
        let req = match crate::approvals::execute(&state, &ctx, &user, request).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("Refused: {e}");
                return Ok(ExitCode::from(1));
            }
        };
        if let Some(e) = &req.error {
            eprintln!("Request #{request} failed: {e}");
            return Ok(ExitCode::from(1));
        }
        let Some(rid) = crate::jobs::for_approval(&state.db, request)
            .await?
            .and_then(|j| j.params["restore_id"].as_i64())
        else {
            eprintln!("Request #{request} started no restore.");
            return Ok(ExitCode::from(1));
        };
        return wait_for_restore(&state, rid).await;
    }
    let (Some(backup), Some(into)) = (args.backup, args.into) else {
        eprintln!("Say which backup and the new database: --backup ID --into NAME.");
        return Ok(ExitCode::from(2));
    };
    let req = RestoreRequest {
        backup_id: backup,
        database: into,
        jobs: args.jobs,
        target: args.target,
        options: RestoreOptions {
            schema_only: args.schema_only,
            data_only: args.data_only,
            schemas: args.schemas,
            tables: args.tables,
            no_owner: !args.keep_owner,
            role: args.role,
            single_transaction: args.single_transaction,
        },
    };
    let id = match restores::request(&state, &AuditCtx::cli(), &req).await {
        Ok(id) => id,
        Err(RestoreError::Refused(msg)) => {
            eprintln!("Refused: {msg}");
            return Ok(ExitCode::from(1));
        }
        Err(e) => return Err(e.into()),
    };
    wait_for_restore(&state, id).await
}

/// `dbops user …`
pub async fn user(config_path: Option<&Path>, cmd: UserCommand) -> anyhow::Result<ExitCode> {
    let config = load(config_path)?;
    let db = console(&config).await?;
    let ctx = AuditCtx::cli();
    match cmd {
        UserCommand::Add {
            username,
            role,
            password_stdin,
        } => {
            let name = Username::parse(&username).map_err(|m| anyhow::anyhow!(m))?;
            let role = parse_role(&role)?;
            let pw = read_password(password_stdin)?;
            let hash = password::hash(&pw)?;
            let mut tx = db.begin().await?;
            let id = users::create(&mut *tx, &name, &hash, role).await?;
            audit::record(
                &mut *tx,
                &ctx,
                Entry::new("user.create")
                    .params(json!({ "username": name.as_str(), "role": role.as_str() }))
                    .result(json!({ "user_id": id })),
            )
            .await?;
            tx.commit().await?;
            println!("Created {} with the {role} role.", name.as_str());
        }
        UserCommand::List => {
            println!(
                "{:<24} {:<9} {:<9} last sign-in",
                "username", "role", "state"
            );
            for u in users::list(&db).await? {
                let state = if u.disabled {
                    "disabled"
                } else if u.locked_now() {
                    "locked"
                } else {
                    "active"
                };
                let last = u
                    .last_login_at
                    .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
                    .unwrap_or_else(|| "never".into());
                println!("{:<24} {:<9} {:<9} {last}", u.username, u.role, state);
            }
        }
        UserCommand::Disable { username } => {
            let u = find(&db, &username).await?;
            let mut tx = db.begin().await?;
            if u.role() == Role::Admin
                && users::count_other_active_admins(&mut *tx, u.id).await? == 0
            {
                bail!("{} is the last admin and cannot be disabled", u.username);
            }
            users::set_disabled(&mut *tx, u.id, true).await?;
            audit::record(
                &mut *tx,
                &ctx,
                Entry::new("user.disable")
                    .params(json!({ "user_id": u.id, "username": u.username })),
            )
            .await?;
            tx.commit().await?;
            println!("Disabled {}.", u.username);
        }
        UserCommand::Enable { username } => {
            let u = find(&db, &username).await?;
            let mut tx = db.begin().await?;
            users::set_disabled(&mut *tx, u.id, false).await?;
            audit::record(
                &mut *tx,
                &ctx,
                Entry::new("user.enable")
                    .params(json!({ "user_id": u.id, "username": u.username })),
            )
            .await?;
            tx.commit().await?;
            println!("Enabled {}.", u.username);
        }
        UserCommand::SetRole { username, role } => {
            let u = find(&db, &username).await?;
            let role = parse_role(&role)?;
            let mut tx = db.begin().await?;
            if u.role() == Role::Admin
                && role != Role::Admin
                && users::count_other_active_admins(&mut *tx, u.id).await? == 0
            {
                bail!(
                    "{} is the last admin; make someone else admin first",
                    u.username
                );
            }
            users::set_role(&mut *tx, u.id, role).await?;
            audit::record(&mut *tx, &ctx, Entry::new("user.role.change").params(json!({ "user_id": u.id, "username": u.username, "old_role": u.role, "new_role": role.as_str() }))).await?;
            tx.commit().await?;
            println!("{} now has the {role} role.", u.username);
        }
        UserCommand::ResetPassword {
            username,
            password_stdin,
        } => {
            let u = find(&db, &username).await?;
            let pw = read_password(password_stdin)?;
            let hash = password::hash(&pw)?;
            let mut tx = db.begin().await?;
            users::set_password(&mut *tx, u.id, &hash).await?;
            audit::record(
                &mut *tx,
                &ctx,
                Entry::new("user.password.reset")
                    .params(json!({ "user_id": u.id, "username": u.username })),
            )
            .await?;
            tx.commit().await?;
            println!(
                "Set a new password for {}; their sessions have ended.",
                u.username
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

// ---- reports (PRODUCT C7): `dbops report refresh` ----------------------------

/// `dbops report …`
#[derive(Subcommand)]
pub enum ReportCommand {
    /// Compute reports of a PostgreSQL target now and store them (what the Refresh
    /// button does, without a running `dbops serve`); prints how long each took.
    Refresh {
        #[arg(long)]
        target: String,
        /// space, bloat, indexes, health, statements, or all.
        #[arg(long, default_value = "all")]
        report: String,
    },
}

/// `dbops report refresh`
pub async fn report(config_path: Option<&Path>, cmd: ReportCommand) -> anyhow::Result<ExitCode> {
    use crate::reports::{NoProgress, Report};
    let ReportCommand::Refresh { target, report } = cmd;
    let config = load(config_path)?;
    let db = console(&config).await?;
    let registry = crate::targets::Registry::new(&config);
    let t = registry
        .get(&target)
        .with_context(|| format!("there is no target called {target} in the config file"))?;
    if t.kind() != crate::config::TargetKind::Postgres {
        bail!("{target} is not a PostgreSQL target; reports are about PostgreSQL");
    }
    let reports: Vec<Report> = if report == "all" {
        Report::ALL.to_vec()
    } else {
        vec![Report::parse(&report).with_context(|| {
            format!("{report} is not a report (space, bloat, indexes, health, statements or all)")
        })?]
    };
    let mut failed = false;
    for r in reports {
        let started = std::time::Instant::now();
        let outcome =
            crate::reports::jobs::refresh_with(&db, &config, &t, r, None, &NoProgress).await;
        let entry = Entry::new(r.job_kind())
            .target(target.clone())
            .params(json!({ "via": "command line" }));
        let entry = match &outcome {
            Ok(v) => entry.result(v.clone()),
            Err(e) => entry.failed(e.clone()),
        };
        audit::record(&db, &AuditCtx::cli(), entry).await?;
        match outcome {
            Ok(v) => println!(
                "{:<11} {:>8.3} s  {} rows, {} skipped (computing {:.3} s)",
                r.as_str(),
                started.elapsed().as_secs_f64(),
                v["rows"],
                v["skipped"],
                v["compute_ms"].as_f64().unwrap_or(0.0) / 1000.0
            ),
            Err(e) => {
                failed = true;
                eprintln!("{:<11} failed: {e}", r.as_str());
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
