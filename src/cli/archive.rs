//! `dbops archive status`: each archived target's WAL stream, recovery point and
//! slot, from the console database and the server; exits 1 when a target's
//! recovery point is older than its objective or archiving cannot work (for a
//! cron job or a monitoring check at 3 a.m.).

use std::{path::Path, process::ExitCode};

use clap::Subcommand;

use crate::{
    app::Application,
    fmt,
    pitr::archive::{self, ArchiveStatus},
};

/// `dbops archive …`
#[derive(Subcommand)]
pub enum ArchiveCommand {
    /// Each archived target's stream, recovery point, stored WAL, gaps and slot.
    Status {
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
    },
}

pub async fn run(config_path: Option<&Path>, cmd: ArchiveCommand) -> anyhow::Result<ExitCode> {
    let ArchiveCommand::Status { target } = cmd;
    let config = super::load(config_path)?;
    if let Some(t) = &target
        && config.target(t).is_none()
    {
        anyhow::bail!("there is no target called {t} in the config");
    }
    let app = Application::build(config, "127.0.0.1:0".parse()?).await?;
    let state = app.state.clone();
    let mut healthy = true;
    let mut shown = 0;
    for t in state.targets.all() {
        if t.config.archive.is_none() || target.as_deref().is_some_and(|n| n != t.name()) {
            continue;
        }
        shown += 1;
        let st = archive::status(&state, t, true)
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        healthy &= print(&st);
    }
    if shown == 0 {
        println!("No target has continuous archiving ([postgres.archive]).");
    }
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Prints one target's status; `false` when it needs someone.
fn print(st: &ArchiveStatus) -> bool {
    let mut ok = !st.over_objective();
    println!("{}", st.target);
    let state = if !st.enabled {
        "switched off (enabled = false)".to_string()
    } else {
        match (&st.state, &st.holder) {
            (Some(s), Some(h)) => format!("{s}, by {h}"),
            (Some(s), None) => format!("{s}, no replica holds the stream"),
            (None, _) => "not started yet (no dbops with job workers has run it)".to_string(),
        }
    };
    println!("  stream:          {state}");
    if let Some(m) = &st.message {
        println!("  last problem:    {m}");
    }
    let point = match (st.stored_through_at, st.lag) {
        (Some(t), Some(l)) => format!(
            "{} ({} ago; objective {})",
            fmt::time(&t),
            fmt::duration_short(l),
            fmt::duration_short(st.objective)
        ),
        _ => format!("none yet (objective {})", fmt::duration_short(st.objective)),
    };
    println!(
        "  recovery point:  {point}{}",
        if st.over_objective() {
            "  OVER OBJECTIVE"
        } else {
            ""
        }
    );
    if let Some(lsn) = st.stored_lsn {
        println!(
            "  stored WAL:      up to {lsn} on timeline {}, {} segments, {}",
            st.timeline.unwrap_or(1),
            fmt::count(st.segments.segments),
            fmt::bytes(st.segments.bytes)
        );
    }
    for g in &st.gaps {
        println!(
            "  GAP:             {} to {} on timeline {} (between {} and {}): no recovery can cross it",
            g.from(),
            g.to(),
            g.timeline,
            fmt::time(&g.after),
            fmt::time(&g.before)
        );
    }
    if let Some(server) = &st.server {
        if server.slot_exists {
            println!(
                "  slot:            {} ({}), holds {} on the server{}",
                st.slot,
                if server.slot_active {
                    "active"
                } else {
                    "inactive"
                },
                server
                    .slot_retained_bytes
                    .map(fmt::bytes)
                    .unwrap_or_else(|| "nothing".into()),
                server
                    .slot_wal_status
                    .as_deref()
                    .map(|w| format!(", WAL {w}"))
                    .unwrap_or_default()
            );
        } else {
            println!("  slot:            {} does not exist yet", st.slot);
        }
        if let Some(w) = &server.slot_warning {
            println!("  WARNING:         {w}");
        }
        for p in &server.problems {
            ok = false;
            println!("  PROBLEM:         {p}");
        }
    }
    ok
}
