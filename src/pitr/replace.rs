//! Replacing a live database with one recovered to a point in time
//! (`pitr.replace`, gated): the recovered database is copied from the
//! recovery's scratch server into a new database beside the live one
//! (`pg_dump | pg_restore`), checked table by table against the recovered row
//! counts, and only then swapped in with the all-or-nothing rename of
//! [`crate::restores::swap`]. It is recorded as a restore (`restores` row with
//! `recovery_id`), so the restore page, "swap back", dropping the kept previous
//! database and the sweeper of half-done swaps all apply unchanged.
//!
//! Over 600 lines: the gated action (parse, assess, approver's details, world) and
//! its job (copy, check, swap) share the request's parameters and checks; about 40
//! lines are tests.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use futures::future::BoxFuture;
use serde_json::{Value, json};
use sqlx::Connection;

use super::recover::{self, Recovery};
use crate::{
    approvals::{Action, Assessment, ExecCtx, Severity, World},
    audit::AuditCtx,
    config::TargetKind,
    jobs::{self, JobCtx, JobKind},
    pg_tools::{self, DumpOptions, Format, PgConn},
    restores::swap,
    state::AppState,
    targets::Target,
};

pub const ACTION_KIND: &str = "pitr.replace";
pub const JOB_KIND: &str = "pitr.replace.run";

/// How long the work database may take to accept a connection.
const CONNECT: Duration = Duration::from_secs(15);

/// The parameters of a request, read back from its JSON.
struct Params {
    recovery_id: i64,
    /// The recovered database copied.
    database: String,
    /// The database of the action's target it replaces.
    replace: String,
    end_sessions: bool,
}

impl Params {
    fn of(v: &Value) -> Result<Params, String> {
        Ok(Params {
            recovery_id: v["recovery_id"]
                .as_i64()
                .ok_or("the request names no recovery")?,
            database: v["database"]
                .as_str()
                .ok_or("the request names no recovered database")?
                .to_string(),
            replace: v["replace"]
                .as_str()
                .ok_or("the request names no database to replace")?
                .to_string(),
            end_sessions: v["end_sessions"] == json!(true),
        })
    }
}

/// The recovery a request names, ready and served by this machine.
async fn ready_recovery(state: &AppState, id: i64) -> Result<Recovery, String> {
    let r = recover::find(&state.db, id)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("There is no recovery #{id}."))?;
    if r.status != "ready" {
        return Err(format!(
            "Recovery #{id} is {}, not ready: recover again to replace a database with it.",
            r.status
        ));
    }
    if r.host.as_deref() != Some(recover::host_name().as_str()) {
        return Err(format!(
            "Recovery #{id} runs on {}: its scratch server listens there only, so the replace must be run by the \
             dbops on that machine.",
            r.host.as_deref().unwrap_or("another machine")
        ));
    }
    Ok(r)
}

/// Exact row counts of every table of `database` on the recovery's server.
async fn recovered_counts(r: &Recovery, database: &str) -> Result<BTreeMap<String, i64>, String> {
    let opts = r
        .connect_options(database)
        .ok_or("the recovery has no server")?;
    let mut c = sqlx::PgConnection::connect_with(&opts).await.map_err(|e| {
        format!(
            "cannot read the recovered database {database} (recovery #{}): {e}",
            r.id
        )
    })?;
    let counts = crate::backups::run::table_counts(&mut c)
        .await
        .map_err(|e| e.to_string())?;
    let _ = c.close().await;
    Ok(counts)
}

/// The first differences between what was recovered and what arrived.
fn differences(want: &BTreeMap<String, i64>, got: &BTreeMap<String, i64>) -> Vec<String> {
    let mut out = vec![];
    for (t, n) in want {
        match got.get(t) {
            None => out.push(format!("{t} is missing")),
            Some(m) if m != n => out.push(format!("{t}: {m} rows copied, {n} recovered")),
            _ => {}
        }
    }
    out
}

/// `pitr.replace`: replaces a database of a PostgreSQL target with a database
/// of a ready point-in-time recovery. Destructive, so it goes through approvals
/// (a restore point is made just before it, like every destructive action);
/// its execution queues the copy-check-swap as a job on this machine.
pub struct Replace;

impl Action for Replace {
    fn kind(&self) -> &'static str {
        ACTION_KIND
    }

    fn title(&self) -> &'static str {
        "Replace a database with a recovered one"
    }

    fn target_kind(&self) -> TargetKind {
        TargetKind::Postgres
    }

    fn severity(&self) -> Severity {
        Severity::Destructive
    }

    fn parse(&self, form: &BTreeMap<String, String>) -> Result<Value, String> {
        let recovery_id = form
            .get("recovery_id")
            .and_then(|v| v.trim().parse::<i64>().ok())
            .filter(|id| *id > 0)
            .ok_or("Say which recovery: recovery_id must be a recovery number.")?;
        let database = form
            .get("database")
            .map(|d| d.trim().to_string())
            .unwrap_or_default();
        crate::restores::name_ok("database", &database)
            .map_err(|e| format!("The recovered database: {e}"))?;
        let replace = form
            .get("replace")
            .map(|d| d.trim().to_string())
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| database.clone());
        crate::restores::name_ok("database", &replace)
            .map_err(|e| format!("The database to replace: {e}"))?;
        let end_sessions = form
            .get("end_sessions")
            .map(|v| v.trim().to_lowercase())
            .is_some_and(|v| matches!(v.as_str(), "on" | "true" | "yes" | "1"));
        Ok(json!({
            "recovery_id": recovery_id, "database": database, "replace": replace, "end_sessions": end_sessions,
        }))
    }

    /// What was recovered, measured by dbops when the request is made: the
    /// recovery's point and the recovered database's tables and row counts
    /// (checked again against the copy before the swap).
    fn assess<'a>(
        &'a self,
        state: &'a AppState,
        _target: &'a Arc<Target>,
        params: &'a Value,
    ) -> BoxFuture<'a, Result<Assessment, String>> {
        Box::pin(async move {
            let p = Params::of(params)?;
            let r = ready_recovery(state, p.recovery_id).await?;
            let counts = recovered_counts(&r, &p.database).await?;
            let mut a = Assessment::default();
            a.facts.insert("point".into(), json!(r.point_text));
            a.facts.insert("recovered_from".into(), json!(r.target));
            a.facts.insert("recovered_tables".into(), json!(counts));
            Ok(a)
        })
    }

    fn describe(&self, params: &Value) -> String {
        format!(
            "Replace the database {replace} with the database {database} recovered by recovery #{id}{point}. It is \
             copied from the recovery's scratch server into a new database beside {replace} (pg_dump | pg_restore) \
             and checked: every recovered table there with the recovered row count. Only then is it swapped in: {}, \
             and in one transaction {replace} is renamed to {replace}_before_restore_<n> and the copy takes its \
             name. Until that moment nothing of {replace} is touched; if anything fails, it stays as it is. The \
             replaced database is kept (with every change made after the recovery point) until someone drops it, and \
             \"swap back\" restores it. Needs about the database's size in free space while both exist.",
            if params["end_sessions"] == json!(true) {
                "every other session on it is ended"
            } else {
                "other sessions are not ended — the swap waits up to 30 s for them to leave, then fails without \
                 changing anything"
            },
            replace = params["replace"].as_str().unwrap_or("?"),
            database = params["database"].as_str().unwrap_or("?"),
            id = params["recovery_id"],
            point = params["point"]
                .as_str()
                .map(|p| format!(" ({p})"))
                .unwrap_or_default(),
        )
    }

    fn details<'a>(
        &'a self,
        state: &'a AppState,
        target: &'a Arc<Target>,
        params: &'a Value,
    ) -> BoxFuture<'a, Vec<(String, String)>> {
        Box::pin(async move {
            let Ok(p) = Params::of(params) else {
                return vec![];
            };
            let mut out = vec![];
            match recover::find(&state.db, p.recovery_id).await {
                Ok(Some(r)) => out.push((
                    "Recovery".into(),
                    format!(
                        "#{} of {}: {} — {}{}",
                        r.id,
                        r.target,
                        r.point_text,
                        r.status,
                        r.expires_at
                            .filter(|_| r.status == "ready")
                            .map(|t| format!(
                                ", removed at {} unless someone clicks Done first",
                                t.format("%Y-%m-%d %H:%M UTC")
                            ))
                            .unwrap_or_default()
                    ),
                )),
                _ => out.push((
                    "Recovery".into(),
                    format!("#{} does not exist", p.recovery_id),
                )),
            }
            if let Some(t) = params["recovered_tables"].as_object() {
                out.push((
                    format!("Recovered {}", p.database),
                    if t.is_empty() {
                        "no tables".into()
                    } else {
                        t.iter()
                            .map(|(t, n)| format!("{t} ({n} rows)"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    },
                ));
            }
            let now: Result<(i64, Vec<(String, i64)>), String> = async {
                let mut c = crate::restores::connect_to(target, &p.replace, CONNECT).await?;
                let size: i64 = sqlx::query_scalar("SELECT pg_database_size(current_database())")
                    .fetch_one(&mut c)
                    .await
                    .map_err(|e| target.scrub(&e.to_string()))?;
                let tables: Vec<(String, i64)> = sqlx::query_as(
                    "SELECT schemaname || '.' || relname, n_live_tup FROM pg_stat_user_tables ORDER BY 1",
                )
                .fetch_all(&mut c)
                .await
                .map_err(|e| target.scrub(&e.to_string()))?;
                let _ = c.close().await;
                Ok((size, tables))
            }
            .await;
            out.push((
                "Replaced".into(),
                match now {
                    Ok((size, tables)) => format!(
                        "{} on {} now: {}, {} tables ({})",
                        p.replace,
                        target.name(),
                        crate::fmt::bytes(size),
                        tables.len(),
                        tables
                            .iter()
                            .take(20)
                            .map(|(t, n)| format!("{t} ~{n} rows"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    Err(e) => format!("{} on {} cannot be read now: {e}", p.replace, target.name()),
                },
            ));
            out
        })
    }

    /// Approved on: the recovery (still ready) and the tables of the database
    /// it replaces. Stops the request when the recovery is gone.
    fn world<'a>(
        &'a self,
        state: &'a AppState,
        target: &'a Arc<Target>,
        params: &'a Value,
    ) -> BoxFuture<'a, World> {
        Box::pin(async move {
            let Ok(p) = Params::of(params) else {
                return World::none();
            };
            let blocked = ready_recovery(state, p.recovery_id).await.err();
            let tables: Option<Vec<String>> = async {
                let mut c = crate::restores::connect_to(target, &p.replace, Duration::from_secs(5))
                    .await
                    .ok()?;
                let t = swap::plain_table_names(&mut c).await.ok();
                let _ = c.close().await;
                t
            }
            .await;
            World {
                facts: json!({ "recovery": p.recovery_id, "database": p.replace, "tables": tables }),
                blocked,
            }
        })
    }

    fn execute<'a>(
        &'a self,
        ctx: ExecCtx,
        params: &'a Value,
    ) -> BoxFuture<'a, Result<Value, String>> {
        Box::pin(async move {
            let p = Params::of(params)?;
            let state = &ctx.state;
            let r = ready_recovery(state, p.recovery_id)
                .await
                .map_err(|e| format!("{e} Nothing was replaced."))?;
            crate::restores::refuse_if_being_backed_up(state, &ctx.target, &p.replace)
                .await
                .map_err(|e| format!("{e} Nothing was replaced."))?;
            let (rid, job) = insert(state, &ctx.audit, &ctx, &r, &p)
                .await
                .map_err(|e| format!("{e} Nothing was replaced."))?;
            Ok(json!({
                jobs::HANDED_OFF: job, "restore_id": rid, "database": p.replace,
                "url": format!("/restores/{rid}"),
            }))
        })
    }
}

/// Writes the `queued` restore row and its job, which ends the action's
/// operation and request. The recovery is kept at least an hour longer, so the
/// sweeper does not remove it under the copy.
async fn insert(
    state: &AppState,
    audit: &AuditCtx,
    ctx: &ExecCtx,
    r: &Recovery,
    p: &Params,
) -> Result<(i64, i64), String> {
    let mut tx = state.db.begin().await.map_err(|e| e.to_string())?;
    let rid: i64 = sqlx::query_scalar(
        "INSERT INTO restores (recovery_id, source_database, target, source_target, database, mode, status, jobs,
                               requested_by, requested_by_name, end_sessions, options, method)
         VALUES ($1, $2, $3, $4, $5, 'over_database', 'queued', 1, $6, $7, $8, '{}', 'swap') RETURNING id",
    )
    .bind(r.id)
    .bind(&p.database)
    .bind(ctx.target.name())
    .bind(&r.target)
    .bind(&p.replace)
    .bind(audit.actor.id)
    .bind(&audit.actor.name)
    .bind(p.end_sessions)
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| match e {
        sqlx::Error::Database(d) if d.is_unique_violation() => format!(
            "A restore into {} on {} is already running.",
            p.replace,
            ctx.target.name()
        ),
        e => e.to_string(),
    })?;
    let (job, op) = jobs::submit_in(
        &mut tx,
        state,
        audit,
        jobs::NewJob {
            kind: JOB_KIND,
            target: ctx.target.name(),
            params: json!({
                "restore_id": rid, "recovery_id": r.id, "database": p.database, "replace": p.replace,
                "end_sessions": p.end_sessions,
            }),
            operation: Some(ctx.operation),
            approval: Some(ctx.approval),
            run_here: false,
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    sqlx::query("UPDATE restores SET operation_id = $2, job_id = $3 WHERE id = $1")
        .bind(rid)
        .bind(op)
        .bind(job)
        .execute(&mut *tx)
        .await
        .map_err(|e| e.to_string())?;
    sqlx::query(
        "UPDATE recoveries SET expires_at = greatest(expires_at, now() + interval '1 hour') WHERE id = $1",
    )
    .bind(r.id)
    .execute(&mut *tx)
    .await
    .map_err(|e| e.to_string())?;
    tx.commit().await.map_err(|e| e.to_string())?;
    Ok((rid, job))
}

/// The job of a `pitr.replace`: copy, check, swap; the outcome is written to
/// the restore's row (the job writes the operation and the approval).
pub struct ReplaceJob;

impl JobKind for ReplaceJob {
    fn kind(&self) -> &'static str {
        JOB_KIND
    }
    fn title(&self) -> &'static str {
        "Replace a database with a recovered one"
    }
    fn run<'a>(&'a self, ctx: &'a JobCtx) -> BoxFuture<'a, Result<Value, String>> {
        Box::pin(run(ctx))
    }
    fn subject(&self, job: &jobs::Job) -> Option<(String, String)> {
        job.params["restore_id"]
            .as_i64()
            .map(|id| (format!("restore #{id}"), format!("/restores/{id}")))
    }
    fn result_url(&self, job: &jobs::Job) -> Option<String> {
        job.params["restore_id"]
            .as_i64()
            .map(|id| format!("/restores/{id}"))
    }
}

async fn run(ctx: &JobCtx) -> Result<Value, String> {
    let id = ctx.job.params["restore_id"]
        .as_i64()
        .ok_or("the job names no restore")?;
    let p = Params::of(&ctx.job.params)?;
    let started = sqlx::query(
        "UPDATE restores SET status = 'running', started_at = clock_timestamp() WHERE id = $1 AND status = 'queued'",
    )
    .bind(id)
    .execute(&ctx.state.db)
    .await
    .map_err(|e| e.to_string())?;
    if started.rows_affected() == 0 {
        return Err(format!("restore #{id} is not waiting to run"));
    }
    let outcome = replace(ctx, id, &p).await;
    crate::restores::run::finish(&ctx.state, id, &ctx.cancel, &outcome).await;
    outcome
}

/// Copy into the work database, check, swap. Before the swap commits, the live
/// database is never touched, and the work database is dropped on failure.
async fn replace(ctx: &JobCtx, id: i64, p: &Params) -> Result<Value, String> {
    use secrecy::ExposeSecret;
    let state = &ctx.state;
    let target: &Arc<Target> = &ctx.target;
    let progress = &ctx.progress;
    let untouched = format!("{} was not touched", p.replace);
    let r = ready_recovery(state, p.recovery_id)
        .await
        .map_err(|e| format!("{e} {untouched}."))?;
    progress.set_phase("reading the recovered database");
    let want = recovered_counts(&r, &p.database).await?;
    progress.set_items_total(want.len() as u64);

    progress.set_phase("checking the server");
    let names = swap::Names::for_restore(&p.replace, id);
    let pre = swap::preflight(target, &names)
        .await
        .map_err(|e| format!("{e}. Nothing was replaced; {untouched}."))?;
    let pool = target.pg().await?;
    let (num, superuser): (i32, bool) = sqlx::query_as(
        "SELECT current_setting('server_version_num')::int, rolsuper FROM pg_roles WHERE rolname = current_user",
    )
    .fetch_one(&pool)
    .await
    .map_err(|e| target.scrub(&e.to_string()))?;
    let major = (num / 10000) as u32;
    let dump_tool = pg_tools::pick("pg_dump", major)?;
    let restore_tool = pg_tools::pick("pg_restore", major)?;
    sqlx::query(
        "UPDATE restores SET work_database = $2, previous_database = $3, leftover = true WHERE id = $1",
    )
    .bind(id)
    .bind(&names.work)
    .bind(&names.previous)
    .execute(&state.db)
    .await
    .map_err(|e| e.to_string())?;

    progress.set_phase("creating the database");
    let mut admin = swap::admin(target, &[&p.replace], CONNECT).await?;
    let made = swap::create_work(&mut admin, target, &names).await;
    let _ = admin.close().await;
    if let Err(e) = made {
        // Not created: nothing of ours to drop.
        let _ = sqlx::query("UPDATE restores SET leftover = false WHERE id = $1")
            .bind(id)
            .execute(&state.db)
            .await;
        return Err(format!("{e}; {untouched}"));
    }

    let copied = async {
        let src = r.pg_conn(&p.database).ok_or("the recovery has no server")?;
        let conn = PgConn::from_url(target.config.url.expose_secret())
            .map_err(|e| target.scrub(&e))?
            .with_database(&names.work);
        // A superuser keeps every object's owner and privileges as they were
        // at the recovery point; otherwise the objects belong to dbops' role.
        let opts = DumpOptions {
            format: Format::Custom,
            no_owner: !superuser,
            ..DumpOptions::default()
        };
        progress.set_phase("copying the recovered database");
        super::recover::pipe_database(
            state,
            super::recover::Pipe {
                dump_tool: &dump_tool,
                restore_tool: &restore_tool,
                from: &src,
                to: &conn,
                opts: &opts,
            },
            progress,
            &ctx.cancel,
        )
        .await
        .map_err(|e| target.scrub(&e))?;

        progress.set_phase("analyzing the copy");
        let mut c = crate::restores::connect_to(target, &names.work, CONNECT).await?;
        crate::restores::run::analyze(&mut c, target).await;
        progress.set_phase("checking the copy");
        let got = crate::backups::run::table_counts(&mut c)
            .await
            .map_err(|e| target.scrub(&e.to_string()))?;
        let _ = c.close().await;
        progress.add_items(got.len() as u64);
        let diff = differences(&want, &got);
        if !diff.is_empty() {
            return Err(format!(
                "the copy differs from the recovered database ({})",
                diff.into_iter().take(5).collect::<Vec<_>>().join("; ")
            ));
        }
        let checked = format!(
            "all {} recovered tables are there with the recovered row counts ({} rows)",
            want.len(),
            want.values().sum::<i64>()
        );
        if ctx.cancel.is_cancelled() {
            return Err("stopped before the swap".to_string());
        }
        progress.set_phase("swapping the recovered copy in");
        let mut admin = swap::admin(target, &[&p.replace], CONNECT).await?;
        let props = swap::copy_properties(&mut admin, target, &names).await?;
        swap::rename_all(
            &mut admin,
            target,
            &[(&names.live, &names.previous), (&names.work, &names.live)],
            p.end_sessions,
        )
        .await?;
        let _ = admin.close().await;
        Ok::<_, String>((got, checked, props))
    }
    .await;
    let (counts, checked, props) = match copied {
        Ok(v) => v,
        Err(e) => {
            let dropped = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                crate::state::quote_ident(&names.work)
            ))
            .execute(&pool)
            .await;
            return match dropped {
                Ok(_) => {
                    let _ = sqlx::query("UPDATE restores SET leftover = false WHERE id = $1")
                        .bind(id)
                        .execute(&state.db)
                        .await;
                    Err(format!("{e}; {untouched}"))
                }
                Err(d) => Err(format!(
                    "{e}; {untouched} (and the copy {} could not be dropped: {}; dbops drops it when the server \
                     answers again)",
                    names.work,
                    target.scrub(&d.to_string())
                )),
            };
        }
    };
    // Swapped: nothing of this replace is left over, and "swap back" applies.
    sqlx::query(
        "UPDATE restores SET leftover = false, swapped_at = clock_timestamp() WHERE id = $1",
    )
    .bind(id)
    .execute(&state.db)
    .await
    .map_err(|e| e.to_string())?;
    let rows: i64 = counts.values().sum();
    Ok(json!({
        "database": p.replace,
        "recovery_id": r.id,
        "recovered_database": p.database,
        "point": r.point_text,
        "tables": counts.len(),
        "rows": rows,
        "row_counts": counts,
        "owners": if superuser {
            "kept as recovered".to_string()
        } else {
            "objects now belong to dbops' role (it is not a superuser, so pg_restore ran with --no-owner)".to_string()
        },
        "method": "swap",
        "swap": swap::facts(&names, &pre, &checked, &props),
        "previous_database": names.previous,
        "target": target.name(),
        "url": format!("/restores/{id}"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_differs_when_a_table_is_missing_or_its_count_differs() {
        let want: BTreeMap<String, i64> = [("public.a".into(), 3), ("public.b".into(), 7)].into();
        let mut got = want.clone();
        assert!(differences(&want, &got).is_empty());
        got.insert("public.extra".into(), 1);
        assert!(
            differences(&want, &got).is_empty(),
            "extra tables are not a loss"
        );
        got.insert("public.b".into(), 6);
        got.remove("public.a");
        assert_eq!(
            differences(&want, &got),
            vec![
                "public.a is missing",
                "public.b: 6 rows copied, 7 recovered"
            ]
        );
    }

    #[test]
    fn the_database_replaced_defaults_to_the_recovered_one() {
        let form: BTreeMap<String, String> = [
            ("recovery_id".into(), "4".into()),
            ("database".into(), "shop".into()),
        ]
        .into();
        let p = Replace.parse(&form).unwrap();
        assert_eq!(p["replace"], "shop");
        assert_eq!(p["end_sessions"], false);
        let form: BTreeMap<String, String> = [("database".into(), "shop".into())].into();
        assert!(Replace.parse(&form).unwrap_err().contains("recovery"));
    }
}
