//! Maintenance the reports lead to.
//!
//! - ANALYZE, VACUUM and VACUUM ANALYZE of one table: not destructive (they take a
//!   SHARE UPDATE EXCLUSIVE lock, which blocks neither reads nor writes), so an
//!   operator starts them directly; they run as jobs and are logged.
//! - VACUUM FULL, REINDEX (CONCURRENTLY by default), DROP INDEX CONCURRENTLY and
//!   `pg_stat_statements_reset()`: destructive [`Action`]s that go through
//!   approvals; the approver reads the exact statement and the lock it takes. The
//!   long ones hand their work to a job ([`crate::jobs::hand_off`]).
//!
//! A relation is named by schema and name (never by SQL text); the executor looks
//! it up again in the catalog, checks its kind, and writes the statement with both
//! names quoted ([`super::qualified`]). Statements run on a connection of their
//! own with no statement timeout but a lock timeout
//! (`[reports] maintenance_lock_timeout_seconds`), so that a VACUUM FULL waiting
//! for its lock never holds up every other query of the table behind it. Progress
//! comes from `pg_stat_progress_vacuum` / `_cluster` / `_analyze` /
//! `_create_index`, read on a second connection every second.

use std::{collections::BTreeMap, time::Duration};

use futures::{FutureExt, future::BoxFuture};
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

use super::{Progress, ReportSettings, check_name, connect, pg_error, qualified, quote_ident};
use crate::{
    approvals::{Action, ExecCtx, Severity},
    config::TargetKind,
    targets::Target,
};

/// One maintenance statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Analyze,
    Vacuum,
    VacuumAnalyze,
    VacuumFull,
    Reindex,
    DropIndex,
}

impl Command {
    pub const ALL: [Command; 6] = [
        Command::Analyze,
        Command::Vacuum,
        Command::VacuumAnalyze,
        Command::VacuumFull,
        Command::Reindex,
        Command::DropIndex,
    ];

    /// The job kind (and, for the gated ones, the action kind).
    pub fn kind(self) -> &'static str {
        match self {
            Command::Analyze => "pg.table.analyze",
            Command::Vacuum => "pg.table.vacuum",
            Command::VacuumAnalyze => "pg.table.vacuum_analyze",
            Command::VacuumFull => "pg.table.vacuum_full",
            Command::Reindex => "pg.index.reindex",
            Command::DropIndex => "pg.index.drop",
        }
    }

    pub fn from_kind(kind: &str) -> Option<Command> {
        Command::ALL.into_iter().find(|c| c.kind() == kind)
    }

    pub fn title(self) -> &'static str {
        match self {
            Command::Analyze => "ANALYZE a table",
            Command::Vacuum => "VACUUM a table",
            Command::VacuumAnalyze => "VACUUM ANALYZE a table",
            Command::VacuumFull => "VACUUM FULL a table",
            Command::Reindex => "Rebuild an index (REINDEX)",
            Command::DropIndex => "Drop an index",
        }
    }

    /// Whether it needs an approval (per the target's policy).
    pub fn gated(self) -> bool {
        matches!(
            self,
            Command::VacuumFull | Command::Reindex | Command::DropIndex
        )
    }

    /// Whether it works on an index (else on a table).
    pub fn on_index(self) -> bool {
        matches!(self, Command::Reindex | Command::DropIndex)
    }
}

/// The parameters of every maintenance command: which relation, and for REINDEX
/// whether concurrently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    pub schema: String,
    /// The table or index name.
    pub name: String,
    /// REINDEX … CONCURRENTLY (the default), DROP INDEX CONCURRENTLY (always).
    pub concurrently: bool,
}

impl Params {
    /// From a form: `schema` and `table` (or `index`), `concurrently` for REINDEX.
    pub fn parse(cmd: Command, form: &BTreeMap<String, String>) -> Result<Params, String> {
        let field = if cmd.on_index() { "index" } else { "table" };
        let get = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
        let schema = check_name("schema", get("schema"))?;
        let name = check_name(field, get(field))?;
        let concurrently = match cmd {
            Command::Reindex => !matches!(get("concurrently"), "false" | "no" | "off" | "0"),
            Command::DropIndex => true,
            _ => false,
        };
        Ok(Params {
            schema,
            name,
            concurrently,
        })
    }

    pub fn from_json(cmd: Command, v: &Value) -> Result<Params, String> {
        let mut form = BTreeMap::new();
        if let Value::Object(m) = v {
            for (k, v) in m {
                let s = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                form.insert(k.clone(), s);
            }
        }
        Params::parse(cmd, &form)
    }

    pub fn to_json(&self, cmd: Command) -> Value {
        let field = if cmd.on_index() { "index" } else { "table" };
        let mut m = serde_json::Map::new();
        m.insert("schema".into(), json!(self.schema));
        m.insert(field.into(), json!(self.name));
        if cmd == Command::Reindex {
            m.insert("concurrently".into(), json!(self.concurrently));
        }
        Value::Object(m)
    }
}

/// The exact statement.
pub fn statement(cmd: Command, p: &Params) -> String {
    let rel = qualified(&p.schema, &p.name);
    match cmd {
        Command::Analyze => format!("ANALYZE VERBOSE {rel}"),
        Command::Vacuum => format!("VACUUM VERBOSE {rel}"),
        Command::VacuumAnalyze => format!("VACUUM (VERBOSE, ANALYZE) {rel}"),
        Command::VacuumFull => format!("VACUUM (FULL, VERBOSE) {rel}"),
        Command::Reindex if p.concurrently => format!("REINDEX INDEX CONCURRENTLY {rel}"),
        Command::Reindex => format!("REINDEX INDEX {rel}"),
        Command::DropIndex => format!("DROP INDEX CONCURRENTLY {rel}"),
    }
}

/// The statement without VERBOSE (what people type), for descriptions.
fn plain_statement(cmd: Command, p: &Params) -> String {
    statement(cmd, p)
        .replace("ANALYZE VERBOSE ", "ANALYZE ")
        .replace("VACUUM VERBOSE ", "VACUUM ")
        .replace("(VERBOSE, ANALYZE)", "ANALYZE")
        .replace("(FULL, VERBOSE)", "FULL")
}

/// What it does and which lock it takes, for the approver and the log.
pub fn describe(cmd: Command, p: &Params, lock_timeout: Duration) -> String {
    let st = plain_statement(cmd, p);
    let wait = format!(
        "It waits at most {} s for its lock ([reports] maintenance_lock_timeout_seconds); if another session holds a conflicting lock that long, it gives up and nothing changes.",
        lock_timeout.as_secs()
    );
    match cmd {
        Command::Analyze => format!(
            "{st} — reads a sample of the table and updates the planner statistics. Lock: SHARE UPDATE EXCLUSIVE on the table (reads and writes go on)."
        ),
        Command::Vacuum => format!(
            "{st} — removes dead rows so their space can be reused, and updates the visibility map. Lock: SHARE UPDATE EXCLUSIVE on the table (reads and writes go on)."
        ),
        Command::VacuumAnalyze => format!(
            "{st} — VACUUM, then ANALYZE. Lock: SHARE UPDATE EXCLUSIVE on the table (reads and writes go on)."
        ),
        Command::VacuumFull => format!(
            "{st} — rewrites the whole table and all its indexes into new files and returns the freed space to the operating system. \
             Lock: ACCESS EXCLUSIVE on the table for the whole run — every query on it, reads included, waits until it ends. \
             Needs free disk space for a full copy of the table and its indexes. {wait}"
        ),
        Command::Reindex if p.concurrently => format!(
            "{st} — builds a new copy of the index next to the old one, then swaps them and drops the old one. \
             Lock: SHARE UPDATE EXCLUSIVE on the table and the index (reads and writes go on; other schema changes and VACUUM of the table wait). \
             It waits for running transactions at several points, and if it fails it leaves an invalid index (named …_ccnew) to drop. {wait}"
        ),
        Command::Reindex => format!(
            "{st} — rebuilds the index. Lock: SHARE on the table (writes wait, reads go on) and ACCESS EXCLUSIVE on the index (queries that would use it wait) for the whole run. {wait}"
        ),
        Command::DropIndex => format!(
            "{st} — removes the index for good; queries that used it fall back to other plans. \
             Lock: SHARE UPDATE EXCLUSIVE on the table, then a brief ACCESS EXCLUSIVE on the index once running transactions that use it have ended (reads and writes of the table go on). {wait}"
        ),
    }
}

/// Finds the relation again by name and checks its kind; returns its OID.
async fn resolve(
    conn: &mut PgConnection,
    target: &Target,
    cmd: Command,
    p: &Params,
) -> Result<i64, String> {
    let kinds = if cmd.on_index() {
        "('i')"
    } else {
        "('r', 'm', 'p', 't')"
    };
    let found: Option<(i64, String)> = sqlx::query_as(
        "SELECT c.oid::int8, c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = $1 AND c.relname = $2",
    )
    .bind(&p.schema)
    .bind(&p.name)
    .fetch_optional(&mut *conn)
    .await
    .map_err(|e| pg_error(target, &e))?;
    let what = if cmd.on_index() { "index" } else { "table" };
    match found {
        None => Err(format!(
            "There is no {what} {} in {} (any more); nothing was run.",
            qualified(&p.schema, &p.name),
            target.name()
        )),
        Some((oid, kind)) if kinds.contains(&format!("'{kind}'")) => Ok(oid),
        Some(_) => Err(format!(
            "{} is not a{} {what}; nothing was run.",
            qualified(&p.schema, &p.name),
            if cmd.on_index() { "n" } else { "" }
        )),
    }
}

/// Reads the progress view of `pid` every second until `done` is cancelled.
async fn watch(
    target: &Target,
    cmd: Command,
    pid: i32,
    connect_timeout: Duration,
    progress: &dyn Progress,
    done: tokio_util::sync::CancellationToken,
) {
    let sql = match cmd {
        Command::Analyze => {
            "SELECT phase, sample_blks_total::int8, sample_blks_scanned::int8 FROM pg_stat_progress_analyze WHERE pid = $1"
        }
        Command::Vacuum | Command::VacuumAnalyze => {
            "SELECT phase, heap_blks_total::int8, greatest(heap_blks_scanned, heap_blks_vacuumed)::int8
             FROM pg_stat_progress_vacuum WHERE pid = $1
             UNION ALL
             SELECT phase, sample_blks_total::int8, sample_blks_scanned::int8 FROM pg_stat_progress_analyze WHERE pid = $1"
        }
        Command::VacuumFull => {
            "SELECT phase, heap_blks_total::int8, heap_blks_scanned::int8 FROM pg_stat_progress_cluster WHERE pid = $1"
        }
        Command::Reindex => {
            "SELECT phase, CASE WHEN blocks_total > 0 THEN blocks_total ELSE tuples_total END::int8,
                    CASE WHEN blocks_total > 0 THEN blocks_done ELSE tuples_done END::int8
             FROM pg_stat_progress_create_index WHERE pid = $1"
        }
        Command::DropIndex => return,
    };
    let Ok(mut conn) = connect(
        target,
        "maintenance progress",
        Some(Duration::from_secs(5)),
        Some(Duration::from_secs(1)),
        connect_timeout,
    )
    .await
    else {
        return;
    };
    let mut last_done = 0u64;
    let mut last_phase = String::new();
    loop {
        tokio::select! {
            _ = done.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if let Ok(Some((phase, total, did))) =
            sqlx::query_as::<_, (String, Option<i64>, Option<i64>)>(sql)
                .bind(pid)
                .fetch_optional(&mut conn)
                .await
        {
            if phase != last_phase {
                progress.phase(&phase);
                last_phase = phase;
                last_done = 0;
            }
            progress.total(total.unwrap_or(0).max(0) as u64);
            let did = did.unwrap_or(0).max(0) as u64;
            if did > last_done {
                progress.add(did - last_done);
                last_done = did;
            }
        }
        if progress.cancelled() {
            let _ = sqlx::query("SELECT pg_cancel_backend($1)")
                .bind(pid)
                .execute(&mut conn)
                .await;
        }
    }
    let _ = conn.close().await;
}

async fn total_size(conn: &mut PgConnection, oid: i64) -> Option<i64> {
    sqlx::query_scalar::<_, Option<i64>>("SELECT pg_total_relation_size($1::oid)")
        .bind(oid)
        .fetch_one(conn)
        .await
        .ok()
        .flatten()
}

/// Runs one maintenance command on `target` to its end; returns what happened
/// (statement, duration, sizes before and after).
pub async fn run(
    target: &Target,
    settings: &ReportSettings,
    connect_timeout: Duration,
    cmd: Command,
    p: &Params,
    progress: &dyn Progress,
) -> Result<Value, String> {
    progress.phase("connecting");
    let mut conn = connect(
        target,
        cmd.kind(),
        None,
        Some(settings.maintenance_lock_timeout),
        connect_timeout,
    )
    .await?;
    let oid = resolve(&mut conn, target, cmd, p).await?;
    let before = total_size(&mut conn, oid).await;
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut conn)
        .await
        .map_err(|e| pg_error(target, &e))?;
    let sql = statement(cmd, p);
    progress.phase(&format!("waiting for the lock ({sql})"));
    let done = tokio_util::sync::CancellationToken::new();
    let started = std::time::Instant::now();
    let work = async {
        // No arguments: the simple query protocol (VACUUM cannot be prepared in a
        // transaction block).
        let r = sqlx::Executor::execute(&mut conn, sql.as_str()).await;
        done.cancel();
        r
    };
    let (outcome, ()) = tokio::join!(
        work,
        watch(target, cmd, pid, connect_timeout, progress, done.clone())
    );
    let elapsed = started.elapsed();
    if let Err(e) = outcome {
        let _ = conn.close().await;
        return Err(match super::sqlstate(&e).as_deref() {
            Some("55P03") => format!(
                "{sql} could not get its lock within {} s: another session holds a conflicting lock. Nothing was changed; try again in a quieter moment.",
                settings.maintenance_lock_timeout.as_secs()
            ),
            Some("57014") if progress.cancelled() => format!("{sql} was cancelled"),
            _ => format!("{sql} failed: {}", pg_error(target, &e)),
        });
    }
    let after = if cmd == Command::DropIndex {
        Some(0)
    } else {
        total_size(&mut conn, oid).await
    };
    let _ = conn.close().await;
    Ok(json!({
        "statement": sql,
        "relation": format!("{}.{}", p.schema, p.name),
        "seconds": (elapsed.as_secs_f64() * 100.0).round() / 100.0,
        "bytes_before": before,
        "bytes_after": after,
    }))
}

/// VACUUM FULL, REINDEX and DROP INDEX as approval-gated actions.
pub struct Gated(pub Command);

impl Action for Gated {
    fn kind(&self) -> &'static str {
        self.0.kind()
    }

    fn title(&self) -> &'static str {
        self.0.title()
    }

    fn target_kind(&self) -> TargetKind {
        TargetKind::Postgres
    }

    fn severity(&self) -> Severity {
        Severity::Destructive
    }

    fn parse(&self, form: &BTreeMap<String, String>) -> Result<Value, String> {
        Params::parse(self.0, form).map(|p| p.to_json(self.0))
    }

    fn describe(&self, params: &Value) -> String {
        match Params::from_json(self.0, params) {
            // The executor's lock timeout is a setting; the default is described
            // when the description is made without the settings at hand.
            Ok(p) => describe(
                self.0,
                &p,
                ReportSettings::default().maintenance_lock_timeout,
            ),
            Err(_) => format!("{}: the parameters are not valid.", self.title()),
        }
    }

    fn execute<'a>(
        &'a self,
        ctx: ExecCtx,
        params: &'a Value,
    ) -> BoxFuture<'a, Result<Value, String>> {
        async move {
            // Checked again here: what runs is exactly what was approved.
            let p = Params::from_json(self.0, params)?;
            crate::jobs::hand_off(&ctx, self.0.kind(), p.to_json(self.0)).await
        }
        .boxed()
    }
}

/// `pg.stat_statements.reset`: `pg_stat_statements_reset()` for the target's
/// database only.
pub struct ResetStatements;

impl Action for ResetStatements {
    fn kind(&self) -> &'static str {
        "pg.stat_statements.reset"
    }

    fn title(&self) -> &'static str {
        "Reset query statistics (pg_stat_statements)"
    }

    fn target_kind(&self) -> TargetKind {
        TargetKind::Postgres
    }

    fn severity(&self) -> Severity {
        Severity::Destructive
    }

    fn parse(&self, _form: &BTreeMap<String, String>) -> Result<Value, String> {
        Ok(json!({ "scope": "this database" }))
    }

    fn describe(&self, _params: &Value) -> String {
        "SELECT pg_stat_statements_reset(0, <this database's OID>, 0) — forgets the collected statistics (calls, times, rows) \
         of every statement of this target's database; the slow queries report starts again from zero. \
         Other databases on the server keep theirs. No table lock; it takes the extension's own lock briefly."
            .to_string()
    }

    fn execute<'a>(
        &'a self,
        ctx: ExecCtx,
        _params: &'a Value,
    ) -> BoxFuture<'a, Result<Value, String>> {
        async move {
            let target = &ctx.target;
            let mut conn = connect(
                target,
                "pg_stat_statements_reset",
                Some(Duration::from_secs(30)),
                Some(Duration::from_secs(5)),
                ctx.state.config.connect_timeout,
            )
            .await?;
            let schema = super::statements::installed(&mut conn)
                .await
                .map_err(|e| pg_error(target, &e))?
                .ok_or("pg_stat_statements is not installed in this database; there is nothing to reset.")?;
            sqlx::query(&format!(
                "SELECT {}.pg_stat_statements_reset(0, (SELECT oid FROM pg_database WHERE datname = current_database()), 0)",
                quote_ident(&schema)
            ))
            .execute(&mut conn)
            .await
            .map_err(|e| pg_error(target, &e))?;
            let _ = conn.close().await;
            Ok(json!({ "reset": true }))
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn hostile_names_are_quoted_never_interpreted() {
        let p = Params::parse(
            Command::VacuumFull,
            &form(&[("schema", "Sales Data"), ("table", "x\"; DROP TABLE y; --")]),
        )
        .unwrap();
        assert_eq!(
            statement(Command::VacuumFull, &p),
            "VACUUM (FULL, VERBOSE) \"Sales Data\".\"x\"\"; DROP TABLE y; --\""
        );
    }

    #[test]
    fn reindex_is_concurrent_unless_asked_otherwise_and_drop_always_is() {
        let f = form(&[("schema", "public"), ("index", "i")]);
        let p = Params::parse(Command::Reindex, &f).unwrap();
        assert!(p.concurrently);
        assert_eq!(
            statement(Command::Reindex, &p),
            "REINDEX INDEX CONCURRENTLY \"public\".\"i\""
        );
        let mut f2 = f.clone();
        f2.insert("concurrently".into(), "false".into());
        assert!(!Params::parse(Command::Reindex, &f2).unwrap().concurrently);
        let d = Params::parse(Command::DropIndex, &f2).unwrap();
        assert_eq!(
            statement(Command::DropIndex, &d),
            "DROP INDEX CONCURRENTLY \"public\".\"i\""
        );
    }

    #[test]
    fn descriptions_name_the_lock() {
        let p = Params::parse(
            Command::VacuumFull,
            &form(&[("schema", "public"), ("table", "t")]),
        )
        .unwrap();
        let d = Gated(Command::VacuumFull).describe(&p.to_json(Command::VacuumFull));
        assert!(d.starts_with("VACUUM FULL \"public\".\"t\""), "{d}");
        assert!(d.contains("ACCESS EXCLUSIVE"), "{d}");
        let r = Params::parse(Command::Reindex, &form(&[("schema", "s"), ("index", "i")])).unwrap();
        let d = Gated(Command::Reindex).describe(&r.to_json(Command::Reindex));
        assert!(d.contains("SHARE UPDATE EXCLUSIVE"), "{d}");
    }

    #[test]
    fn missing_names_are_refused() {
        assert!(Params::parse(Command::Vacuum, &form(&[("schema", "public")])).is_err());
        assert!(Params::parse(Command::DropIndex, &form(&[("table", "t")])).is_err());
    }
}
