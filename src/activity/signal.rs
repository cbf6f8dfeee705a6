//! Cancelling a query and terminating a session: the two gated actions of the
//! activity page (`pg.backend.cancel`, `pg.backend.terminate`).
//!
//! A process id alone is not a safe handle: once a session ends, the server may
//! give its pid to a new one. So the parameters are the pid *and* the session's
//! `backend_start`, and the executor signals the process only if a session with
//! both still exists, in one statement.
//!
//! Over 600 lines: cancel and terminate are one gated action whose world check (is
//! it still the same session?) needs the session snapshot; about 125 lines are
//! tests.

use std::{collections::BTreeMap, sync::Arc};

use chrono::{DateTime, SecondsFormat, Utc};
use futures::{FutureExt, future::BoxFuture};
use serde_json::{Map, Value, json};

use super::Session;
use crate::{
    approvals::{Action, ExecCtx, Severity},
    config::TargetKind,
    fmt,
    state::AppState,
    targets::{Target, bounded, postgres::describe_pg_error},
};

/// Which signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// `pg_cancel_backend`: stops the running statement; the session stays.
    Cancel,
    /// `pg_terminate_backend`: ends the session; its transaction is rolled back.
    Terminate,
}

impl Signal {
    pub fn kind(self) -> &'static str {
        match self {
            Signal::Cancel => "pg.backend.cancel",
            Signal::Terminate => "pg.backend.terminate",
        }
    }

    fn function(self) -> &'static str {
        match self {
            Signal::Cancel => "pg_cancel_backend",
            Signal::Terminate => "pg_terminate_backend",
        }
    }
}

/// The parameters of both actions, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendRef {
    pub pid: i32,
    pub backend_start: DateTime<Utc>,
    /// What the requester's page showed, for the approver to read; the executor
    /// never relies on these.
    pub usename: Option<String>,
    pub datname: Option<String>,
}

/// Longest role or database name PostgreSQL allows (NAMEDATALEN - 1 bytes).
const MAX_NAME: usize = 63;

impl BackendRef {
    /// Parses the form fields `pid`, `backend_start` and optionally `usename` and
    /// `datname`; other fields are ignored.
    pub fn parse(form: &BTreeMap<String, String>) -> Result<BackendRef, String> {
        let field = |k: &str| form.get(k).map(|v| v.trim()).unwrap_or("");
        let pid = match field("pid").parse::<i32>() {
            Ok(p) if p > 0 => p,
            _ => {
                return Err(
                    "“pid” must be a positive whole number: the process id of the session.".into(),
                );
            }
        };
        let backend_start = parse_time(field("backend_start")).ok_or_else(|| {
            "“backend_start” must be the time the session started, like \
             2026-11-21T10:37:54.123456Z (open the action from the activity page, which fills it in)."
                .to_string()
        })?;
        let name = |k: &str| -> Result<Option<String>, String> {
            let v = field(k);
            if v.is_empty() {
                Ok(None)
            } else if v.len() > MAX_NAME || v.chars().any(char::is_control) {
                Err(format!("“{k}” is not a PostgreSQL name."))
            } else {
                Ok(Some(v.to_string()))
            }
        };
        Ok(BackendRef {
            pid,
            backend_start,
            usename: name("usename")?,
            datname: name("datname")?,
        })
    }

    /// Reads canonical parameters back.
    pub fn from_params(params: &Value) -> Result<BackendRef, String> {
        let mut form = BTreeMap::new();
        if let Value::Object(map) = params {
            for (k, v) in map {
                let text = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                form.insert(k.clone(), text);
            }
        }
        BackendRef::parse(&form)
    }

    /// `backend_start` as stored: UTC with microseconds, PostgreSQL's precision.
    pub fn backend_start_text(&self) -> String {
        self.backend_start
            .to_rfc3339_opts(SecondsFormat::Micros, true)
    }

    /// The canonical JSON: `{"backend_start": …, "pid": N}` plus the names when given.
    pub fn to_params(&self) -> Value {
        let mut m = Map::new();
        m.insert("pid".into(), json!(self.pid));
        m.insert("backend_start".into(), json!(self.backend_start_text()));
        if let Some(u) = &self.usename {
            m.insert("usename".into(), json!(u));
        }
        if let Some(d) = &self.datname {
            m.insert("datname".into(), json!(d));
        }
        Value::Object(m)
    }
}

/// RFC 3339, or PostgreSQL's own text form (`2026-11-21 10:37:54.123456+00`) as
/// someone might paste it from psql.
fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    if s.is_empty() {
        return None;
    }
    DateTime::parse_from_rfc3339(s)
        .or_else(|_| DateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f%#z"))
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// `pg.backend.cancel` or `pg.backend.terminate`.
pub struct BackendSignal(pub Signal);

impl Action for BackendSignal {
    fn kind(&self) -> &'static str {
        self.0.kind()
    }

    fn title(&self) -> &'static str {
        match self.0 {
            Signal::Cancel => "Cancel a query",
            Signal::Terminate => "Terminate a session",
        }
    }

    fn target_kind(&self) -> TargetKind {
        TargetKind::Postgres
    }

    fn severity(&self) -> Severity {
        match self.0 {
            Signal::Cancel => Severity::Disruptive,
            Signal::Terminate => Severity::Destructive,
        }
    }

    fn parse(&self, form: &BTreeMap<String, String>) -> Result<Value, String> {
        BackendRef::parse(form).map(|b| b.to_params())
    }

    fn describe(&self, params: &Value) -> String {
        let Ok(b) = BackendRef::from_params(params) else {
            return format!("{}: the parameters are not valid.", self.title());
        };
        let mut who = Vec::new();
        if let Some(u) = &b.usename {
            who.push(format!("user {u}"));
        }
        if let Some(d) = &b.datname {
            who.push(format!("database {d}"));
        }
        who.push(format!("started {}", fmt::time(&b.backend_start)));
        let who = who.join(", ");
        let pid = b.pid;
        match self.0 {
            Signal::Cancel => format!(
                "SELECT pg_cancel_backend({pid}) — cancels the statement session {pid} ({who}) is running \
                 at that moment; the session stays connected, and a transaction it is in is aborted. \
                 Nothing happens if the session is idle. Only that exact session is signalled: if it \
                 has ended, nothing runs."
            ),
            Signal::Terminate => format!(
                "SELECT pg_terminate_backend({pid}) — ends session {pid} ({who}); its open transaction \
                 is rolled back and its client is disconnected. Only that exact session is signalled: \
                 if it has ended, nothing runs."
            ),
        }
    }

    fn details<'a>(
        &'a self,
        state: &'a AppState,
        target: &'a Arc<Target>,
        params: &'a Value,
    ) -> BoxFuture<'a, Vec<(String, String)>> {
        async move {
            let Ok(b) = BackendRef::from_params(params) else {
                return vec![];
            };
            let limit = super::time_limit(&state.config);
            match session_now(target, limit, &b).await {
                Ok(facts) => facts,
                Err(e) => vec![(
                    "Session now".into(),
                    format!("dbops could not look at the session: {e}"),
                )],
            }
        }
        .boxed()
    }

    fn execute<'a>(
        &'a self,
        ctx: ExecCtx,
        params: &'a Value,
    ) -> BoxFuture<'a, Result<Value, String>> {
        async move {
            let b = BackendRef::from_params(params)?;
            let target = &ctx.target;
            let limit = super::time_limit(&ctx.state.config);
            let pool = target.pg().await?;
            let fail = |e: String| describe_pg_error(&target.scrub(&e));
            // One statement: the process is signalled only if it is still the same
            // session (pid and start time), so a reused pid is never hit.
            let signalled: Option<bool> = bounded(
                limit,
                sqlx::query_scalar(&format!(
                    "SELECT {}(pid) FROM pg_stat_activity WHERE pid = $1 AND backend_start = $2::timestamptz",
                    self.0.function()
                ))
                .bind(b.pid)
                .bind(b.backend_start_text())
                .fetch_optional(&pool),
            )
            .await
            .map_err(|e| format!("PostgreSQL refused: {}", fail(e)))?;
            match signalled {
                Some(true) => Ok(json!({ "signalled": true, "pid": b.pid })),
                Some(false) => Err(format!(
                    "PostgreSQL could not signal process {} ({} returned false); the session may have \
                     ended just now. Nothing else was done.",
                    b.pid,
                    self.0.function()
                )),
                None => {
                    // Say why: gone, replaced by another session, or not visible.
                    let now: Option<Option<DateTime<Utc>>> = bounded(
                        limit,
                        sqlx::query_scalar(
                            "SELECT backend_start FROM pg_stat_activity WHERE pid = $1",
                        )
                        .bind(b.pid)
                        .fetch_optional(&pool),
                    )
                    .await
                    .unwrap_or(None);
                    Err(match now {
                        None => format!(
                            "That session has already ended: there is no process {} any more. \
                             Nothing was signalled.",
                            b.pid
                        ),
                        Some(Some(other)) => format!(
                            "That session has already ended: process {} is now a different session \
                             (started {}, not {}). Nothing was signalled.",
                            b.pid,
                            fmt::time(&other),
                            fmt::time(&b.backend_start)
                        ),
                        Some(None) => format!(
                            "dbops' role on {} cannot see when process {} started (it needs \
                             pg_read_all_stats), so it cannot make sure it is the same session. \
                             Nothing was signalled.",
                            target.name(),
                            b.pid
                        ),
                    })
                }
            }
        }
        .boxed()
    }
}

/// Query text shown to the approver, in characters (the rest is cut).
const DETAILS_QUERY: usize = 600;

/// Blocked sessions listed to the approver; the rest are counted.
const DETAILS_BLOCKED: i64 = 20;

/// The session as it is now (same columns as the activity page's snapshot).
const SESSION_NOW: &str = "
SELECT pid,
       usename::text AS usename,
       datname::text AS datname,
       application_name,
       host(client_addr) AS client_addr,
       client_port,
       backend_type,
       state,
       wait_event_type,
       wait_event,
       query,
       backend_start,
       query_start,
       extract(epoch FROM now() - query_start)::float8 AS query_secs,
       extract(epoch FROM now() - xact_start)::float8 AS xact_secs,
       extract(epoch FROM now() - state_change)::float8 AS state_secs,
       pg_blocking_pids(pid) AS blocked_by
FROM pg_stat_activity WHERE pid = $1";

/// The sessions waiting for a lock that `$1` holds or waits ahead of them for
/// (`pg_blocking_pids` is asked only of sessions that wait on a lock), and how
/// many there are in all.
const BLOCKED_BY_IT: &str = "
SELECT pid, application_name,
       extract(epoch FROM now() - query_start)::float8 AS waiting_secs,
       count(*) OVER () AS total
FROM pg_stat_activity
WHERE wait_event_type = 'Lock' AND $1 = ANY(pg_blocking_pids(pid))
ORDER BY pid LIMIT $2";

/// What the approver should know about the session the request points at: what it
/// runs, from where, for how long, and what it blocks and waits for — or that it
/// has ended (or is now another session with the same pid).
async fn session_now(
    target: &Target,
    limit: std::time::Duration,
    b: &BackendRef,
) -> Result<Vec<(String, String)>, String> {
    let pool = target.pg().await?;
    let fetch = async {
        let now: Option<Session> = sqlx::query_as(SESSION_NOW)
            .bind(b.pid)
            .fetch_optional(&pool)
            .await?;
        let blocked: Vec<(i32, Option<String>, Option<f64>, i64)> = match &now {
            Some(s) if s.backend_start == Some(b.backend_start) => {
                sqlx::query_as(BLOCKED_BY_IT)
                    .bind(b.pid)
                    .bind(DETAILS_BLOCKED)
                    .fetch_all(&pool)
                    .await?
            }
            _ => vec![],
        };
        Ok::<_, sqlx::Error>((now, blocked))
    };
    let (now, blocked) = bounded(limit, fetch)
        .await
        .map_err(|e| describe_pg_error(&target.scrub(&e)))?;
    let row = |k: &str, v: String| (k.to_string(), v);
    let s = match now {
        None => {
            return Ok(vec![row(
                "Session now",
                format!(
                    "Ended: there is no process {} any more, so nothing would be signalled.",
                    b.pid
                ),
            )]);
        }
        Some(s) if s.backend_start.is_none() => {
            return Ok(vec![row(
                "Session now",
                format!(
                    "dbops' role on {} cannot see this session (it needs pg_read_all_stats): \
                     it cannot show what process {} runs, nor make sure it is the same session.",
                    target.name(),
                    b.pid
                ),
            )]);
        }
        Some(s) if s.backend_start != Some(b.backend_start) => {
            return Ok(vec![row(
                "Session now",
                format!(
                    "Ended: process {} is now a different session (started {}, not {}), so \
                     nothing would be signalled.",
                    b.pid,
                    s.started(),
                    fmt::time(&b.backend_start)
                ),
            )]);
        }
        Some(s) => s,
    };
    let or = |v: String, none: &str| if v.is_empty() { none.to_string() } else { v };
    let pids = |list: &[i32]| {
        list.iter()
            .map(i32::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = vec![row(
        "Session now",
        format!(
            "{}{} (process {}, connected since {})",
            s.state(),
            match s.in_state_for().as_str() {
                "" => String::new(),
                d => format!(" for {d}"),
            },
            s.pid,
            s.started()
        ),
    )];
    out.push(row("Query", or(cut_query(s.query_text()), "(none)")));
    out.push(row(
        "Application",
        or(s.application().to_string(), "(none set)"),
    ));
    out.push(row("Client", or(s.client(), "(not shown)")));
    out.push(row("User", s.user().to_string()));
    out.push(row("Database", s.database().to_string()));
    out.push(row(
        if s.is_active() {
            "Query running for"
        } else {
            "Last query started"
        },
        match (s.is_active(), s.running_for()) {
            (_, d) if d.is_empty() => "—".to_string(),
            (true, d) => d,
            (false, d) => format!("{d} ago"),
        },
    ));
    out.push(row(
        "Transaction open for",
        or(s.xact_age(), "(no open transaction)"),
    ));
    out.push(row("Waiting on", or(s.wait(), "nothing")));
    let total = blocked.first().map(|r| r.3).unwrap_or(0);
    let mut blocks: Vec<String> = blocked
        .iter()
        .map(|(pid, app, secs, _)| {
            let mut about = Vec::new();
            if let Some(a) = app.as_deref().filter(|a| !a.is_empty()) {
                about.push(a.to_string());
            }
            if let Some(w) = secs {
                about.push(format!("waiting {}", super::human_secs(*w)));
            }
            if about.is_empty() {
                pid.to_string()
            } else {
                format!("{pid} ({})", about.join(", "))
            }
        })
        .collect();
    if total > blocked.len() as i64 {
        blocks.push(format!("and {} more", total - blocked.len() as i64));
    }
    out.push(row(
        "Blocks",
        if blocks.is_empty() {
            "no other session".to_string()
        } else {
            format!(
                "{} session{} waiting for its locks: {}",
                total,
                if total == 1 { "" } else { "s" },
                blocks.join(", ")
            )
        },
    ));
    out.push(row(
        "Blocked by",
        if s.blocked_by.is_empty() {
            "no other session".to_string()
        } else {
            pids(&s.blocked_by)
        },
    ));
    Ok(out)
}

/// The query on one line, cut to [`DETAILS_QUERY`] characters with its full
/// length said.
fn cut_query(q: &str) -> String {
    let one_line = q.split_whitespace().collect::<Vec<_>>().join(" ");
    let n = one_line.chars().count();
    if n > DETAILS_QUERY {
        let cut: String = one_line.chars().take(DETAILS_QUERY).collect();
        format!(
            "{}… ({} characters in all)",
            cut.trim_end(),
            fmt::count(n as i64)
        )
    } else {
        one_line
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

    const START: &str = "2026-11-21T10:37:54.123456Z";

    #[test]
    fn a_pid_must_be_a_positive_whole_number() {
        for bad in ["", "abc", "0", "-5", "4.2", "99999999999"] {
            let err =
                BackendRef::parse(&form(&[("pid", bad), ("backend_start", START)])).unwrap_err();
            assert!(err.contains("pid"), "{bad}: {err}");
        }
        let err = BackendRef::parse(&form(&[("backend_start", START)])).unwrap_err();
        assert!(err.contains("pid"), "{err}");
    }

    #[test]
    fn the_start_time_must_be_a_timestamp() {
        for bad in [
            "",
            "yesterday",
            "2026-13-01T00:00:00Z",
            "2026-11-21",
            "1700000000",
        ] {
            let err =
                BackendRef::parse(&form(&[("pid", "42"), ("backend_start", bad)])).unwrap_err();
            assert!(err.contains("backend_start"), "{bad}: {err}");
        }
    }

    #[test]
    fn parameters_become_canonical_json_in_utc_with_microseconds() {
        let a = BackendSignal(Signal::Terminate);
        let p = a
            .parse(&form(&[
                ("pid", " 4242 "),
                ("backend_start", "2026-11-21T11:37:54.123456+01:00"),
                ("reason", "ignored here"),
                ("csrf_token", "ignored too"),
            ]))
            .unwrap();
        assert_eq!(p, json!({"pid": 4242, "backend_start": START}));
        // psql's text form means the same instant.
        let q = a
            .parse(&form(&[
                ("pid", "4242"),
                ("backend_start", "2026-11-21 10:37:54.123456+00"),
            ]))
            .unwrap();
        assert_eq!(p, q);
        // Parsing the canonical form again gives the same thing.
        assert_eq!(BackendRef::from_params(&p).unwrap().to_params(), p);
    }

    #[test]
    fn names_shown_to_the_approver_are_checked_and_kept() {
        let ok = BackendRef::parse(&form(&[
            ("pid", "7"),
            ("backend_start", START),
            ("usename", "app"),
            ("datname", "shop"),
        ]))
        .unwrap();
        assert_eq!(
            ok.to_params(),
            json!({"pid": 7, "backend_start": START, "usename": "app", "datname": "shop"})
        );
        let long = "x".repeat(64);
        let err = BackendRef::parse(&form(&[
            ("pid", "7"),
            ("backend_start", START),
            ("usename", &long),
        ]))
        .unwrap_err();
        assert!(err.contains("usename"), "{err}");
    }

    #[test]
    fn the_description_gives_the_exact_statement_and_what_it_affects() {
        let p = json!({"pid": 4242, "backend_start": START, "usename": "app", "datname": "shop"});
        let t = BackendSignal(Signal::Terminate).describe(&p);
        assert!(
            t.starts_with("SELECT pg_terminate_backend(4242) — ends session 4242 (user app, database shop, started 2026-11-21 10:37:54 UTC)"),
            "{t}"
        );
        assert!(t.contains("rolled back"), "{t}");
        let c = BackendSignal(Signal::Cancel).describe(&p);
        assert!(c.starts_with("SELECT pg_cancel_backend(4242)"), "{c}");
        assert!(c.contains("stays connected"), "{c}");
    }

    #[test]
    fn the_query_shown_to_the_approver_is_one_line_and_cut_with_its_length() {
        assert_eq!(cut_query("SELECT 1\n  FROM t"), "SELECT 1 FROM t");
        let long = format!("SELECT {}", "x, ".repeat(400));
        let shown = cut_query(&long);
        assert!(shown.ends_with("… (1,206 characters in all)"), "{shown}");
        assert!(shown.chars().count() < DETAILS_QUERY + 40);
    }

    #[test]
    fn cancel_is_disruptive_and_terminate_destructive() {
        assert_eq!(
            BackendSignal(Signal::Cancel).severity(),
            Severity::Disruptive
        );
        assert_eq!(
            BackendSignal(Signal::Terminate).severity(),
            Severity::Destructive
        );
        assert_eq!(BackendSignal(Signal::Cancel).title(), "Cancel a query");
        assert_eq!(
            BackendSignal(Signal::Terminate).title(),
            "Terminate a session"
        );
    }
}
