//! The `dbops` binary: parses the command line and hands over to the library.

use std::{path::PathBuf, process::ExitCode};

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use dbops::cli::{self, UserCommand};

#[derive(Parser)]
#[command(
    name = "dbops",
    about = "A web console for operating PostgreSQL and Redis"
)]
struct Cli {
    /// The config file (TOML). Default: $DBOPS_CONFIG, else built-in defaults.
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the web console.
    Serve {
        /// Address to listen on (overrides `listen` in the config file).
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
    },
    /// Apply dbops' schema migrations to the console database (as the schema's
    /// owner: `owner_database_url_env`/`_file`, else `database_url`).
    Migrate {
        /// Create (if missing) and grant the role dbops runs as: it may read and
        /// write its tables but owns nothing, so it cannot switch the log's
        /// triggers off.
        #[arg(long, value_name = "ROLE")]
        runtime_role: Option<String>,
        /// The environment variable holding that role's password (set when
        /// given; the role can log in).
        #[arg(long, value_name = "VAR", requires = "runtime_role")]
        runtime_password_env: Option<String>,
    },
    /// Manage users.
    #[command(subcommand)]
    User(UserCommand),
    /// The operations log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Backups.
    #[command(subcommand)]
    Backup(cli::BackupCommand),
    /// Restore a good PostgreSQL backup into a NEW database on its target (never
    /// over an existing one); prints the tables and rows, exits 1 on failure.
    Restore(cli::RestoreArgs),
    /// Base backups of archived PostgreSQL targets (point-in-time recovery).
    #[command(subcommand)]
    Basebackup(dbops::cli::pitr::BasebackupCommand),
    /// Recover a target to a point in time and copy a database of it into a NEW
    /// database; exits 1 on failure.
    Pitr(dbops::cli::pitr::PitrArgs),
    /// The WAL archive.
    #[command(subcommand)]
    Wal(dbops::cli::pitr::WalCommand),
    /// Index, bloat and health reports of a PostgreSQL target.
    #[command(subcommand)]
    Report(cli::ReportCommand),
    /// Migrations of the applications dbops watches.
    #[command(subcommand)]
    Migrations(cli::MigrationsCommand),
    /// Continuous WAL archiving (point-in-time recovery): `dbops archive status`.
    #[command(subcommand)]
    Archive(dbops::cli::archive::ArchiveCommand),
    /// Redis tools: delete by pattern, memory by prefix.
    #[command(subcommand)]
    Redis(dbops::cli::redis::RedisCommand),
    /// Maintenance windows for a deploy pipeline: open, step --done, close.
    #[command(subcommand)]
    Window(dbops::cli::window::WindowCommand),
    /// Exit 0 when the dbops serving on this machine answers /healthz (for a
    /// container's HEALTHCHECK: no curl or shell needed).
    Healthcheck {
        /// The port dbops serves on, asked on 127.0.0.1.
        #[arg(long, default_value_t = 8080)]
        port: u16,
    },
    /// Start a throwaway PostgreSQL and Redis with sample data and serve the console.
    Demo {
        /// Address to listen on (default 127.0.0.1:8080, or a free port if taken).
        #[arg(long, value_name = "ADDR")]
        listen: Option<std::net::SocketAddr>,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check that no operations row was altered or removed (the hash chain, and
    /// the signed checkpoints outside the database when configured); exits 1
    /// naming the first problem.
    Verify,
    /// Sign the chain head now and write it to the configured witnesses.
    Checkpoint,
    /// Make a new Ed25519 key for signing checkpoints: the secret seed goes to
    /// FILE (0600, never over an existing file), the public key is printed.
    Keygen {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

/// The allocator: mimalloc. glibc's malloc gives threads that allocate at the
/// same time arenas of their own and hands little back: under 50 sessions of
/// page load the resident memory grew from ~22 MiB to ~150 MiB and stayed there
/// (119 MiB even with two arenas); with mimalloc it is back to ~40 MiB 30 s
/// after the load (bench/load.sh, issue #23, docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // The version names the console schema this binary carries (its newest
    // migration), so that an operator can tell which `dbops migrate` it needs.
    let version: &'static str = Box::leak(dbops::app::version_line().into_boxed_str());
    let args = match Cli::from_arg_matches(&Cli::command().version(version).get_matches()) {
        Ok(args) => args,
        Err(e) => e.exit(),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match args.command {
            Command::Serve { listen } => cli::serve(args.config.as_deref(), listen).await,
            Command::Migrate {
                runtime_role,
                runtime_password_env,
            } => {
                cli::migrate(
                    args.config.as_deref(),
                    runtime_role.as_deref(),
                    runtime_password_env.as_deref(),
                )
                .await
            }
            Command::User(cmd) => cli::user(args.config.as_deref(), cmd).await,
            Command::Audit(AuditCommand::Verify) => cli::audit_verify(args.config.as_deref()).await,
            Command::Audit(AuditCommand::Checkpoint) => {
                cli::audit_checkpoint(args.config.as_deref()).await
            }
            Command::Audit(AuditCommand::Keygen { out }) => cli::audit_keygen(&out),
            Command::Backup(cmd) => cli::backup(args.config.as_deref(), cmd).await,
            Command::Restore(r) => cli::restore(args.config.as_deref(), r).await,
            Command::Basebackup(cmd) => {
                dbops::cli::pitr::basebackup(args.config.as_deref(), cmd).await
            }
            Command::Pitr(a) => dbops::cli::pitr::pitr(args.config.as_deref(), a).await,
            Command::Wal(cmd) => dbops::cli::pitr::wal(args.config.as_deref(), cmd).await,
            Command::Report(cmd) => cli::report(args.config.as_deref(), cmd).await,
            Command::Migrations(cmd) => cli::migrations(cmd),
            Command::Archive(cmd) => dbops::cli::archive::run(args.config.as_deref(), cmd).await,
            Command::Redis(cmd) => dbops::cli::redis::run(args.config.as_deref(), cmd).await,
            Command::Window(cmd) => dbops::cli::window::run(args.config.as_deref(), cmd).await,
            Command::Healthcheck { port } => cli::healthcheck(port).await,
            Command::Demo { listen } => dbops::demo::run(listen).await.map(|()| ExitCode::SUCCESS),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
