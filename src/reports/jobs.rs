//! The job kinds of reports and maintenance (registered in
//! [`crate::actions::job_kinds`]):
//!
//! - `pg.report.<report>`: computes a report and stores its snapshot;
//! - `pg.report.exact`: pgstattuple / pgstatindex on one relation;
//! - `pg.table.analyze|vacuum|vacuum_analyze`: submitted by an operator;
//! - `pg.table.vacuum_full`, `pg.index.reindex`, `pg.index.drop`: the long part
//!   of an approved action.

use std::{sync::Arc, time::Instant};

use futures::{FutureExt, future::BoxFuture};
use serde_json::{Value, json};
use sqlx::Connection;

use super::{
    Report, bloat,
    maintenance::{Command, Params},
    snapshot,
};
use crate::jobs::{Job, JobCtx, JobKind};

/// The job's progress and Stop button, as reports see them.
pub struct JobProgress<'a>(pub &'a JobCtx);

impl super::Progress for JobProgress<'_> {
    fn phase(&self, phase: &str) {
        self.0.progress.set_phase(phase);
    }
    fn total(&self, items: u64) {
        self.0.progress.set_items_total(items);
    }
    fn add(&self, items: u64) {
        self.0.progress.add_items(items);
    }
    fn cancelled(&self) -> bool {
        self.0.cancel.is_cancelled()
    }
}

/// Every job kind of this module.
pub fn kinds() -> Vec<Arc<dyn JobKind>> {
    let mut v: Vec<Arc<dyn JobKind>> = Report::ALL
        .into_iter()
        .map(|r| Arc::new(ReportJob(r)) as Arc<dyn JobKind>)
        .collect();
    v.push(Arc::new(ExactJob));
    for c in Command::ALL {
        v.push(Arc::new(MaintenanceJob(c)));
    }
    v
}

/// Computes and stores one report; also what `dbops report refresh` runs.
pub async fn refresh(
    state: &crate::state::AppState,
    target: &crate::targets::Target,
    report: Report,
    job_id: Option<i64>,
    progress: &dyn super::Progress,
) -> Result<Value, String> {
    refresh_with(&state.db, &state.config, target, report, job_id, progress).await
}

/// [`refresh`] with the console database and config given separately (the
/// command line has no running app).
pub async fn refresh_with(
    db: &sqlx::PgPool,
    config: &crate::config::Config,
    target: &crate::targets::Target,
    report: Report,
    job_id: Option<i64>,
    progress: &dyn super::Progress,
) -> Result<Value, String> {
    let started = Instant::now();
    let settings = &config.reports;
    let computed =
        super::compute(target, report, settings, config.connect_timeout, progress).await?;
    let ms = started.elapsed().as_millis() as i64;
    progress.phase("saving the snapshot");
    let id = snapshot::store(
        db,
        target.name(),
        report,
        &computed,
        ms,
        job_id,
        settings.keep_snapshots,
    )
    .await
    .map_err(|e| format!("could not save the snapshot: {e}"))?;
    let rows: usize = computed.sections.values().map(Vec::len).sum();
    Ok(json!({
        "snapshot_id": id,
        "report": report.as_str(),
        "rows": rows,
        "skipped": computed.skipped.len(),
        "section_errors": computed.errors.len(),
        "compute_ms": ms,
        "total_ms": started.elapsed().as_millis() as i64,
    }))
}

/// `pg.report.<report>`.
pub struct ReportJob(pub Report);

impl JobKind for ReportJob {
    fn kind(&self) -> &'static str {
        self.0.job_kind()
    }

    fn title(&self) -> &'static str {
        match self.0 {
            Report::Space => "Space report",
            Report::Bloat => "Bloat report",
            Report::Indexes => "Indexes report",
            Report::Health => "Health report",
            Report::Statements => "Slow queries report",
        }
    }

    fn run<'a>(&'a self, ctx: &'a JobCtx) -> BoxFuture<'a, Result<Value, String>> {
        async move {
            refresh(
                &ctx.state,
                &ctx.target,
                self.0,
                Some(ctx.job.id),
                &JobProgress(ctx),
            )
            .await
        }
        .boxed()
    }

    fn result_url(&self, job: &Job) -> Option<String> {
        Some(format!(
            "/targets/{}/reports/{}",
            job.target,
            self.0.as_str()
        ))
    }
}

/// `pg.report.exact`: exact bloat of one relation with pgstattuple.
pub struct ExactJob;

impl JobKind for ExactJob {
    fn kind(&self) -> &'static str {
        "pg.report.exact"
    }

    fn title(&self) -> &'static str {
        "Exact bloat (pgstattuple)"
    }

    fn run<'a>(&'a self, ctx: &'a JobCtx) -> BoxFuture<'a, Result<Value, String>> {
        async move {
            let p = &ctx.job.params;
            let what = p["what"]
                .as_str()
                .and_then(bloat::Exact::parse)
                .ok_or("the job has no valid “what”")?;
            let schema = super::check_name("schema", p["schema"].as_str().unwrap_or(""))?;
            let name = super::check_name("name", p["name"].as_str().unwrap_or(""))?;
            ctx.progress.set_phase("connecting");
            let target = &ctx.target;
            let mut conn = super::connect(
                target,
                "exact bloat",
                Some(ctx.state.config.reports.statement_timeout),
                Some(ctx.state.config.reports.lock_timeout),
                ctx.state.config.connect_timeout,
            )
            .await?;
            let ext = bloat::pgstattuple_schema(&mut conn).await.ok_or(
                "The pgstattuple extension is not installed in this database (CREATE EXTENSION pgstattuple; needs a superuser or a role allowed to create it).",
            )?;
            ctx.progress.set_phase(&format!(
                "measuring {}",
                super::qualified(&schema, &name)
            ));
            let stop = ctx.cancel.clone();
            let r = tokio::select! {
                r = bloat::exact(&mut conn, &ext, what, &schema, &name) => r,
                _ = stop.cancelled() => return Err("stopped".into()),
            };
            let _ = conn.close().await;
            match r {
                Ok(mut v) => {
                    if let Some(o) = v.as_object_mut() {
                        o.insert("schema".into(), json!(schema));
                        o.insert("name".into(), json!(name));
                    }
                    Ok(v)
                }
                Err(sqlx::Error::RowNotFound) => Err(format!(
                    "There is no {} {} (any more).",
                    if what == bloat::Exact::Index {
                        "index"
                    } else {
                        "table"
                    },
                    super::qualified(&schema, &name)
                )),
                Err(e) => Err(super::pg_error(target, &e)),
            }
        }
        .boxed()
    }

    fn result_url(&self, job: &Job) -> Option<String> {
        Some(format!(
            "/targets/{}/reports/bloat?exact={}",
            job.target, job.id
        ))
    }
}

/// `pg.table.*` and `pg.index.*`.
pub struct MaintenanceJob(pub Command);

impl JobKind for MaintenanceJob {
    fn kind(&self) -> &'static str {
        self.0.kind()
    }

    fn title(&self) -> &'static str {
        self.0.title()
    }

    fn run<'a>(&'a self, ctx: &'a JobCtx) -> BoxFuture<'a, Result<Value, String>> {
        async move {
            let p = Params::from_json(self.0, &ctx.job.params)?;
            super::maintenance::run(
                &ctx.target,
                &ctx.state.config.reports,
                ctx.state.config.connect_timeout,
                self.0,
                &p,
                &JobProgress(ctx),
            )
            .await
        }
        .boxed()
    }
}

/// The periodic work of reports, run every minute by `dbops serve`
/// ([`crate::app`]): a database size sample per PostgreSQL target for the growth
/// chart (`[reports] size_history_minutes`), and, when `[reports]
/// refresh_minutes` is set, a refresh job for every report older than that. With
/// several replicas a sample or job may occasionally be taken twice; nothing
/// breaks.
pub async fn tick(state: &crate::state::AppState) {
    let settings = &state.config.reports;
    for target in state.targets.all() {
        if target.kind() != crate::config::TargetKind::Postgres {
            continue;
        }
        if let Some(every) = settings.size_history
            && let Err(e) = sample_size(state, target, every).await
        {
            tracing::debug!(target = %target.name(), error = %e, "no database size sample");
        }
        let Some(every) = settings.refresh else {
            continue;
        };
        for r in Report::ALL {
            let due = match snapshot::latest(&state.db, target.name(), r).await {
                Ok(Some(s)) => {
                    chrono::Utc::now() - s.taken_at
                        > chrono::Duration::from_std(every).unwrap_or(chrono::TimeDelta::MAX)
                }
                Ok(None) => true,
                Err(_) => false,
            };
            let busy = crate::jobs::latest(&state.db, r.job_kind(), target.name())
                .await
                .ok()
                .flatten()
                .is_some_and(|j| {
                    j.is_active()
                        || (j.status == "failed"
                            && chrono::Utc::now() - j.created_at
                                < chrono::Duration::from_std(every)
                                    .unwrap_or(chrono::TimeDelta::MAX))
                });
            if due
                && !busy
                && let Err(e) = crate::jobs::submit(
                    state,
                    &crate::audit::AuditCtx::system(),
                    r.job_kind(),
                    target.name(),
                    json!({ "trigger": "schedule" }),
                )
                .await
            {
                tracing::warn!(target = %target.name(), report = r.as_str(), error = %e, "could not schedule a report");
            }
        }
    }
}

async fn sample_size(
    state: &crate::state::AppState,
    target: &crate::targets::Target,
    every: std::time::Duration,
) -> Result<(), String> {
    let last: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT max(taken_at) FROM report_db_sizes WHERE target = $1")
            .bind(target.name())
            .fetch_one(&state.db)
            .await
            .map_err(|e| e.to_string())?;
    if last.is_some_and(|t| {
        chrono::Utc::now() - t < chrono::Duration::from_std(every).unwrap_or(chrono::TimeDelta::MAX)
    }) {
        return Ok(());
    }
    let pool = target.pg().await?;
    let (database, bytes): (String, i64) = crate::targets::bounded(
        state.config.connect_timeout + state.config.statement_timeout,
        sqlx::query_as("SELECT current_database()::text, pg_database_size(current_database())")
            .fetch_one(&pool),
    )
    .await?;
    snapshot::record_size(&state.db, target.name(), &database, bytes)
        .await
        .map_err(|e| e.to_string())
}
