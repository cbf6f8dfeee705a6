//! `dbops window …`: a deploy pipeline's maintenance window. `open` opens the
//! approved window of a template on a target (or makes one, owned by `--owner`,
//! and opens it where no approval is needed) and runs its automatic steps here
//! until a manual step is next; `step --done` ticks a manual step and runs what
//! follows; `close` closes it with the summary announced. Everything is in the
//! operations log with the operating-system user as the actor (`cli:alice`).
//! Exit codes: 0 done, 1 a step failed (the window is stopped), 2 refused,
//! 3 waiting for approval.

use std::{path::Path, process::ExitCode};

use clap::Subcommand;

use crate::{
    app::{AppState, Application},
    audit::AuditCtx,
    config::Config,
    windows::{self, NewWindow, Person, Runner, StepKind},
};

/// `dbops window …`
#[derive(Subcommand)]
pub enum WindowCommand {
    /// Open a window: the approved one of this template on the target, or a new
    /// one (needs --owner) where no approval is needed; runs its automatic steps
    /// until a manual step is next.
    Open {
        #[arg(long)]
        template: String,
        /// A target of the window (repeat for several).
        #[arg(long = "target", required = true)]
        targets: Vec<String>,
        /// Fail unless this step is done when the command returns: a step kind
        /// (`backup`, `restore_point`, `migrations_before`, …), a position or a title.
        #[arg(long)]
        wait_for: Option<String>,
        /// The dbops user who owns a new window (its approvals are theirs).
        #[arg(long)]
        owner: Option<String>,
        /// Open this window (by id) instead of looking for one.
        #[arg(long)]
        window: Option<i64>,
        #[arg(long, default_value_t = 60)]
        minutes: i32,
        #[arg(long)]
        health_url: Option<String>,
        #[arg(long, default_value = "deploy from a pipeline")]
        reason: String,
    },
    /// Tick a manual step (by position or title) and run the automatic steps after it.
    Step {
        #[arg(long)]
        window: Option<i64>,
        /// The live window on this target, when --window is not given.
        #[arg(long)]
        target: Option<String>,
        /// The step: its position or its title.
        #[arg(long)]
        done: String,
        #[arg(long, default_value = "")]
        note: String,
        /// Who did it (default: the operating-system user).
        #[arg(long)]
        by: Option<String>,
    },
    /// Close the window (announces the close with a summary).
    Close {
        #[arg(long)]
        window: Option<i64>,
        #[arg(long)]
        target: Option<String>,
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Print a window and its steps.
    Status {
        #[arg(long)]
        window: Option<i64>,
        #[arg(long)]
        target: Option<String>,
    },
}

async fn which(state: &AppState, window: Option<i64>, target: Option<&str>) -> anyhow::Result<i64> {
    if let Some(id) = window {
        return Ok(id);
    }
    let Some(t) = target else {
        anyhow::bail!("name the window (--window N) or its target (--target NAME)");
    };
    windows::live(&state.db)
        .await?
        .into_iter()
        .rev()
        .find(|w| w.targets.iter().any(|x| x == t))
        .map(|w| w.id)
        .ok_or_else(|| anyhow::anyhow!("no maintenance window is open on {t}"))
}

async fn print(state: &AppState, id: i64) -> anyhow::Result<windows::Window> {
    let w = windows::find(&state.db, id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("there is no window #{id}"))?;
    println!(
        "Window #{} {} on {}: {}{}",
        w.id,
        w.template,
        w.targets_text(),
        w.state,
        w.stop_reason
            .as_deref()
            .map(|r| format!(" — {r}"))
            .unwrap_or_default()
    );
    for s in windows::steps(&state.db, id).await? {
        println!(
            "{:>3}. [{:<7}] {}{}{}",
            s.position,
            s.status,
            s.title,
            s.done_by_name
                .as_deref()
                .map(|b| format!(" (by {b})"))
                .unwrap_or_default(),
            match (&s.error, s.output.is_some()) {
                (Some(e), _) => format!(" — {e}"),
                (None, true) => format!(" — {}", s.output_text()),
                _ => String::new(),
            }
        );
    }
    Ok(w)
}

/// Runs a `dbops window …` command.
pub async fn run(config_path: Option<&Path>, cmd: WindowCommand) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    crate::cli::init_logging(config.json_logs);
    let app = Application::build(config, "127.0.0.1:0".parse()?).await?;
    let state = app.state.clone();
    let ctx = AuditCtx::cli();
    let refused = |e: windows::WindowError| -> anyhow::Result<ExitCode> {
        match e {
            windows::WindowError::Db(d) => Err(d.into()),
            other => {
                eprintln!("{other}");
                Ok(ExitCode::from(2))
            }
        }
    };
    let id = match &cmd {
        WindowCommand::Open {
            template,
            targets,
            owner,
            window,
            minutes,
            health_url,
            reason,
            ..
        } => {
            let found = match window {
                Some(id) => Some(*id),
                None => windows::waiting_for(&state, template, &targets[0])
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .map(|w| w.id),
            };
            match found {
                Some(id) => id,
                None => {
                    let Some(owner) = owner else {
                        eprintln!(
                            "No {template} window on {} waits to open: schedule one (/windows) or name its owner with --owner USER.",
                            targets[0]
                        );
                        return Ok(ExitCode::from(2));
                    };
                    let u = crate::auth::users::find_by_username(&state.db, owner)
                        .await?
                        .filter(|u| !u.disabled)
                        .ok_or_else(|| {
                            anyhow::anyhow!("there is no (enabled) dbops user called {owner}")
                        })?;
                    let user = crate::auth::CurrentUser {
                        id: u.id,
                        role: u.role(),
                        username: u.username,
                        csrf_token: String::new(),
                    };
                    let new = NewWindow {
                        template: template.clone(),
                        targets: targets.clone(),
                        planned_start: None,
                        planned_minutes: *minutes,
                        health_url: health_url.clone(),
                        reason: reason.clone(),
                    };
                    match windows::create(&state, &ctx, &user, new).await {
                        Ok(w) => w.id,
                        Err(e) => return refused(e),
                    }
                }
            }
        }
        WindowCommand::Step { window, target, .. }
        | WindowCommand::Close { window, target, .. }
        | WindowCommand::Status { window, target } => {
            match which(&state, *window, target.as_deref()).await {
                Ok(id) => id,
                Err(e) => {
                    eprintln!("{e}");
                    return Ok(ExitCode::from(2));
                }
            }
        }
    };
    let outcome = match cmd {
        WindowCommand::Open { wait_for, .. } => {
            let w = windows::refresh_approval(&state, id)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            if w.state == windows::state::REQUESTED {
                print(&state, id).await?;
                eprintln!(
                    "Window #{id} waits for approval ({}): run this again once an approver agreed.",
                    w.approval_ids
                        .iter()
                        .map(|a| format!("/approvals/{a}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                return Ok(ExitCode::from(3));
            }
            if let Err(e) = windows::open(&state, &ctx, id, Runner::Here).await {
                return refused(e);
            }
            wait_for
        }
        WindowCommand::Step { done, note, by, .. } => {
            let by = match by {
                Some(b) => Person {
                    id: None,
                    name: format!("{b} ({})", Person::of_ctx(&ctx).name),
                },
                None => Person::of_ctx(&ctx),
            };
            if let Err(e) = windows::tick(&state, &ctx, id, &done, &by, &note, Runner::Here).await {
                return refused(e);
            }
            None
        }
        WindowCommand::Close { note, .. } => {
            if let Err(e) = windows::close(&state, &ctx, id, &note).await {
                return refused(e);
            }
            None
        }
        WindowCommand::Status { .. } => None,
    };
    let w = print(&state, id).await?;
    if w.state == windows::state::STOPPED {
        return Ok(ExitCode::from(1));
    }
    if let Some(want) = outcome {
        let steps = windows::steps(&state.db, id).await?;
        let step = steps.iter().find(|s| match StepKind::parse(&want) {
            Some(k) => s.kind() == k,
            None => s.position.to_string() == want || s.title.eq_ignore_ascii_case(&want),
        });
        match step {
            Some(s) if s.finished() => {}
            Some(s) => {
                eprintln!(
                    "Step {} ({}) is {}, not done.",
                    s.position, s.title, s.status
                );
                return Ok(ExitCode::from(1));
            }
            None => {
                eprintln!("Window #{id} has no step “{want}”.");
                return Ok(ExitCode::from(2));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
