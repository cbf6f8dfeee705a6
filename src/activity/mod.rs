//! PostgreSQL activity (PRODUCT C7): a snapshot of `pg_stat_activity` for one
//! target — connections by state, database, user and application; long-running
//! queries; sessions idle in a transaction; blocked queries with the blocking tree;
//! and whether the target's role may see and signal other users' sessions.
//!
//! It is also the first capability with gated actions ([`signal`]): cancelling a
//! query and terminating a session go through approvals.
//!
//! The snapshot covers the whole server (`pg_stat_activity` lists every database),
//! leaving out dbops' own connections to the target.
//!
//! Over 600 lines: one snapshot of the sessions (the query, privileges, blocking
//! tree and summary) is read and summarized together; about 125 lines are tests.

pub mod signal;
pub mod tree;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use chrono::{DateTime, SecondsFormat, Utc};

pub use signal::{BackendRef, BackendSignal, Signal};
pub use tree::TreeNode;

use crate::{
    approvals::Action,
    config::Config,
    fmt,
    targets::{Health, Target, bounded, postgres::describe_pg_error},
};

/// The two action kinds of this capability, for [`crate::actions::all`].
pub fn actions() -> Vec<Arc<dyn Action>> {
    vec![
        Arc::new(BackendSignal(Signal::Cancel)),
        Arc::new(BackendSignal(Signal::Terminate)),
    ]
}

/// How long one call to a target may take: getting a connection (the connect
/// timeout) plus running the statement (the statement timeout, also set on the
/// server side for every connection of the pool).
pub fn time_limit(config: &Config) -> Duration {
    config.connect_timeout + config.statement_timeout
}

/// What the snapshot shows at most per list; the rest is counted.
pub const LIST_LIMIT: usize = 200;

/// Lines per group of the connection counts; the rest are summed in one line.
pub const GROUP_LIMIT: usize = 12;

/// Query text longer than this is cut in tables (the whole text is one click away).
pub const SHORT_QUERY: usize = 160;

/// What `pg_stat_activity` shows instead of the query of a session the role may
/// not see.
const HIDDEN_QUERY: &str = "<insufficient privilege>";

/// One session (backend) from `pg_stat_activity`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Session {
    pub pid: i32,
    pub usename: Option<String>,
    pub datname: Option<String>,
    pub application_name: Option<String>,
    pub client_addr: Option<String>,
    pub client_port: Option<i32>,
    pub backend_type: Option<String>,
    pub state: Option<String>,
    pub wait_event_type: Option<String>,
    pub wait_event: Option<String>,
    pub query: Option<String>,
    pub backend_start: Option<DateTime<Utc>>,
    pub query_start: Option<DateTime<Utc>>,
    /// Seconds since the current (or last) statement started.
    pub query_secs: Option<f64>,
    /// Seconds since the transaction started.
    pub xact_secs: Option<f64>,
    /// Seconds since the state last changed (for an idle session: how long idle).
    pub state_secs: Option<f64>,
    /// `pg_blocking_pids(pid)` for sessions waiting on a lock, else empty.
    pub blocked_by: Vec<i32>,
}

impl Session {
    /// True when the role may not see this session's details.
    pub fn hidden(&self) -> bool {
        self.query.as_deref() == Some(HIDDEN_QUERY)
    }

    pub fn user(&self) -> &str {
        self.usename.as_deref().unwrap_or("—")
    }

    pub fn database(&self) -> &str {
        self.datname.as_deref().unwrap_or("—")
    }

    pub fn application(&self) -> &str {
        match self.application_name.as_deref() {
            None | Some("") => "",
            Some(a) => a,
        }
    }

    /// `10.0.0.5:53412`, or `local socket` (pid of a Unix-socket client has no
    /// address; the server reports port -1).
    pub fn client(&self) -> String {
        match (&self.client_addr, self.client_port) {
            (Some(a), Some(p)) if p > 0 => format!("{a}:{p}"),
            (Some(a), _) => a.clone(),
            (None, Some(-1)) => "local socket".into(),
            (None, _) => String::new(),
        }
    }

    pub fn state(&self) -> &str {
        if self.hidden() {
            return "hidden";
        }
        self.state.as_deref().unwrap_or("—")
    }

    pub fn is_active(&self) -> bool {
        self.state.as_deref() == Some("active")
    }

    pub fn is_idle_in_transaction(&self) -> bool {
        self.state
            .as_deref()
            .is_some_and(|s| s.starts_with("idle in transaction"))
    }

    /// `Lock: transactionid`, or empty when not waiting.
    pub fn wait(&self) -> String {
        match (&self.wait_event_type, &self.wait_event) {
            (Some(t), Some(e)) => format!("{t}: {e}"),
            (Some(t), None) => t.clone(),
            _ => String::new(),
        }
    }

    pub fn query_text(&self) -> &str {
        self.query.as_deref().unwrap_or("")
    }

    /// The query on one line, cut to [`SHORT_QUERY`] characters.
    pub fn short_query(&self) -> String {
        let one_line = self
            .query_text()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        if one_line.chars().count() > SHORT_QUERY {
            let cut: String = one_line.chars().take(SHORT_QUERY).collect();
            format!("{}…", cut.trim_end())
        } else {
            one_line
        }
    }

    /// Whether [`Session::short_query`] differs from the whole text (so the page
    /// offers the whole text).
    pub fn query_is_cut(&self) -> bool {
        let q = self.query_text();
        q.chars().count() > SHORT_QUERY || q.contains('\n')
    }

    /// How long the current statement has run (or, when idle, how long ago the
    /// last one started).
    pub fn running_for(&self) -> String {
        self.query_secs.map(human_secs).unwrap_or_default()
    }

    /// How long the transaction has been open.
    pub fn xact_age(&self) -> String {
        self.xact_secs.map(human_secs).unwrap_or_default()
    }

    /// How long the session has been in its state.
    pub fn in_state_for(&self) -> String {
        self.state_secs.map(human_secs).unwrap_or_default()
    }

    /// The session's start time in the form the actions take (UTC, microseconds).
    pub fn backend_start_param(&self) -> Option<String> {
        self.backend_start
            .map(|t| t.to_rfc3339_opts(SecondsFormat::Micros, true))
    }

    pub fn started(&self) -> String {
        self.backend_start
            .as_ref()
            .map(fmt::time)
            .unwrap_or_default()
    }

    /// The request form of action `kind` for this session on `target`, or `None`
    /// when the session's start time is not visible (then it cannot be signalled
    /// safely).
    pub fn action_href(&self, target: &str, kind: &str) -> Option<String> {
        let start = self.backend_start_param()?;
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        q.append_pair("pid", &self.pid.to_string());
        q.append_pair("backend_start", &start);
        if let Some(u) = &self.usename {
            q.append_pair("usename", u);
        }
        if let Some(d) = &self.datname {
            q.append_pair("datname", d);
        }
        Some(format!("/targets/{target}/actions/{kind}?{}", q.finish()))
    }

    pub fn cancel_href(&self, target: &str) -> String {
        self.action_href(target, Signal::Cancel.kind())
            .unwrap_or_default()
    }

    pub fn terminate_href(&self, target: &str) -> String {
        self.action_href(target, Signal::Terminate.kind())
            .unwrap_or_default()
    }

    /// A stable element id for the expandable query text, so that an open one stays
    /// open across refreshes for as long as it is the same statement.
    pub fn query_dom_id(&self, section: &str) -> String {
        let started = self
            .query_start
            .map(|t| t.timestamp_micros())
            .unwrap_or_default();
        format!("q-{section}-{}-{started}", self.pid)
    }
}

/// `42 s`, `3 min 05 s`, `2 h 04 min`, `3 d 7 h`.
pub fn human_secs(secs: f64) -> String {
    let s = secs.max(0.0).floor() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {:02} s", s / 60, s % 60),
        3600..86400 => format!("{} h {:02} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86400, s % 86400 / 3600),
    }
}

/// What the target's role may see and do.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Privileges {
    pub role: String,
    pub superuser: bool,
    /// Superuser or `pg_read_all_stats`: sees other users' queries.
    pub read_all_stats: bool,
    /// Superuser or `pg_signal_backend`: may cancel and terminate other users'
    /// (non-superuser) sessions.
    pub signal_backend: bool,
}

/// A count of sessions with one value of a column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Count {
    pub label: String,
    pub sessions: usize,
}

/// One line of the blocking tree, with the session it is about (`None` when that
/// session is not in the snapshot: dbops' own connection, or one that just ended).
#[derive(Debug, Clone)]
pub struct TreeRow {
    pub node: TreeNode,
    pub session: Option<Session>,
}

impl TreeRow {
    /// The indentation class (deeper levels share the last one).
    pub fn depth_class(&self) -> String {
        format!("depth-{}", self.node.depth.min(6))
    }
}

/// Everything the activity page shows.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub taken_at: DateTime<Utc>,
    pub threshold: Duration,
    pub privileges: Privileges,
    /// Sessions in the snapshot (dbops' own left out).
    pub total: usize,
    /// Of those, the ones whose details the role may not see.
    pub hidden: usize,
    pub by_state: Vec<Count>,
    pub by_database: Vec<Count>,
    pub by_user: Vec<Count>,
    pub by_application: Vec<Count>,
    /// Active statements running for at least the threshold, longest first.
    pub long_running: Vec<Session>,
    pub long_running_total: usize,
    /// Sessions idle inside a transaction, oldest transaction first.
    pub idle_in_transaction: Vec<Session>,
    pub idle_in_transaction_total: usize,
    pub blocking: Vec<TreeRow>,
    /// The tree was too long and is cut.
    pub blocking_cut: bool,
    /// Sessions waiting for a lock another session holds.
    pub blocked: usize,
}

impl Snapshot {
    /// `60 s`, `5 min`, or as [`human_secs`] says it.
    pub fn threshold_text(&self) -> String {
        match self.threshold.as_secs() {
            s if s <= 120 => format!("{s} s"),
            s if s % 60 == 0 && s < 3600 => format!("{} min", s / 60),
            s => human_secs(s as f64),
        }
    }

    pub fn taken_at_text(&self) -> String {
        self.taken_at.format("%H:%M:%S UTC").to_string()
    }

    /// Groups sessions for the summary: `(heading, counts)`.
    pub fn groups(&self) -> [(&'static str, &Vec<Count>); 4] {
        [
            ("State", &self.by_state),
            ("Database", &self.by_database),
            ("User", &self.by_user),
            ("Application", &self.by_application),
        ]
    }
}

/// Sessions of the target except the one running this query and dbops' own:
/// every session of dbops' role named `dbops`, `dbops …`, `dbops-console` or `dbops-archive` (its
/// pool, reports, pg_dump, the WAL archive, the console database's pool when it
/// lives on the same server and role).
///
/// `pg_blocking_pids` takes the lock manager's locks briefly, so it is called only
/// for sessions that wait on a lock (`wait_event_type = 'Lock'`). Rows the role may
/// not see have a NULL `backend_type`; they are kept (and shown as hidden) unless
/// they belong to no user (background processes). Parallel workers are left out:
/// `pg_blocking_pids` reports their leader.
const SESSIONS: &str = "
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
       CASE WHEN wait_event_type = 'Lock' THEN pg_blocking_pids(pid) ELSE '{}'::int[] END AS blocked_by
FROM pg_stat_activity
WHERE pid <> pg_backend_pid()
  AND (backend_type IN ('client backend', 'autovacuum worker')
       OR (backend_type IS NULL AND usesysid IS NOT NULL))
  AND NOT (application_name ~ '^dbops( .*|-console|-archive)?$' AND usename = current_user)
ORDER BY pid";

/// Whether the role may see and signal other users' sessions. `USAGE` (privileges
/// through inheritance) is what the server itself checks for both.
const PRIVILEGES: &str = "
SELECT current_user::text AS role,
       rolsuper AS superuser,
       rolsuper OR pg_has_role(current_user, 'pg_read_all_stats', 'USAGE') AS read_all_stats,
       rolsuper OR pg_has_role(current_user, 'pg_signal_backend', 'USAGE') AS signal_backend
FROM pg_roles WHERE rolname = current_user";

/// Takes the snapshot of `target` (a PostgreSQL target). The error is a sentence
/// for the page, scrubbed of the target's secrets.
#[tracing::instrument(skip_all, fields(target = %target.name()))]
pub async fn snapshot(
    target: &Target,
    limit: Duration,
    long_running: Duration,
) -> Result<Snapshot, String> {
    let pool = target.pg().await?;
    let fetch = async {
        let privileges: Privileges = sqlx::query_as(PRIVILEGES).fetch_one(&pool).await?;
        let sessions: Vec<Session> = sqlx::query_as(SESSIONS).fetch_all(&pool).await?;
        Ok::<_, sqlx::Error>((privileges, sessions))
    };
    match bounded(limit, fetch).await {
        Ok((privileges, sessions)) => Ok(summarize(Utc::now(), privileges, sessions, long_running)),
        Err(e) if e.contains("pool timed out") => {
            // The pool only says it timed out; the status probe tells why.
            Err(match target.pg_status().await {
                Health::Down(reason) => reason,
                Health::Up(_) => describe_pg_error(&target.scrub(&e)),
            })
        }
        Err(e) => Err(describe_pg_error(&target.scrub(&e))),
    }
}

/// Sorts sessions into the snapshot's lists and counts.
pub fn summarize(
    taken_at: DateTime<Utc>,
    privileges: Privileges,
    sessions: Vec<Session>,
    threshold: Duration,
) -> Snapshot {
    let limit = threshold.as_secs_f64();
    let count = |f: &dyn Fn(&Session) -> String| -> Vec<Count> {
        let mut m: BTreeMap<String, usize> = BTreeMap::new();
        for s in &sessions {
            *m.entry(f(s)).or_default() += 1;
        }
        let mut v: Vec<Count> = m
            .into_iter()
            .map(|(label, sessions)| Count { label, sessions })
            .collect();
        // Most sessions first; equal counts by name (the map's order, kept by the
        // stable sort).
        v.sort_by_key(|c| std::cmp::Reverse(c.sessions));
        if v.len() > GROUP_LIMIT {
            let rest = v.split_off(GROUP_LIMIT - 1);
            v.push(Count {
                label: format!("{} others", rest.len()),
                sessions: rest.iter().map(|c| c.sessions).sum(),
            });
        }
        v
    };
    let by_state = count(&|s| s.state().to_string());
    let by_database = count(&|s| s.database().to_string());
    let by_user = count(&|s| s.user().to_string());
    let by_application = count(&|s| match s.application() {
        "" => "(none)".to_string(),
        a => a.to_string(),
    });

    let mut long: Vec<Session> = sessions
        .iter()
        .filter(|s| s.is_active() && s.query_secs.is_some_and(|q| q >= limit))
        .cloned()
        .collect();
    long.sort_by(|a, b| {
        b.query_secs
            .unwrap_or(0.0)
            .total_cmp(&a.query_secs.unwrap_or(0.0))
    });
    let long_running_total = long.len();
    long.truncate(LIST_LIMIT);

    let mut idle: Vec<Session> = sessions
        .iter()
        .filter(|s| s.is_idle_in_transaction())
        .cloned()
        .collect();
    idle.sort_by(|a, b| {
        b.xact_secs
            .unwrap_or(0.0)
            .total_cmp(&a.xact_secs.unwrap_or(0.0))
    });
    let idle_in_transaction_total = idle.len();
    idle.truncate(LIST_LIMIT);

    let waits: Vec<(i32, Vec<i32>)> = sessions
        .iter()
        .filter(|s| !s.blocked_by.is_empty())
        .map(|s| (s.pid, s.blocked_by.clone()))
        .collect();
    let blocked = waits.len();
    let by_pid: BTreeMap<i32, &Session> = sessions.iter().map(|s| (s.pid, s)).collect();
    let nodes = tree::build(&waits);
    let blocking_cut = nodes.len() > LIST_LIMIT * 2;
    let blocking = nodes
        .into_iter()
        .take(LIST_LIMIT * 2)
        .map(|node| TreeRow {
            session: by_pid.get(&node.pid).map(|s| (*s).clone()),
            node,
        })
        .collect();

    Snapshot {
        taken_at,
        threshold,
        privileges,
        total: sessions.len(),
        hidden: sessions.iter().filter(|s| s.hidden()).count(),
        by_state,
        by_database,
        by_user,
        by_application,
        long_running: long,
        long_running_total,
        idle_in_transaction: idle,
        idle_in_transaction_total,
        blocking,
        blocking_cut,
        blocked,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(pid: i32, state: &str, query_secs: f64) -> Session {
        Session {
            pid,
            usename: Some("app".into()),
            datname: Some("shop".into()),
            application_name: Some("psql".into()),
            client_addr: Some("10.0.0.5".into()),
            client_port: Some(53412),
            backend_type: Some("client backend".into()),
            state: Some(state.into()),
            wait_event_type: None,
            wait_event: None,
            query: Some("SELECT 1".into()),
            backend_start: Some(
                DateTime::parse_from_rfc3339("2026-11-21T10:37:54.123456+00:00")
                    .unwrap()
                    .with_timezone(&Utc),
            ),
            query_start: None,
            query_secs: Some(query_secs),
            xact_secs: Some(query_secs),
            state_secs: Some(query_secs),
            blocked_by: vec![],
        }
    }

    fn privileges() -> Privileges {
        Privileges {
            role: "postgres".into(),
            superuser: true,
            read_all_stats: true,
            signal_backend: true,
        }
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human_secs(-1.0), "0 s");
        assert_eq!(human_secs(42.9), "42 s");
        assert_eq!(human_secs(185.0), "3 min 05 s");
        assert_eq!(human_secs(7440.0), "2 h 04 min");
        assert_eq!(human_secs(3.0 * 86400.0 + 7.0 * 3600.0), "3 d 7 h");
    }

    #[test]
    fn sessions_are_sorted_into_lists_and_counted() {
        let mut blocked = session(4, "active", 3.0);
        blocked.blocked_by = vec![3];
        let sessions = vec![
            session(1, "active", 120.0),
            session(2, "active", 5.0),
            session(3, "idle in transaction", 30.0),
            blocked,
            session(5, "idle", 500.0),
            session(6, "active", 61.0),
        ];
        let s = summarize(Utc::now(), privileges(), sessions, Duration::from_secs(60));
        assert_eq!(s.total, 6);
        let pids = |v: &[Session]| v.iter().map(|s| s.pid).collect::<Vec<_>>();
        assert_eq!(pids(&s.long_running), vec![1, 6], "longest first");
        assert_eq!(pids(&s.idle_in_transaction), vec![3]);
        assert_eq!(s.blocked, 1);
        let tree: Vec<(i32, usize)> = s
            .blocking
            .iter()
            .map(|r| (r.node.pid, r.node.depth))
            .collect();
        assert_eq!(tree, vec![(3, 0), (4, 1)]);
        assert_eq!(
            s.by_state[0],
            Count {
                label: "active".into(),
                sessions: 4
            }
        );
        assert_eq!(
            s.by_database,
            vec![Count {
                label: "shop".into(),
                sessions: 6
            }]
        );
    }

    #[test]
    fn a_long_group_ends_with_the_sum_of_the_others() {
        let sessions: Vec<Session> = (0..30)
            .map(|i| {
                let mut s = session(i, "idle", 1.0);
                s.application_name = Some(format!("app{:02}", i % 15));
                s
            })
            .collect();
        let s = summarize(Utc::now(), privileges(), sessions, Duration::from_secs(60));
        assert_eq!(s.by_application.len(), GROUP_LIMIT);
        assert_eq!(
            s.by_application.last().unwrap(),
            &Count {
                label: "4 others".into(),
                sessions: 8
            }
        );
        assert_eq!(
            s.by_application.iter().map(|c| c.sessions).sum::<usize>(),
            30
        );
    }

    #[test]
    fn long_queries_are_cut_on_one_line_and_links_carry_the_encoded_start_time() {
        let mut s = session(4242, "active", 1.0);
        s.query = Some(format!("SELECT\n  {}", "x, ".repeat(100)));
        let short = s.short_query();
        assert!(short.starts_with("SELECT x, x,"), "{short}");
        assert!(short.ends_with('…') && short.chars().count() <= SHORT_QUERY + 1);
        assert!(s.query_is_cut());
        assert_eq!(
            s.terminate_href("pg"),
            "/targets/pg/actions/pg.backend.terminate?pid=4242&backend_start=2026-11-21T10%3A37%3A54.123456Z&usename=app&datname=shop"
        );
        s.backend_start = None;
        assert_eq!(s.cancel_href("pg"), "", "no start time, no action");
    }
}
