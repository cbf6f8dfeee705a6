//! The automatic steps of a window, run as `window.step` jobs on the one job
//! runtime: announce, backup (waited for until good, then pinned), restore
//! point, migration status before and after, the health URL, target health.
//! Each returns its output for the step's row and the job's; a step with
//! nothing to do here answers `{"skipped": why}`.

use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::{Value, json};

use super::{Step, StepKind, Window};
use crate::{
    audit::AuditCtx,
    backups::run::{BackupRequest, Trigger},
    config::TargetKind,
    jobs::{Job, JobCtx, JobKind},
    state::AppState,
    targets::Health,
};

/// The job kind of automatic steps.
pub const JOB_KIND: &str = "window.step";

pub struct StepJob;

impl JobKind for StepJob {
    fn kind(&self) -> &'static str {
        JOB_KIND
    }

    fn title(&self) -> &'static str {
        "Maintenance window step"
    }

    fn run<'a>(&'a self, ctx: &'a JobCtx) -> BoxFuture<'a, Result<Value, String>> {
        Box::pin(async move {
            let id = ctx.job.params["step_id"]
                .as_i64()
                .ok_or("the job names no step")?;
            let chain = ctx.job.params["chain"].as_bool().unwrap_or(false);
            let step = super::find_step(&ctx.state.db, id)
                .await
                .map_err(|e| e.to_string())?
                .ok_or("the step is gone")?;
            let w = super::find(&ctx.state.db, step.window_id)
                .await
                .map_err(|e| e.to_string())?
                .ok_or("the window is gone")?;
            let audit = AuditCtx {
                actor: crate::audit::Actor {
                    id: ctx.job.requested_by,
                    name: ctx.job.requested_by_name.clone(),
                    role: None,
                },
                meta: Default::default(),
            };
            ctx.progress.set_phase(&step.title);
            let outcome = tokio::select! {
                r = run_step(&ctx.state, &audit, ctx, &w, &step) => r,
                _ = ctx.cancel.cancelled() => Err("stopped by a person (or dbops stopping)".to_string()),
            };
            super::finish_step(&ctx.state, &audit, &step, &outcome)
                .await
                .map_err(|e| format!("could not record the step: {e}"))?;
            if chain && outcome.is_ok() {
                let st = ctx.state.clone();
                let window = w.id;
                // After this job's own row is written: the next step's job.
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if let Err(e) =
                        super::advance(&st, &audit, window, super::Runner::Workers).await
                    {
                        tracing::error!(window, error = %e, "could not start the next step of a window");
                    }
                });
            }
            outcome
        })
    }

    fn subject(&self, job: &Job) -> Option<(String, String)> {
        job.params["window_id"].as_i64().map(|id| {
            (
                format!("maintenance window #{id}"),
                format!("/windows/{id}"),
            )
        })
    }

    fn result_url(&self, job: &Job) -> Option<String> {
        self.subject(job).map(|(_, u)| u)
    }

    /// The window says it stopped (announced with the reason).
    fn failure_event(&self) -> Option<&'static str> {
        None
    }
}

async fn run_step(
    state: &AppState,
    ctx: &AuditCtx,
    job: &JobCtx,
    w: &Window,
    step: &Step,
) -> Result<Value, String> {
    match step.kind() {
        StepKind::Announce => {
            let text = format!(
                "dbops: maintenance window #{} opens — {} on {}. Owner: {}. Planned: {} for {} min (until {}). Why: {}",
                w.id,
                w.title,
                w.targets_text(),
                w.owner_name,
                crate::fmt::time(&w.opened_at.unwrap_or(w.planned_start)),
                w.planned_minutes,
                crate::fmt::time(&w.planned_end()),
                w.reason
            );
            announce(state, "window.opened", &text).await
        }
        StepKind::Backup => backup(state, ctx, job, w).await,
        StepKind::RestorePoint => restore_point(state, ctx, job, w).await,
        StepKind::MigrationsBefore => migrations(state, w, None).await,
        StepKind::MigrationsAfter => {
            let before = super::steps(&state.db, w.id)
                .await
                .map_err(|e| e.to_string())?
                .into_iter()
                .find(|s| s.kind() == StepKind::MigrationsBefore && s.status == "done")
                .and_then(|s| s.output);
            migrations(state, w, before.as_ref()).await
        }
        StepKind::HealthUrl => health_url(w, step, job).await,
        StepKind::TargetHealth => target_health(state, w).await,
        StepKind::AnnounceClose => Ok(json!({ "skipped": "sent when the window closes" })),
        StepKind::Manual => Err("a manual step is ticked by a person".into()),
    }
}

/// Sends `text` to the webhook and waits for its answer; `{"skipped": …}` when
/// no webhook is configured.
pub async fn announce(state: &AppState, event: &'static str, text: &str) -> Result<Value, String> {
    if state.config.notifications.webhook_url.is_none() {
        return Ok(
            json!({ "skipped": "no webhook is configured ([notifications] webhook_url_env)", "text": text }),
        );
    }
    crate::notify::deliver(state, event, text.to_string()).await?;
    Ok(json!({ "summary": format!("announced: {text}"), "text": text }))
}

/// A backup of every target, each waited for until good (run here, in this
/// job) and pinned for `[windows] keep_backups_days`.
async fn backup(
    state: &AppState,
    ctx: &AuditCtx,
    job: &JobCtx,
    w: &Window,
) -> Result<Value, String> {
    let days = state.config.windows.keep_backups_days.unwrap_or(30);
    let mut done = vec![];
    for t in &w.targets {
        job.progress.set_phase(&format!("backup of {t}"));
        let req = BackupRequest {
            run_here: true,
            ..BackupRequest::default()
        };
        let id = crate::backups::run::request(state, ctx, t, Trigger::Person, req)
            .await
            .map_err(|e| format!("the backup of {t} could not start: {e}"))?;
        crate::backups::run::run_here(state, id, &job.cancel).await;
        let b = crate::backups::find(&state.db, id)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the backup row vanished")?;
        if b.status != "good" {
            return Err(format!(
                "backup #{id} of {t} is {}: {}",
                b.status,
                b.error.unwrap_or_default()
            ));
        }
        let until = chrono::Utc::now() + chrono::Duration::days(i64::from(days));
        crate::backups::pins::pin(
            &state.db,
            ctx,
            id,
            &format!("maintenance window #{}", w.id),
            Some(until),
        )
        .await
        .map_err(|e| format!("backup #{id} of {t} is good but could not be pinned: {e}"))?;
        done.push(json!({
            "target": t, "backup_id": id, "sha256": b.sha256, "bytes": b.bytes,
            "pinned_until": until, "url": format!("/backups/{id}"),
        }));
    }
    let summary = done
        .iter()
        .map(|d| {
            format!(
                "{}: backup #{} good, pinned",
                d["target"].as_str().unwrap_or_default(),
                d["backup_id"]
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    Ok(json!({ "summary": summary, "targets": done }))
}

/// A restore point on every PostgreSQL target whose WAL dbops archives, named
/// after this step's operation (so the recovery form finds it).
async fn restore_point(
    state: &AppState,
    ctx: &AuditCtx,
    job: &JobCtx,
    w: &Window,
) -> Result<Value, String> {
    let op = job.job.operation_id.ok_or("the step has no operation")?;
    let mut made = vec![];
    let mut skipped = vec![];
    for name in &w.targets {
        let Some(t) = state.targets.get(name) else {
            return Err(format!("there is no target called {name} any more"));
        };
        let archived = t.config.archive.as_ref().is_some_and(|a| a.enabled);
        if t.kind() != TargetKind::Postgres || !archived {
            skipped.push(format!("{name}: archiving is off"));
            continue;
        }
        let point_name = crate::pitr::restore_points::name_for_operation(op);
        let p =
            crate::pitr::restore_points::create(state, ctx, &t, &point_name, Some((op, JOB_KIND)))
                .await?;
        made.push(json!({ "target": name, "name": p.name, "lsn": p.position().to_string(), "before_operation": op }));
    }
    if made.is_empty() {
        return Ok(json!({ "skipped": skipped.join("; ") }));
    }
    let summary = made
        .iter()
        .map(|m| {
            format!(
                "{}: restore point {}",
                m["target"].as_str().unwrap_or_default(),
                m["name"].as_str().unwrap_or_default()
            )
        })
        .chain(skipped)
        .collect::<Vec<_>>()
        .join("; ");
    Ok(json!({ "summary": summary, "targets": made }))
}

/// Migration status of every PostgreSQL target as lines `database tool version
/// name`; with `before`, the lines added and gone since.
async fn migrations(state: &AppState, w: &Window, before: Option<&Value>) -> Result<Value, String> {
    let limit = crate::migration_status::time_limit(&state.config);
    let mut per_target = vec![];
    let mut added_all = vec![];
    for name in &w.targets {
        let Some(t) = state.targets.get(name) else {
            return Err(format!("there is no target called {name} any more"));
        };
        if t.kind() != TargetKind::Postgres {
            continue;
        }
        let report =
            crate::migration_status::inspect_target(&t, &state.config, &state.db, limit).await;
        let mut lines = vec![];
        for db in &report.databases {
            match &db.outcome {
                Err(e) => {
                    return Err(format!(
                        "the migrations of {name}/{} could not be read: {e}",
                        db.name
                    ));
                }
                Ok(tools) => {
                    for tool in tools {
                        for a in &tool.applied {
                            lines.push(
                                format!(
                                    "{} {} {} {}",
                                    db.name,
                                    tool.tool.label(),
                                    a.version,
                                    a.name
                                )
                                .trim()
                                .to_string(),
                            );
                        }
                    }
                }
            }
        }
        let mut item = json!({ "target": name, "applied": lines });
        if let Some(b) = before {
            let old: Vec<String> = b["targets"]
                .as_array()
                .and_then(|ts| ts.iter().find(|x| x["target"] == json!(name)))
                .and_then(|x| x["applied"].as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            let added: Vec<&String> = lines.iter().filter(|l| !old.contains(l)).collect();
            let gone: Vec<&String> = old.iter().filter(|l| !lines.contains(l)).collect();
            for a in &added {
                added_all.push(format!("{name}: {a}"));
            }
            item["added"] = json!(added);
            item["gone"] = json!(gone);
        }
        per_target.push(item);
    }
    if per_target.is_empty() {
        return Ok(json!({ "skipped": "no PostgreSQL target in the window" }));
    }
    let summary = match before {
        None => per_target
            .iter()
            .map(|i| {
                format!(
                    "{}: {} applied",
                    i["target"].as_str().unwrap_or_default(),
                    i["applied"].as_array().map_or(0, Vec::len)
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
        Some(_) if added_all.is_empty() => "no migration applied during the window".to_string(),
        Some(_) => format!("applied during the window: {}", added_all.join("; ")),
    };
    Ok(json!({ "summary": summary, "targets": per_target }))
}

/// Asks the window's health URL every 2 s until it answers as configured
/// (`expect_status`, default any 2xx; `contains`), for `timeout_seconds`
/// (default 120).
async fn health_url(w: &Window, step: &Step, job: &JobCtx) -> Result<Value, String> {
    let Some(url) = w.health_url.clone() else {
        return Ok(json!({ "skipped": "the window has no health URL" }));
    };
    let expect = step.config["expect_status"].as_u64();
    let contains = step.config["contains"].as_str().map(str::to_string);
    let timeout = Duration::from_secs(step.config["timeout_seconds"].as_u64().unwrap_or(120));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| e.to_string())?;
    let started = tokio::time::Instant::now();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        job.progress
            .set_phase(&format!("asking {url} (attempt {attempts})"));
        let last = match client.get(&url).send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                let body = r.text().await.unwrap_or_default();
                let status_ok = match expect {
                    Some(e) => u64::from(status) == e,
                    None => (200..300).contains(&status),
                };
                let body_ok = contains.as_deref().is_none_or(|c| body.contains(c));
                if status_ok && body_ok {
                    return Ok(json!({
                        "summary": format!("{url} answered {status} after {attempts} attempt(s)"),
                        "url": url, "status": status, "attempts": attempts,
                    }));
                }
                format!(
                    "answered {status}{}",
                    if body_ok {
                        ""
                    } else {
                        " without the expected text"
                    }
                )
            }
            Err(e) => e.without_url().to_string(),
        };
        if started.elapsed() >= timeout {
            return Err(format!(
                "{url} did not answer as expected within {} s ({attempts} attempts; last: {last})",
                timeout.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Replica lag above this is unhealthy.
const MAX_REPLICA_LAG_SECONDS: f64 = 60.0;

/// Every target: reachable; for PostgreSQL no session waiting on a lock held by
/// another (`pg_blocking_pids`, PostgreSQL's own view of lock waits) and no
/// replica further behind than a minute (`pg_stat_replication.replay_lag`).
async fn target_health(state: &AppState, w: &Window) -> Result<Value, String> {
    let mut out = vec![];
    let mut problems = vec![];
    for name in &w.targets {
        let Some(t) = state.targets.get(name) else {
            return Err(format!("there is no target called {name} any more"));
        };
        match t.kind() {
            TargetKind::Redis => match t.redis_status().await {
                Health::Up(_) => out.push(json!({ "target": name, "reachable": true })),
                Health::Down(e) => problems.push(format!("{name} is unreachable: {e}")),
            },
            TargetKind::Postgres => {
                let pool = match t.pg().await {
                    Ok(p) => p,
                    Err(e) => {
                        problems.push(format!("{name} is unreachable: {e}"));
                        continue;
                    }
                };
                let row: Result<(i64, Option<f64>), _> = sqlx::query_as(
                    "SELECT (SELECT count(*) FROM pg_stat_activity WHERE cardinality(pg_blocking_pids(pid)) > 0),
                            (SELECT max(extract(epoch FROM replay_lag))::float8 FROM pg_stat_replication)",
                )
                .fetch_one(&pool)
                .await;
                match row {
                    Err(e) => problems.push(format!(
                        "{name} is unreachable: {}",
                        t.scrub(&e.to_string())
                    )),
                    Ok((blocked, lag)) => {
                        if blocked > 0 {
                            problems.push(format!(
                                "{name}: {blocked} session(s) wait on locks held by others"
                            ));
                        }
                        if lag.is_some_and(|l| l > MAX_REPLICA_LAG_SECONDS) {
                            problems.push(format!(
                                "{name}: a replica is {:.0} s behind",
                                lag.unwrap_or_default()
                            ));
                        }
                        out.push(json!({ "target": name, "reachable": true, "blocked_sessions": blocked, "replica_lag_seconds": lag }));
                    }
                }
            }
        }
    }
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    Ok(json!({
        "summary": format!("{}: reachable, no blocked sessions, replicas within {MAX_REPLICA_LAG_SECONDS:.0} s", w.targets_text()),
        "targets": out,
    }))
}
