//! `dbops basebackup run`, `dbops pitr` and `dbops wal fetch`: point-in-time
//! recovery from the command line (pipelines, 3 a.m.).

use std::{path::Path, process::ExitCode};

use clap::Subcommand;

use crate::{
    app::{self, Application},
    audit::AuditCtx,
    pitr::{
        base_backups::{self, Trigger},
        recover::{self, Point},
        segments::{self, FetchError},
    },
};

/// `dbops basebackup …`
#[derive(Subcommand)]
pub enum BasebackupCommand {
    /// Take a base backup of an archived PostgreSQL target. With --wait it runs
    /// here and now and the exit code says whether it is good (verified);
    /// without, a serving dbops' workers run it.
    Run {
        #[arg(long)]
        target: String,
        #[arg(long)]
        wait: bool,
    },
}

/// `dbops wal …`
#[derive(Subcommand)]
pub enum WalCommand {
    /// Copy one archived WAL file to PATH, checked against its recorded SHA-256
    /// (a `restore_command` for a recovery run by hand:
    /// `dbops --config /etc/dbops.toml wal fetch --target T --system-identifier S %f %p`).
    /// Exit 1: not in the archive (the normal end of the WAL); 2: could not be fetched whole.
    Fetch {
        #[arg(long)]
        target: String,
        #[arg(long)]
        system_identifier: String,
        #[arg(value_name = "FILE")]
        file: String,
        #[arg(value_name = "PATH")]
        path: std::path::PathBuf,
    },
}

/// `dbops pitr --target T --to TIME --into NAME [--database D]`.
#[derive(Debug, clap::Args)]
pub struct PitrArgs {
    #[arg(long)]
    pub target: String,
    /// A time to the second (`2026-12-03 14:05:09`, in the target's backup time
    /// zone; or RFC 3339 with an offset), `restore-point:NAME`, or `op:N` (just
    /// before operation #N).
    #[arg(long)]
    pub to: String,
    /// The NEW database the recovered one is copied into (on --into-target, by
    /// default the same target).
    #[arg(long)]
    pub into: String,
    /// The recovered database to copy (default: the target's own database).
    #[arg(long)]
    pub database: Option<String>,
    #[arg(long)]
    pub into_target: Option<String>,
}

pub async fn basebackup(
    config_path: Option<&Path>,
    cmd: BasebackupCommand,
) -> anyhow::Result<ExitCode> {
    let config = crate::config::Config::load(config_path)?;
    crate::cli::init_logging(config.json_logs);
    let BasebackupCommand::Run { target, wait } = cmd;
    let app = Application::build(config, "127.0.0.1:0".parse()?).await?;
    let state = app.state.clone();
    let (id, job) =
        match base_backups::request(&state, &AuditCtx::cli(), &target, Trigger::Cli, None, wait)
            .await
        {
            Ok(v) => v,
            Err(e) => {
                eprintln!("{e}");
                return Ok(ExitCode::from(1));
            }
        };
    if !wait {
        println!("Base backup #{id} of {target} is queued; a serving dbops runs it.");
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("Base backup #{id} of {target} is running here …");
    let cancel = state.shutdown.clone();
    let interrupt = tokio::spawn(async move {
        app::shutdown_signal().await;
        cancel.cancel();
    });
    crate::jobs::run_here(&state, job, &state.shutdown.child_token()).await;
    interrupt.abort();
    let b = base_backups::find(&state.db, id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("the base backup row vanished"))?;
    if b.status == "good" {
        println!(
            "Base backup #{id} of {target} is good: {}, WAL {} to {} on timeline {}, sha256 {}, {}",
            b.size(),
            b.start_text(),
            b.end_text(),
            b.timeline.unwrap_or(0),
            b.sha256.clone().unwrap_or_default(),
            b.verified()
        );
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "Base backup #{id} of {target} {}: {}",
            b.status,
            b.error.unwrap_or_default()
        );
        Ok(ExitCode::from(1))
    }
}

/// Recovers `--to`, copies the database into `--into` (a new database), removes
/// the scratch server. Exit 1 with the reason when any step fails.
pub async fn pitr(config_path: Option<&Path>, args: PitrArgs) -> anyhow::Result<ExitCode> {
    let config = crate::config::Config::load(config_path)?;
    crate::cli::init_logging(config.json_logs);
    let Some(tc) = config.target(&args.target) else {
        eprintln!("there is no target called {} in the config", args.target);
        return Ok(ExitCode::from(1));
    };
    let tz = tc.backup.timezone.clone();
    let point = match Point::parse(&args.to, &tz) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(1));
        }
    };
    let app = Application::build(config, "127.0.0.1:0".parse()?).await?;
    let state = app.state.clone();
    let ctx = AuditCtx::cli();
    let (id, job) = match recover::request(&state, &ctx, &args.target, &point, true).await {
        Ok(v) => v,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(1));
        }
    };
    eprintln!(
        "Recovery #{id} of {} to {} is running here …",
        args.target,
        point.describe(&tz)
    );
    let cancel = state.shutdown.child_token();
    crate::jobs::run_here(&state, job, &cancel).await;
    let r = recover::find(&state.db, id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("the recovery vanished"))?;
    if r.status != "ready" {
        eprintln!(
            "Recovery #{id} {}: {}",
            r.status,
            r.error.unwrap_or_default()
        );
        return Ok(ExitCode::from(1));
    }
    eprintln!("Recovered: {}", r.outcome.clone().unwrap_or_default());
    let database = match args.database {
        Some(d) => d,
        None => {
            let url = secrecy::ExposeSecret::expose_secret(
                &state.targets.get(&args.target).expect("checked").config.url,
            )
            .to_string();
            crate::pg_tools::PgConn::from_url(&url)
                .map(|c| c.dbname)
                .unwrap_or_else(|_| "postgres".into())
        }
    };
    let into_target = args.into_target.unwrap_or_else(|| args.target.clone());
    let copied = recover::request_copy(
        &state,
        &ctx,
        id,
        &database,
        &[],
        &into_target,
        &args.into,
        true,
    )
    .await;
    let code = match copied {
        Ok(job) => {
            crate::jobs::run_here(&state, job, &cancel).await;
            let j = crate::jobs::find(&state.db, job)
                .await?
                .ok_or_else(|| anyhow::anyhow!("the copy job vanished"))?;
            if j.status == "succeeded" {
                println!(
                    "{database} as of {} is now {} on {into_target}: {}",
                    point.describe(&tz),
                    args.into,
                    j.result
                        .map(|r| r["row_counts"].to_string())
                        .unwrap_or_default()
                );
                ExitCode::SUCCESS
            } else {
                eprintln!("The copy {}: {}", j.status, j.error.unwrap_or_default());
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    };
    if let Err(e) = recover::remove(&state, &ctx, id, "dbops pitr is done").await {
        eprintln!("the scratch server of recovery #{id} could not be removed: {e}");
    }
    Ok(code)
}

/// `dbops wal fetch`: exit 0 fetched, 1 not archived, 2 failed.
pub async fn wal(config_path: Option<&Path>, cmd: WalCommand) -> anyhow::Result<ExitCode> {
    let WalCommand::Fetch {
        target,
        system_identifier,
        file,
        path,
    } = cmd;
    let config = crate::config::Config::load(config_path)?;
    crate::cli::init_logging(config.json_logs);
    let app = Application::build(config, "127.0.0.1:0".parse()?).await?;
    match segments::fetch(&app.state, &target, &system_identifier, &file, &path).await {
        Ok(_) => Ok(ExitCode::SUCCESS),
        Err(FetchError::NotArchived(f)) => {
            eprintln!("{f} is not in the archive");
            Ok(ExitCode::from(1))
        }
        Err(FetchError::Failed(e)) => {
            eprintln!("{e}");
            Ok(ExitCode::from(2))
        }
    }
}
