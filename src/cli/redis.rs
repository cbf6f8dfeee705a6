//! `dbops redis …`: the command-line twins of delete by pattern and memory by
//! prefix (used by `bench/redis_delete.sh`, and handy in a shell). Both are
//! written to the operations log with the operating-system user as the actor.
//! The delete previews first, runs only with `--yes`, and only on targets whose
//! policy needs no approval for it (elsewhere: the console's approval flow).

use std::{path::Path, process::ExitCode};

use clap::Subcommand;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::redis_tools::{actions, conn, delete, memory};
use crate::{
    approvals::{Action, needs_approval},
    audit::{self, AuditCtx, Entry, Outcome},
    config::Config,
    jobs::Progress,
    targets::Registry,
};

/// `dbops redis …`
#[derive(Subcommand)]
pub enum RedisCommand {
    /// Delete every key matching a glob: SCAN + UNLINK in batches (prints the
    /// preview; deletes only with --yes, and only where no approval is needed).
    DeletePattern {
        #[arg(long)]
        target: String,
        #[arg(long)]
        pattern: String,
        #[arg(long, default_value_t = 0)]
        db: u8,
        /// Keys per batch (SCAN COUNT).
        #[arg(long, default_value_t = delete::DEFAULT_BATCH)]
        batch: u32,
        /// Really delete (without it, only the preview is printed).
        #[arg(long)]
        yes: bool,
        /// With --yes: skip the preview scan (benchmarks time the delete alone).
        #[arg(long)]
        skip_preview: bool,
    },
    /// Memory by key prefix: groups, biggest keys, TTLs (as JSON on stdout).
    Memory {
        #[arg(long)]
        target: String,
        #[arg(long, default_value_t = 0)]
        db: u8,
        #[arg(long, default_value_t = 2)]
        depth: usize,
        #[arg(long, default_value = ":")]
        separator: String,
        #[arg(long, default_value = "*")]
        pattern: String,
        /// Look at this many keys at most (default: all).
        #[arg(long)]
        sample: Option<u64>,
    },
}

/// Runs a `dbops redis …` command.
pub async fn run(config_path: Option<&Path>, cmd: RedisCommand) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    crate::cli::init_logging(config.json_logs);
    crate::app::process_init();
    let db = crate::app::connect_console(&config).await?;
    crate::app::migrate(&db).await?;
    let registry = Registry::new(&config);
    let ctx = AuditCtx::cli();
    let name = match &cmd {
        RedisCommand::DeletePattern { target, .. } | RedisCommand::Memory { target, .. } => {
            target.clone()
        }
    };
    let Some(target) = registry.get(&name) else {
        eprintln!("There is no target called {name}.");
        return Ok(ExitCode::from(2));
    };
    match cmd {
        RedisCommand::DeletePattern {
            pattern,
            db: n,
            batch,
            yes,
            skip_preview,
            ..
        } => {
            let mut form = std::collections::BTreeMap::new();
            form.insert("pattern".to_string(), pattern.clone());
            form.insert("db".to_string(), n.to_string());
            form.insert("batch".to_string(), batch.to_string());
            let mut params = match delete::Params::parse(&form) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("{e}");
                    return Ok(ExitCode::from(2));
                }
            };
            let action = actions::DeleteByPattern;
            if needs_approval(target.policy(), action.severity()) {
                audit::record(
                    &db,
                    &ctx,
                    Entry::new(actions::DELETE_KIND)
                        .target(target.name())
                        .params(params.to_json())
                        .denied("needs approval on this target; asked from the command line"),
                )
                .await?;
                eprintln!(
                    "{} is a {} target: a delete by pattern needs an approver there. Ask for it in the console.",
                    target.name(),
                    target.policy().as_str()
                );
                return Ok(ExitCode::from(1));
            }
            let nodes = conn::primaries(&target, n)
                .await
                .map_err(anyhow::Error::msg)?;
            if !(yes && skip_preview) {
                let preview = delete::preview(&nodes, &pattern)
                    .await
                    .map_err(anyhow::Error::msg)?;
                eprintln!(
                    "{}{} keys match {pattern} in db{n} ({} bytes); scanned in {} ms.",
                    if preview.complete { "" } else { "at least " },
                    preview.matched,
                    preview.bytes,
                    preview.elapsed_ms
                );
                if !yes {
                    eprintln!("Nothing deleted: add --yes to delete them.");
                    return Ok(ExitCode::SUCCESS);
                }
                params.expected = preview.complete.then_some(preview.matched);
            }
            let op = audit::start(
                &db,
                &ctx,
                Entry::new(actions::DELETE_KIND)
                    .target(target.name())
                    .params(params.to_json()),
            )
            .await?;
            let progress = Progress::new("deleting");
            let outcome = delete::run(&nodes, &params, &progress, &CancellationToken::new()).await;
            match outcome {
                Ok(r) => {
                    audit::finish(&db, op, Outcome::Succeeded, None, Some(r.clone())).await?;
                    println!("{r}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    audit::finish(&db, op, Outcome::Failed, Some(&e), None).await?;
                    eprintln!("The delete failed: {e}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        RedisCommand::Memory {
            db: n,
            depth,
            separator,
            pattern,
            sample,
            ..
        } => {
            let mut form = std::collections::BTreeMap::new();
            form.insert("db".to_string(), n.to_string());
            form.insert("depth".to_string(), depth.to_string());
            form.insert("separator".to_string(), separator);
            form.insert("pattern".to_string(), pattern);
            form.insert(
                "sample".to_string(),
                sample.map(|s| s.to_string()).unwrap_or_default(),
            );
            let params = match memory::Params::parse(&form) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("{e}");
                    return Ok(ExitCode::from(2));
                }
            };
            let op = audit::start(
                &db,
                &ctx,
                Entry::new(actions::MEMORY_KIND)
                    .target(target.name())
                    .params(params.to_json()),
            )
            .await?;
            let nodes = conn::primaries(&target, n)
                .await
                .map_err(anyhow::Error::msg)?;
            let progress = Progress::new("scanning");
            match memory::run(&nodes, &params, &progress, &CancellationToken::new()).await {
                Ok(r) => {
                    let summary = json!({
                        "keys_scanned": r["keys_scanned"], "total_bytes": r["total_bytes"],
                        "elapsed_ms": r["elapsed_ms"], "group_count": r["group_count"],
                    });
                    audit::finish(&db, op, Outcome::Succeeded, None, Some(summary)).await?;
                    println!("{}", serde_json::to_string_pretty(&r)?);
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    audit::finish(&db, op, Outcome::Failed, Some(&e), None).await?;
                    eprintln!("The scan failed: {e}");
                    Ok(ExitCode::from(1))
                }
            }
        }
    }
}
