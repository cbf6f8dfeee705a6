//! Cancelling a query and terminating a session: the two gated actions of the
//! activity page (`pg.backend.cancel`, `pg.backend.terminate`).
//!
//! A process id alone is not a safe handle: once a session ends, the server may
//! give its pid to a new one. So the parameters are the pid *and* the session's
//! `backend_start`, and the executor signals the process only if a session with
//! both still exists, in one statement.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use futures::{FutureExt, future::BoxFuture};
use serde_json::{Map, Value, json};

use crate::{
    approvals::{Action, ExecCtx, Severity},
    config::TargetKind,
    targets::{bounded, postgres::describe_pg_error},
    web::fmt,
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
