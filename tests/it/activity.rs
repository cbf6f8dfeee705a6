//! The PostgreSQL activity page against the real server: a long-running query
//! started here shows up and is terminated through an approval; a blocked query
//! shows under the session blocking it; the executor never signals a reused pid;
//! only operators see the page; a down target gets a message, not an error page.
//!
//! Every connection a test starts is terminated at the end, pass or fail, and the
//! throwaway databases are dropped.

use std::{
    collections::BTreeMap,
    panic::AssertUnwindSafe,
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use dbops::{
    approvals::{self, Decision, ExecCtx},
    audit::AuditCtx,
    auth::{CurrentUser, Role},
};
use fantoccini::Locator;
use futures::FutureExt;
use reqwest::StatusCode;
use serde_json::json;
use sqlx::{ConnectOptions, Connection, PgConnection, postgres::PgConnectOptions};
use tokio::task::JoinHandle;

use crate::{
    browser::{open_browser, screenshot, start_driver},
    helpers::{Browser, TestApp, services, spawn_app, spawn_app_with},
};

/// `spawn_app`'s targets, with a 1 s long-running threshold and a 1 s refresh.
const CONFIG: &str = r#"
    [targets]
    connect_timeout_seconds = 2
    [activity]
    long_running_seconds = 1
    refresh_seconds = 1
    [[postgres]]
    name = "pg"
    url_env = "PG"
    policy = "production"
    [[redis]]
    name = "cache"
    url_env = "REDIS"
    policy = "dev"
"#;

async fn env() -> Vec<(&'static str, String)> {
    let s = services().await;
    vec![
        ("PG", format!("{}/postgres", s.pg_base)),
        ("REDIS", s.redis_url.clone()),
    ]
}

async fn spawn() -> TestApp {
    spawn_app_with(CONFIG, &env().await).await
}

/// The connections and databases a test made, removed at the end whatever happens.
#[derive(Clone, Default)]
struct Cleanup {
    pids: Arc<Mutex<Vec<i32>>>,
    databases: Arc<Mutex<Vec<String>>>,
    roles: Arc<Mutex<Vec<String>>>,
}

impl Cleanup {
    fn pid(&self, pid: i32) {
        self.pids.lock().unwrap().push(pid);
    }

    fn database(&self, name: &str) {
        self.databases.lock().unwrap().push(name.to_string());
    }

    fn role(&self, name: &str) {
        self.roles.lock().unwrap().push(name.to_string());
    }

    async fn run(&self) {
        let base = &services().await.pg_base;
        let Ok(mut admin) = PgConnection::connect(&format!("{base}/postgres")).await else {
            eprintln!("cleanup: cannot connect to {base}");
            return;
        };
        let pids = self.pids.lock().unwrap().clone();
        let _ = sqlx::query("SELECT pg_terminate_backend(p) FROM unnest($1::int[]) AS p")
            .bind(&pids)
            .execute(&mut admin)
            .await;
        let dbs = self.databases.lock().unwrap().clone();
        for db in dbs {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
                .execute(&mut admin)
                .await;
        }
        let roles = self.roles.lock().unwrap().clone();
        for role in roles {
            let _ = sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
            )
            .bind(&role)
            .execute(&mut admin)
            .await;
            let _ = sqlx::query(&format!("DROP ROLE IF EXISTS \"{role}\""))
                .execute(&mut admin)
                .await;
        }
    }
}

/// Runs `body`, then the cleanup, then fails if the body did.
async fn cleaning_up(cleanup: &Cleanup, body: impl Future<Output = ()>) {
    let outcome = AssertUnwindSafe(body).catch_unwind().await;
    cleanup.run().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn connect(database: &str) -> PgConnection {
    let base = &services().await.pg_base;
    let opts: PgConnectOptions = format!("{base}/{database}").parse().unwrap();
    opts.application_name("dbops-it-activity")
        .connect()
        .await
        .expect("a test connection")
}

async fn backend_pid(conn: &mut PgConnection) -> i32 {
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(conn)
        .await
        .unwrap()
}

/// A session running `SELECT pg_sleep(600)` with a marker comment; the task ends
/// (with an error) when the session is cancelled or terminated.
struct Sleeper {
    pid: i32,
    task: JoinHandle<Result<(), sqlx::Error>>,
}

async fn start_sleeper(cleanup: &Cleanup, marker: &str, padding: usize) -> Sleeper {
    let mut conn = connect("postgres").await;
    let pid = backend_pid(&mut conn).await;
    cleanup.pid(pid);
    // Padding makes the text long enough to be cut on the page.
    let sql = format!(
        "/* {marker} {} */ SELECT pg_sleep(600)",
        "lorem ipsum ".repeat(padding)
    );
    let task = tokio::spawn(async move {
        sqlx::query(&sql).execute(&mut conn).await?;
        Ok(())
    });
    Sleeper { pid, task }
}

/// A session's current `backend_start`, asked from the server directly.
async fn backend_start(pid: i32) -> Option<DateTime<Utc>> {
    let mut c = connect("postgres").await;
    sqlx::query_scalar("SELECT backend_start FROM pg_stat_activity WHERE pid = $1")
        .bind(pid)
        .fetch_optional(&mut c)
        .await
        .unwrap()
        .flatten()
}

fn marker() -> String {
    format!("dbops-test-{}", uuid::Uuid::new_v4().simple())
}

fn sel(css: &str) -> scraper::Selector {
    scraper::Selector::parse(css).unwrap()
}

fn text_of(doc: &scraper::Html, css: &str) -> Option<String> {
    doc.select(&sel(css))
        .next()
        .map(|e| e.text().collect::<Vec<_>>().join(" "))
}

fn attr_of(doc: &scraper::Html, css: &str, attr: &str) -> Option<String> {
    doc.select(&sel(css))
        .next()
        .and_then(|e| e.value().attr(attr).map(str::to_string))
}

/// Loads the page until `ready` holds for it (or 20 s pass).
async fn page_until(
    b: &mut Browser,
    path: &str,
    what: &str,
    ready: impl Fn(&scraper::Html) -> bool,
) -> scraper::Html {
    let mut last = String::new();
    for _ in 0..80 {
        let r = b.get(path).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text);
        let doc = scraper::Html::parse_document(&r.text);
        if ready(&doc) {
            return doc;
        }
        last = r.text;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("{path} never showed {what}; last page:\n{last}");
}

/// The form fields in a link's query string.
fn query_pairs(href: &str) -> (String, Vec<(String, String)>) {
    let url = url::Url::parse(&format!("http://x{href}")).unwrap();
    let pairs = url
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    (url.path().to_string(), pairs)
}

async fn ops_for(app: &TestApp, approval: i64) -> Vec<(String, String)> {
    sqlx::query_as("SELECT kind, outcome FROM operations WHERE approval_id = $1 ORDER BY id")
        .bind(approval)
        .fetch_all(&app.db)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_long_running_query_is_listed_and_terminated_through_an_approval() {
    let app = spawn().await;
    let cleanup = Cleanup::default();
    cleaning_up(&cleanup, async {
        let mut operator = app.logged_in(Role::Operator).await;
        let mut approver = app.logged_in(Role::Approver).await;
        let marker = marker();
        let sleeper = start_sleeper(&cleanup, &marker, 0).await;
        let pid = sleeper.pid;
        let row = format!("table.long-running tr[data-pid=\"{pid}\"]");

        let doc = page_until(&mut operator, "/targets/pg/activity", "the sleeper", |d| {
            text_of(d, &row).is_some_and(|t| t.contains(&marker))
        })
        .await;
        let text = text_of(&doc, &row).unwrap();
        assert!(text.contains("pg_sleep(600)"), "{text}");
        assert!(
            text.contains("postgres") && text.contains("dbops-it-activity"),
            "{text}"
        );
        let cancel = attr_of(&doc, &format!("{row} a.signal.cancel"), "href").unwrap();
        let terminate = attr_of(&doc, &format!("{row} a.signal.terminate"), "href").unwrap();
        assert!(
            cancel.starts_with("/targets/pg/actions/pg.backend.cancel?"),
            "{cancel}"
        );
        let (path, pairs) = query_pairs(&terminate);
        assert_eq!(path, "/targets/pg/actions/pg.backend.terminate");
        let field = |k: &str| {
            pairs
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        assert_eq!(field("pid"), pid.to_string());
        let start = DateTime::parse_from_rfc3339(&field("backend_start"))
            .expect("the link carries the start time as RFC 3339")
            .with_timezone(&Utc);
        assert_eq!(Some(start), backend_start(pid).await, "to the microsecond");

        // The request form, then the request (pending: the target is production).
        let form = operator.get(&terminate).await;
        assert_eq!(form.status, StatusCode::OK, "{}", form.text);
        assert!(
            form.text.contains(&format!("pg_terminate_backend({pid})")),
            "the form says what will run"
        );
        let mut fields: Vec<(&str, &str)> = pairs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        fields.push(("reason", "a runaway test query"));
        let made = operator.post(&path, &fields).await;
        assert_eq!(made.status, StatusCode::SEE_OTHER, "{}", made.text);
        let location = made.location().unwrap().to_string();
        let id: i64 = location
            .strip_prefix("/approvals/")
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("redirected to {location}"));
        let state: String = sqlx::query_scalar("SELECT state FROM approval_requests WHERE id = $1")
            .bind(id)
            .fetch_one(&app.db)
            .await
            .unwrap();
        assert_eq!(state, "pending");
        assert!(!sleeper.task.is_finished(), "nothing runs before approval");

        approver.get(&location).await;
        let approved = approver
            .post(&format!("{location}/approve"), &[("comment", "go ahead")])
            .await;
        assert_eq!(approved.status, StatusCode::SEE_OTHER, "{}", approved.text);

        operator.get(&location).await;
        let ran = operator.post(&format!("{location}/execute"), &[]).await;
        assert_eq!(ran.status, StatusCode::SEE_OTHER, "{}", ran.text);
        assert_eq!(ran.location(), Some(location.as_str()));

        let ended = tokio::time::timeout(Duration::from_secs(10), sleeper.task)
            .await
            .expect("the sleeping session ends")
            .unwrap();
        let err = ended.expect_err("its query was cut off").to_string();
        assert!(err.contains("terminat"), "{err}");

        page_until(
            &mut operator,
            "/targets/pg/activity",
            "the sleeper gone",
            |d| {
                d.select(&sel(&format!("tr[data-pid=\"{pid}\"]")))
                    .next()
                    .is_none()
                    && !d.html().contains(&marker)
            },
        )
        .await;

        let (state, result): (String, Option<serde_json::Value>) =
            sqlx::query_as("SELECT state, result FROM approval_requests WHERE id = $1")
                .bind(id)
                .fetch_one(&app.db)
                .await
                .unwrap();
        assert_eq!(state, "executed");
        assert_eq!(result, Some(json!({"signalled": true, "pid": pid})));
        let ops = ops_for(&app, id).await;
        for kind in [
            "approval.requested",
            "approval.approved",
            "pg.backend.terminate",
        ] {
            assert!(
                ops.contains(&(kind.to_string(), "succeeded".to_string())),
                "{kind} is logged with approval {id}: {ops:?}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn a_blocked_query_is_shown_under_the_session_that_blocks_it() {
    let app = spawn().await;
    let cleanup = Cleanup::default();
    cleaning_up(&cleanup, async {
        let db = format!("dbops_it_activity_{}", uuid::Uuid::new_v4().simple());
        let mut admin = connect("postgres").await;
        sqlx::query(&format!("CREATE DATABASE \"{db}\""))
            .execute(&mut admin)
            .await
            .unwrap();
        cleanup.database(&db);

        let mut holder = connect(&db).await;
        let holder_pid = backend_pid(&mut holder).await;
        cleanup.pid(holder_pid);
        sqlx::raw_sql(
            "CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL);
             INSERT INTO t VALUES (1, 0);",
        )
        .execute(&mut holder)
        .await
        .unwrap();
        sqlx::raw_sql("BEGIN; UPDATE t SET v = v + 1 WHERE id = 1;")
            .execute(&mut holder)
            .await
            .unwrap();

        let mut waiter = connect(&db).await;
        let waiter_pid = backend_pid(&mut waiter).await;
        cleanup.pid(waiter_pid);
        let waiting = tokio::spawn(async move {
            sqlx::query("UPDATE t SET v = v + 2 WHERE id = 1")
                .execute(&mut waiter)
                .await
                .map(|_| ())
        });

        let mut b = app.logged_in(Role::Operator).await;
        let blocker = format!("table.blocking tr[data-pid=\"{holder_pid}\"]");
        let blocked =
            format!("table.blocking tr[data-pid=\"{waiter_pid}\"][data-parent=\"{holder_pid}\"]");
        let doc = page_until(&mut b, "/targets/pg/activity", "the blocking pair", |d| {
            d.select(&sel(&blocked)).next().is_some()
        })
        .await;
        assert_eq!(
            attr_of(&doc, &blocker, "data-depth").as_deref(),
            Some("0"),
            "the lock holder is a root"
        );
        let root = text_of(&doc, &blocker).unwrap();
        assert!(
            root.contains("idle in transaction") && root.contains(&db),
            "{root}"
        );
        assert!(
            doc.select(&sel(&format!("{blocker} a.signal.cancel")))
                .next()
                .is_none(),
            "cancelling an idle session does nothing, so it is not offered"
        );
        assert!(
            doc.select(&sel(&format!("{blocker} a.signal.terminate")))
                .next()
                .is_some()
        );
        let victim = text_of(&doc, &blocked).unwrap();
        assert!(
            victim.contains("UPDATE t SET v = v + 2") && victim.contains("Lock"),
            "{victim}"
        );
        assert_eq!(attr_of(&doc, &blocked, "data-depth").as_deref(), Some("1"));
        assert!(
            doc.select(&sel(&format!("{blocked} a.signal.cancel")))
                .next()
                .is_some()
        );
        // The holder is also listed as idle in a transaction.
        assert!(
            doc.select(&sel(&format!(
                "table.idle-in-transaction tr[data-pid=\"{holder_pid}\"]"
            )))
            .next()
            .is_some()
        );
        let counts = text_of(&doc, "table.counts-table[data-group=\"Database\"]").unwrap();
        assert!(counts.contains(&db), "{counts}");

        // The partial the open page refreshes itself with: the tables, no layout.
        let live = b.get("/targets/pg/activity/live").await;
        assert_eq!(live.status, StatusCode::OK);
        assert!(!live.text.contains("<html") && !live.text.contains("<nav"));
        let frag = scraper::Html::parse_fragment(&live.text);
        assert!(
            frag.select(&sel(&blocked)).next().is_some(),
            "{}",
            live.text
        );

        // Releasing the lock lets the waiter through.
        sqlx::raw_sql("ROLLBACK")
            .execute(&mut holder)
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the waiter goes on once the lock is released")
            .unwrap()
            .unwrap();
        page_until(&mut b, "/targets/pg/activity", "no blocking", |d| {
            d.select(&sel(&blocker)).next().is_none()
        })
        .await;
    })
    .await;
}

/// The facts an approval request's page shows (`Action::details`), label → text.
fn details_of(doc: &scraper::Html) -> BTreeMap<String, String> {
    let texts = |css: &str| {
        doc.select(&sel(css))
            .map(|e| e.text().collect::<String>().trim().to_string())
            .collect::<Vec<_>>()
    };
    texts("dl.details dt")
        .into_iter()
        .zip(texts("dl.details dd"))
        .collect()
}

#[tokio::test]
async fn a_terminate_request_shows_the_approver_the_query_the_application_and_what_it_blocks() {
    let app = spawn().await;
    let cleanup = Cleanup::default();
    cleaning_up(&cleanup, async {
        let db = format!("dbops_it_activity_{}", uuid::Uuid::new_v4().simple());
        let mut admin = connect("postgres").await;
        sqlx::query(&format!("CREATE DATABASE \"{db}\""))
            .execute(&mut admin)
            .await
            .unwrap();
        cleanup.database(&db);

        // A worker holds a row lock in an open transaction; another session waits.
        let mark = marker();
        let mut holder = connect(&db).await;
        let holder_pid = backend_pid(&mut holder).await;
        cleanup.pid(holder_pid);
        sqlx::raw_sql(
            "SET application_name = 'checkout-worker';
             CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL);
             INSERT INTO t VALUES (1, 0);",
        )
        .execute(&mut holder)
        .await
        .unwrap();
        sqlx::raw_sql(&format!(
            "BEGIN; UPDATE t SET v = v + 1 WHERE id = 1 /* {mark} */;"
        ))
        .execute(&mut holder)
        .await
        .unwrap();
        let mut waiter = connect(&db).await;
        let waiter_pid = backend_pid(&mut waiter).await;
        cleanup.pid(waiter_pid);
        let _waiting = tokio::spawn(async move {
            sqlx::query("UPDATE t SET v = v + 2 WHERE id = 1")
                .execute(&mut waiter)
                .await
                .map(|_| ())
        });

        let started = backend_start(holder_pid)
            .await
            .expect("the holder is in pg_stat_activity")
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let mut b = app.logged_in(Role::Operator).await;
        let r = b
            .post(
                "/targets/pg/actions/pg.backend.terminate",
                &[
                    ("pid", &holder_pid.to_string()),
                    ("backend_start", &started),
                    ("reason", "it blocks checkout"),
                ],
            )
            .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text);
        let request = r.location().unwrap().to_string();
        let waiter_text = waiter_pid.to_string();
        let doc = page_until(&mut b, &request, "the blocked session", |d| {
            details_of(d)
                .get("Blocks")
                .is_some_and(|t| t.contains(&waiter_text))
        })
        .await;
        let facts = details_of(&doc);
        let fact = |k: &str| facts.get(k).cloned().unwrap_or_default();
        assert!(
            fact("Query").contains("UPDATE t SET v = v + 1 WHERE id = 1")
                && fact("Query").contains(&mark),
            "{facts:?}"
        );
        assert_eq!(fact("Application"), "checkout-worker", "{facts:?}");
        assert!(
            fact("Session now").starts_with("idle in transaction"),
            "{facts:?}"
        );
        assert_eq!(fact("Database"), db, "{facts:?}");
        assert_eq!(fact("User"), "postgres", "{facts:?}");
        assert!(fact("Client").contains(':'), "address and port: {facts:?}");
        assert!(fact("Transaction open for").ends_with(" s"), "{facts:?}");
        assert!(
            fact("Blocks").starts_with("1 session waiting for its locks")
                && fact("Blocks").contains("dbops-it-activity"),
            "{facts:?}"
        );
        assert_eq!(fact("Blocked by"), "no other session", "{facts:?}");

        // The waiter's cancel request says who blocks it.
        let wstart = backend_start(waiter_pid)
            .await
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let r = b
            .post(
                "/targets/pg/actions/pg.backend.cancel",
                &[
                    ("pid", &waiter_text),
                    ("backend_start", &wstart),
                    ("reason", "stuck"),
                ],
            )
            .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text);
        let page = b.get(r.location().unwrap()).await;
        let facts = details_of(&scraper::Html::parse_document(&page.text));
        assert_eq!(
            facts.get("Blocked by"),
            Some(&holder_pid.to_string()),
            "{facts:?}"
        );
        assert!(
            facts
                .get("Waiting on")
                .is_some_and(|w| w.starts_with("Lock")),
            "{facts:?}"
        );

        // Once the session is gone, the page says so.
        sqlx::query("SELECT pg_terminate_backend($1)")
            .bind(holder_pid)
            .execute(&mut admin)
            .await
            .unwrap();
        let holder_text = holder_pid.to_string();
        page_until(&mut b, &request, "that the session ended", |d| {
            details_of(d).get("Session now").is_some_and(|t| {
                t.starts_with("Ended: there is no process") && t.contains(&holder_text)
            })
        })
        .await;
    })
    .await;
}

#[tokio::test]
async fn the_executor_signals_only_the_exact_session_and_never_a_reused_pid() {
    let app = spawn().await;
    let state = app.state();
    let cleanup = Cleanup::default();
    cleaning_up(&cleanup, async {
        let sleeper = start_sleeper(&cleanup, &marker(), 0).await;
        let pid = sleeper.pid;
        let mut started = None;
        for _ in 0..40 {
            started = backend_start(pid).await;
            if started.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let started = started.expect("the sleeper is in pg_stat_activity");

        // Users for the approvals API.
        let user = |name: &str, role: Role| {
            let name = name.to_string();
            let app = &app;
            async move {
                app.create_user(&name, role).await;
                let id: i64 = sqlx::query_scalar("SELECT id FROM users WHERE username = $1")
                    .bind(&name)
                    .fetch_one(&app.db)
                    .await
                    .unwrap();
                CurrentUser {
                    id,
                    username: name,
                    role,
                    csrf_token: String::new(),
                }
            }
        };
        let op = user("olga", Role::Operator).await;
        let ap = user("amir", Role::Approver).await;

        // The same pid, but the session that started an hour earlier: the one that
        // was asked about is gone and the pid was reused.
        let stale = (started - chrono::Duration::hours(1))
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let form: BTreeMap<String, String> = [
            ("pid".to_string(), pid.to_string()),
            ("backend_start".to_string(), stale),
        ]
        .into();
        let ctx = AuditCtx::system();
        let req = approvals::request(
            &state,
            &ctx.with_user(&op),
            &op,
            "pg",
            "pg.backend.terminate",
            &form,
            "stop it",
        )
        .await
        .unwrap();
        assert_eq!(req.state, "pending");
        approvals::decide(
            &state,
            &ctx.with_user(&ap),
            &ap,
            req.id,
            Decision::Approve,
            "",
        )
        .await
        .unwrap();
        let done = approvals::execute(&state, &ctx.with_user(&op), &op, req.id)
            .await
            .unwrap();
        assert_eq!(done.state, "failed");
        let error = done.error.unwrap_or_default();
        assert!(
            error.contains("already ended")
                && error.contains("different session")
                && error.contains("Nothing was signalled"),
            "{error}"
        );
        assert_eq!(
            ops_for(&app, req.id).await.last(),
            Some(&("pg.backend.terminate".to_string(), "failed".to_string()))
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!sleeper.task.is_finished(), "the session was not signalled");
        assert_eq!(backend_start(pid).await, Some(started), "it is still there");

        // A pid no session has.
        let target = state.targets.get("pg").unwrap();
        let cancel = state.actions.get("pg.backend.cancel").unwrap();
        let gone = json!({"pid": 2_147_483_000, "backend_start": "2026-01-01T00:00:00.000000Z"});
        let err = cancel
            .execute(
                ExecCtx {
                    state: state.clone(),
                    target: target.clone(),
                    audit: dbops::audit::AuditCtx::system(),
                    approval: 0,
                    operation: 0,
                },
                &gone,
            )
            .await
            .unwrap_err();
        assert!(err.contains("there is no process 2147483000"), "{err}");

        // With the right start time, cancel stops the statement (the session
        // stays).
        let exact = json!({
            "pid": pid,
            "backend_start": started.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        });
        let ok = cancel
            .execute(
                ExecCtx {
                    state: state.clone(),
                    target,
                    audit: dbops::audit::AuditCtx::system(),
                    approval: 0,
                    operation: 0,
                },
                &exact,
            )
            .await
            .unwrap();
        assert_eq!(ok, json!({"signalled": true, "pid": pid}));
        let ended = tokio::time::timeout(Duration::from_secs(10), sleeper.task)
            .await
            .expect("the statement is cancelled")
            .unwrap();
        let err = ended.expect_err("cancelled").to_string();
        assert!(err.contains("canceling statement"), "{err}");
    })
    .await;
}

#[tokio::test]
async fn only_operators_and_up_see_the_activity_page_and_only_for_postgres_targets() {
    let app = spawn_app().await;
    let mut viewer = app.logged_in(Role::Viewer).await;
    assert_eq!(
        viewer.get("/targets/pg/activity").await.status,
        StatusCode::FORBIDDEN
    );
    let overview = viewer.get("/").await.text;
    assert!(
        !overview.contains("/targets/pg/activity"),
        "no link a viewer cannot follow"
    );

    let mut op = app.logged_in(Role::Operator).await;
    let overview = op.get("/").await.text;
    assert!(overview.contains("href=\"/targets/pg/activity\""));
    assert!(!overview.contains("/targets/cache/activity"));

    let page = op.get("/targets/pg/activity").await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.text);
    let doc = scraper::Html::parse_document(&page.text);
    assert_eq!(
        attr_of(&doc, "#activity", "hx-get").as_deref(),
        Some("/targets/pg/activity/live")
    );
    assert_eq!(
        attr_of(&doc, "#activity", "hx-trigger").as_deref(),
        Some("every 5s"),
        "the default refresh"
    );
    assert_eq!(
        attr_of(&doc, "#activity", "hx-swap").as_deref(),
        Some("innerHTML")
    );
    // (Other tests share the server, so there may or may not be long queries.)
    let long = text_of(&doc, "section.long-running-section").unwrap();
    assert!(
        long.contains("for 60 s or more"),
        "the default threshold: {long}"
    );
    assert!(
        !page.text.contains("class=\"notice\""),
        "the test server's role is a superuser: no privilege warning"
    );

    let paused = op.get("/targets/pg/activity?refresh=off").await;
    let doc = scraper::Html::parse_document(&paused.text);
    assert!(attr_of(&doc, "#activity", "hx-trigger").is_none());
    assert!(paused.text.contains("Refreshing is paused"));

    assert_eq!(
        op.get("/targets/nope/activity").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        op.get("/targets/nope/activity/live").await.status,
        StatusCode::NOT_FOUND
    );
    let redis = op.get("/targets/cache/activity").await;
    assert_eq!(redis.status, StatusCode::BAD_REQUEST);
    assert!(redis.text.contains("Redis"), "{}", redis.text);
}

#[tokio::test]
async fn a_down_target_gets_a_clear_message_and_the_page_still_renders() {
    let app = spawn_app_with(
        r#"
        [targets]
        connect_timeout_seconds = 1
        [[postgres]]
        name = "refused"
        url_env = "REFUSED"
        policy = "staging"
        "#,
        &[(
            "REFUSED",
            "postgres://app:Sup3r-S3cret@127.0.0.1:1/app".into(),
        )],
    )
    .await;
    let mut b = app.logged_in(Role::Operator).await;
    for path in [
        "/targets/refused/activity",
        "/targets/refused/activity/live",
    ] {
        let page = b.get(path).await;
        assert_eq!(page.status, StatusCode::OK, "{path}: {}", page.text);
        let doc = scraper::Html::parse_document(&page.text);
        let alert = text_of(&doc, "[role=alert]").unwrap_or_default();
        assert!(
            alert.contains("Cannot read the sessions of refused") && alert.contains("refused"),
            "{alert}"
        );
        assert!(!page.text.contains("Sup3r-S3cret"));
    }
}

#[tokio::test]
async fn without_monitoring_privileges_the_page_says_rows_are_hidden_and_signals_will_fail() {
    let cleanup = Cleanup::default();
    cleaning_up(&cleanup, async {
        // A plain login role: no superuser, no pg_read_all_stats, no
        // pg_signal_backend.
        let role = format!(
            "dbops_it_plain_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let mut admin = connect("postgres").await;
        sqlx::query(&format!("CREATE ROLE \"{role}\" LOGIN"))
            .execute(&mut admin)
            .await
            .unwrap();
        cleanup.role(&role);
        let mut url = url::Url::parse(&format!("{}/postgres", services().await.pg_base)).unwrap();
        url.set_username(&role).unwrap();
        url.set_password(None).unwrap();
        let app = spawn_app_with(
            r#"
            [targets]
            connect_timeout_seconds = 2
            [activity]
            long_running_seconds = 1
            [[postgres]]
            name = "plain"
            url_env = "PLAIN"
            policy = "dev"
            "#,
            &[("PLAIN", url.to_string())],
        )
        .await;
        // Someone else's long query.
        let sleeper = start_sleeper(&cleanup, &marker(), 0).await;
        let pid = sleeper.pid;

        let mut b = app.logged_in(Role::Operator).await;
        let doc = page_until(&mut b, "/targets/plain/activity", "a hidden session", |d| {
            text_of(d, ".activity-meta").is_some_and(|t| t.contains("hidden"))
        })
        .await;
        let notes: Vec<String> = doc
            .select(&sel("p.notice"))
            .map(|e| e.text().collect::<String>())
            .collect();
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].contains("rows are hidden") && notes[0].contains("pg_read_all_stats"));
        assert!(
            notes[1].contains("cancel and terminate will fail for other users' sessions")
                && notes[1].contains("pg_signal_backend")
        );
        assert!(
            doc.select(&sel(&format!("tr[data-pid=\"{pid}\"]")))
                .next()
                .is_none(),
            "a session the role cannot see is counted, not listed"
        );
        let states = text_of(&doc, "table.counts-table[data-group=\"State\"]").unwrap();
        assert!(states.contains("hidden"), "{states}");

        // The executor cannot make sure it is the same session, so it does nothing.
        let state = app.state();
        let started = backend_start(pid).await.unwrap();
        let err = state
            .actions
            .get("pg.backend.terminate")
            .unwrap()
            .execute(
                ExecCtx {
                    state: state.clone(),
                    target: state.targets.get("plain").unwrap(),
                    audit: dbops::audit::AuditCtx::system(),
                    approval: 0,
                    operation: 0,
                },
                &json!({
                    "pid": pid,
                    "backend_start": started.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                }),
            )
            .await
            .unwrap_err();
        assert!(
            err.contains("cannot see when process") && err.contains("Nothing was signalled"),
            "{err}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!sleeper.task.is_finished(), "the session was not signalled");
    })
    .await;
}

/// Types into a field of the real browser.
async fn type_into(c: &fantoccini::Client, css: &str, text: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap()
        .send_keys(text)
        .await
        .unwrap();
}

#[tokio::test]
async fn in_a_real_browser_the_activity_page_shows_a_long_query_and_a_blocking_pair_and_refreshes()
{
    let app = spawn().await;
    let cleanup = Cleanup::default();
    cleaning_up(&cleanup, async {
        // A long-running query with long text, and a blocking pair.
        let marker = marker();
        let sleeper = start_sleeper(&cleanup, &marker, 40).await;
        let db = format!("dbops_it_activity_{}", uuid::Uuid::new_v4().simple());
        let mut admin = connect("postgres").await;
        sqlx::query(&format!("CREATE DATABASE \"{db}\""))
            .execute(&mut admin)
            .await
            .unwrap();
        cleanup.database(&db);
        let mut holder = connect(&db).await;
        cleanup.pid(backend_pid(&mut holder).await);
        sqlx::raw_sql(
            "CREATE TABLE orders (id int PRIMARY KEY, status text);
             INSERT INTO orders VALUES (1, 'new');",
        )
        .execute(&mut holder)
        .await
        .unwrap();
        sqlx::raw_sql("BEGIN; UPDATE orders SET status = 'paid' WHERE id = 1;")
            .execute(&mut holder)
            .await
            .unwrap();
        let mut waiter = connect(&db).await;
        let waiter_pid = backend_pid(&mut waiter).await;
        cleanup.pid(waiter_pid);
        let _waiting = tokio::spawn(async move {
            let _ = sqlx::query("UPDATE orders SET status = 'shipped' WHERE id = 1")
                .execute(&mut waiter)
                .await;
        });

        let pw = app.create_user("petra", Role::Operator).await;
        let driver = start_driver().await;
        let c = open_browser(&driver, 1366, 1800).await;
        c.goto(&app.url("/login")).await.unwrap();
        type_into(&c, "input[name=username]", "petra").await;
        type_into(&c, "input[name=password]", &pw).await;
        c.find(Locator::Css("button[type=submit]"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        c.wait()
            .for_element(Locator::Css("table.targets"))
            .await
            .unwrap();
        c.find(Locator::LinkText("Activity →"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        let lr = format!("table.long-running tr[data-pid=\"{}\"]", sleeper.pid);
        let bt = format!("table.blocking tr[data-pid=\"{waiter_pid}\"]");
        c.wait()
            .at_most(Duration::from_secs(20))
            .for_element(Locator::Css(&lr))
            .await
            .unwrap();
        c.wait()
            .at_most(Duration::from_secs(20))
            .for_element(Locator::Css(&bt))
            .await
            .unwrap();

        // Open the whole query text; it stays open when the page refreshes.
        c.find(Locator::Css(&format!("{lr} details summary")))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        let before = c
            .find(Locator::Css(".activity-meta"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let mut refreshed = false;
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let now = c
                .find(Locator::Css(".activity-meta"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            if now != before {
                refreshed = true;
                break;
            }
        }
        assert!(refreshed, "the page refreshed itself (htmx under the CSP)");
        let open: serde_json::Value = c
            .execute(
                &format!("return document.querySelector('{lr} details').open"),
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(open, json!(true), "the open query text stayed open");
        screenshot(&c, "activity-wide").await;

        c.set_window_size(390, 2400).await.unwrap();
        c.refresh().await.unwrap();
        c.wait().for_element(Locator::Css(&bt)).await.unwrap();
        screenshot(&c, "activity-narrow").await;
        c.close().await.unwrap();
    })
    .await;
}
