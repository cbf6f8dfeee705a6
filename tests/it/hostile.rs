//! Hostile input: markup in every string a person or a target can put on a page,
//! identifiers built to break SQL, paths and ids that point where they should not,
//! redirects to other sites, planted session ids, oversized bodies and fields, and
//! malformed configuration. Each is refused with a clear message (and logged where
//! it is an attempted action) or shown inert.

use std::time::{Duration, Instant};

use dbops::{
    audit::AuditCtx,
    auth::Role,
    backups::run::{self, BackupRequest, Trigger},
};
use reqwest::StatusCode;
use scraper::{Html, Selector};
use sqlx::{Connection, PgConnection};

use crate::{
    approvals::urlencode,
    helpers::{TestApp, services, spawn_app, spawn_app_with, test_config},
};

/// A script element.
const SCRIPT: &str = "<script>alert(1)</script>";
/// Breaks out of a quoted attribute into an element with a handler.
const BREAKOUT: &str = "\"><img src=x onerror=alert(1)>";
/// Quotes of both kinds and an ampersand.
const QUOTES: &str = "it's \"quoted\" & <b>bold</b>";

/// The page shows no markup from the payloads: no script with code, no element
/// with an event handler, none of the payloads' tags raw.
#[track_caller]
fn assert_inert(what: &str, html: &str) {
    for raw in ["<script>alert", "<img src=x", "<b>bold</b>", "<b>idx"] {
        assert!(
            !html.contains(raw),
            "{what}: `{raw}` is in the page as markup:\n{}",
            html.lines()
                .filter(|l| l.contains(raw))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let doc = Html::parse_document(html);
    for el in doc.select(&Selector::parse("*").unwrap()) {
        for (name, value) in el.value().attrs() {
            assert!(
                !name.to_ascii_lowercase().starts_with("on"),
                "{what}: an element has an event handler {name}={value}"
            );
        }
        if el.value().name() == "script" {
            assert!(
                el.text().collect::<String>().trim().is_empty(),
                "{what}: an inline script"
            );
        }
    }
}

/// The page shows `text` (as text, once the markup is read).
#[track_caller]
fn assert_shows(what: &str, html: &str, text: &str) {
    let doc = Html::parse_document(html);
    let all: String = doc.root_element().text().collect();
    assert!(
        all.contains(text),
        "{what}: `{text}` is not shown (as text) on the page"
    );
}

async fn wait_ended(app: &TestApp, table: &str, id: i64) -> (String, Option<String>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, error): (String, Option<String>) =
            sqlx::query_as(&format!("SELECT status, error FROM {table} WHERE id = $1"))
                .bind(id)
                .fetch_one(&app.db)
                .await
                .unwrap();
        if !matches!(status.as_str(), "queued" | "running") {
            return (status, error);
        }
        assert!(Instant::now() < deadline, "{table} #{id} never ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A throwaway database on the test server, dropped (with its sessions) on drop.
struct Db {
    name: String,
    url: String,
}

impl Db {
    async fn create(sql: &str) -> Db {
        let base = &services().await.pg_base;
        let name = format!(
            "dbops_it_hx_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let mut admin = PgConnection::connect(&format!("{base}/postgres"))
            .await
            .unwrap();
        sqlx::raw_sql(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .unwrap();
        let url = format!("{base}/{name}");
        let mut c = PgConnection::connect(&url).await.unwrap();
        sqlx::raw_sql(sql)
            .execute(&mut c)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        Db { name, url }
    }

    async fn exists(&self, rel: &str) -> bool {
        let mut c = PgConnection::connect(&self.url).await.unwrap();
        sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM pg_class WHERE relname = $1)")
            .bind(rel)
            .fetch_one(&mut c)
            .await
            .unwrap()
    }
}

async fn drop_database(name: &str) {
    let base = &services().await.pg_base;
    if let Ok(mut admin) = PgConnection::connect(&format!("{base}/postgres")).await {
        let _ = sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .execute(&mut admin)
            .await;
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Dropped from a plain thread: the test's runtime may be shutting down.
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(drop_database(&name));
        })
        .join();
    }
}

// ---------------------------------------------------------------------------------
// Markup in every user- or target-supplied string.
// ---------------------------------------------------------------------------------

/// A schema, table, column and index named with the payloads.
fn hostile_schema() -> String {
    let schema = SCRIPT.replace('"', "\"\"");
    let table = BREAKOUT.replace('"', "\"\"");
    format!(
        r#"CREATE SCHEMA "{schema}";
           CREATE TABLE "{schema}"."{table}" (id int PRIMARY KEY, "{q}" text);
           INSERT INTO "{schema}"."{table}" SELECT g, 'v' || g FROM generate_series(1, 50) g;
           CREATE INDEX "<b>idx</b>" ON "{schema}"."{table}" ("{q}");
           CREATE TABLE plain (id int);"#,
        q = QUOTES.replace('"', "\"\"")
    )
}

#[tokio::test]
async fn markup_in_names_reasons_comments_and_table_names_is_shown_as_text_never_run() {
    let db = Db::create(&hostile_schema()).await;
    let app = spawn_app_with(
        "[targets]\nconnect_timeout_seconds = 3\n[activity]\nlong_running_seconds = 1\n[[postgres]]\nname = \"hx\"\nurl_env = \"HX\"\npolicy = \"production\"\n",
        &[("HX", db.url.clone())],
    )
    .await;
    let mut op = app.logged_in(Role::Operator).await;
    let mut ap = app.logged_in(Role::Approver).await;

    // A failed login with markup as the username: the page echoes it, the log keeps it.
    let mut anon = app.browser();
    anon.get("/login").await;
    let r = anon
        .post(
            "/login",
            &[
                ("username", &format!("{SCRIPT}{BREAKOUT}")),
                ("password", "x"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_inert("login page", &r.text);
    assert_eq!(app.count_ops("auth.login.failed", None).await, 1);

    // An approval request with markup in its parameters and reason; rejected with
    // markup in the comment.
    let reason = format!("{SCRIPT} {BREAKOUT} {QUOTES}");
    let r = op
        .post(
            "/targets/hx/actions/pg.table.vacuum_full",
            &[("schema", SCRIPT), ("table", BREAKOUT), ("reason", &reason)],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text);
    let request = r.location().unwrap().to_string();
    let r = ap
        .post(
            &format!("{request}/reject"),
            &[("comment", &format!("{BREAKOUT} no {SCRIPT}"))],
        )
        .await;
    assert!(r.status.is_redirection(), "{}", r.text);

    // A backup, and a restore of only the hostile table into a new database.
    let backup = run::request(
        &app.state(),
        &AuditCtx::system(),
        "hx",
        Trigger::Person,
        BackupRequest::default(),
    )
    .await
    .unwrap();
    assert_eq!(wait_ended(&app, "backups", backup).await.0, "good");
    let restored = format!("{}_copy", db.name);
    let r = op
        .post(
            &format!("/backups/{backup}/restore"),
            &[("database", &restored), ("schemas", SCRIPT), ("jobs", "1")],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text);
    let restore_page = r.location().unwrap().to_string();
    let rid: i64 = restore_page.rsplit('/').next().unwrap().parse().unwrap();
    let (status, error) = wait_ended(&app, "restores", rid).await;
    assert_eq!(status, "succeeded", "{error:?}");
    // A database name with markup is refused, the name shown inert.
    let r = op
        .post(
            &format!("/backups/{backup}/restore"),
            &[("database", SCRIPT), ("jobs", "1")],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.text.contains("is not a valid name"), "{}", r.text);
    assert_inert("refused restore", &r.text);

    // A session whose application name and query carry markup.
    let session = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&format!(
            "{}?application_name={}",
            db.url,
            urlencode(BREAKOUT)
        ))
        .await
        .unwrap();
    let sleeper = tokio::spawn(async move {
        let _ = sqlx::query(&format!("SELECT '{SCRIPT}', pg_sleep(30)"))
            .execute(&session)
            .await;
    });

    // Reports list the relations by name.
    let r = op.post("/targets/hx/reports/space/refresh", &[]).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text);
    let job: i64 = r
        .location()
        .unwrap()
        .trim_start_matches("/jobs/")
        .parse()
        .unwrap();
    let (status, error) = wait_ended(&app, "jobs", job).await;
    assert_eq!(status, "succeeded", "{error:?}");
    let r = op.post("/targets/hx/reports/indexes/refresh", &[]).await;
    let indexes_job: i64 = r
        .location()
        .unwrap()
        .trim_start_matches("/jobs/")
        .parse()
        .unwrap();
    let (status, error) = wait_ended(&app, "jobs", indexes_job).await;
    assert_eq!(status, "succeeded", "{error:?}");

    let op_ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM operations ORDER BY id")
        .fetch_all(&app.db)
        .await
        .unwrap();
    let mut pages: Vec<String> = vec![
        "/".into(),
        "/approvals".into(),
        "/approvals?tab=all".into(),
        request.clone(),
        "/operations".into(),
        format!("/operations?actor={}", urlencode(SCRIPT)),
        format!("/backups/{backup}"),
        "/backups".into(),
        "/targets/hx/backups".into(),
        format!(
            "/targets/hx/actions/restore.over?backup_id={backup}&database={}",
            urlencode(BREAKOUT)
        ),
        restore_page.clone(),
        "/jobs".into(),
        format!("/jobs/{job}"),
        "/targets/hx/activity".into(),
        "/targets/hx/reports/space".into(),
        "/targets/hx/reports/indexes".into(),
        format!(
            "/targets/hx/actions/pg.table.vacuum_full?schema={}&table={}",
            urlencode(SCRIPT),
            urlencode(BREAKOUT)
        ),
    ];
    pages.extend(op_ids.iter().map(|id| format!("/operations/{id}")));
    let mut shown = String::new();
    for p in &pages {
        for b in [&mut op, &mut ap] {
            let r = b.get(p).await;
            assert!(
                r.status.is_success(),
                "{p}: {} {}",
                r.status,
                &r.text[..r.text.len().min(500)]
            );
            assert_inert(p, &r.text);
            shown.push_str(&r.text);
        }
    }
    // The payloads are there, as text: they were rendered, escaped.
    for text in [SCRIPT, BREAKOUT, "<b>idx</b>", QUOTES] {
        assert_shows("the pages together", &shown, text);
    }
    // The session shows once it has run for the (1 s) threshold.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let activity = op.get("/targets/hx/activity").await;
        assert_inert("activity", &activity.text);
        if activity.text.contains("pg_sleep(30)") {
            assert_shows("activity", &activity.text, &format!("SELECT '{SCRIPT}'"));
            assert_shows("activity", &activity.text, BREAKOUT);
            break;
        }
        assert!(Instant::now() < deadline, "the session never showed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let approval = op.get(&request).await;
    assert_shows("approval", &approval.text, &reason);
    assert_shows(
        "approval",
        &approval.text,
        &format!("{BREAKOUT} no {SCRIPT}"),
    );
    let restore = op.get(&restore_page).await;
    assert_shows("restore", &restore.text, BREAKOUT);

    sleeper.abort();
    drop_database(&restored).await;
}

#[tokio::test]
async fn redis_keys_and_values_with_markup_are_shown_as_text() {
    let app = spawn_app().await;
    let s = services().await;
    let c = {
        use fred::prelude::*;
        let c = Builder::from_config(Config::from_url(&s.redis_url).unwrap())
            .build()
            .unwrap();
        c.init().await.unwrap();
        c
    };
    let prefix = format!("hx:{}:", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let keys = [
        format!("{prefix}{SCRIPT}"),
        format!("{prefix}{BREAKOUT}"),
        format!("{prefix}{QUOTES}"),
    ];
    for k in &keys {
        let () = fred::prelude::KeysInterface::set(&c, k.as_str(), BREAKOUT, None, None, false)
            .await
            .unwrap();
    }
    let hash = format!("{prefix}hash");
    let () = fred::prelude::HashesInterface::hset(&c, hash.as_str(), (SCRIPT, QUOTES))
        .await
        .unwrap();
    let mut op = app.logged_in(Role::Operator).await;
    let pattern = urlencode(&format!("{prefix}*"));
    let mut pages = vec![
        format!("/targets/cache/redis/keys?pattern={pattern}"),
        format!("/targets/cache/redis/delete?pattern={pattern}"),
        format!("/targets/cache/redis/key?k={}", hex::encode(&hash)),
    ];
    pages.extend(
        keys.iter()
            .map(|k| format!("/targets/cache/redis/key?k={}", hex::encode(k))),
    );
    let mut shown = String::new();
    for p in &pages {
        let r = op.get(p).await;
        assert_eq!(r.status, StatusCode::OK, "{p}: {}", r.text);
        assert_inert(p, &r.text);
        shown.push_str(&r.text);
    }
    for text in [SCRIPT, BREAKOUT, QUOTES] {
        assert_shows("the key pages", &shown, text);
    }
    let _: i64 = fred::prelude::KeysInterface::del(&c, keys.to_vec())
        .await
        .unwrap();
    let _: i64 = fred::prelude::KeysInterface::del(&c, hash.as_str())
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------------
// SQL identifiers in maintenance actions.
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn maintenance_quotes_names_with_quotes_spaces_capitals_and_semicolons() {
    let db = Db::create(
        r#"CREATE SCHEMA "Sales Data";
           CREATE TABLE "Sales Data"."Order ""Items""; DROP TABLE victim; --" (id int);
           INSERT INTO "Sales Data"."Order ""Items""; DROP TABLE victim; --" SELECT generate_series(1, 100);
           CREATE TABLE "CamelCase" (id int);
           CREATE TABLE victim (id int);"#,
    )
    .await;
    let app = spawn_app_with(
        "[targets]\nconnect_timeout_seconds = 3\n[[postgres]]\nname = \"hx\"\nurl_env = \"HX\"\npolicy = \"dev\"\n",
        &[("HX", db.url.clone())],
    )
    .await;
    let mut op = app.logged_in(Role::Operator).await;
    let hostile = "Order \"Items\"; DROP TABLE victim; --";
    let mut ran = vec![];
    for (command, schema, table) in [
        ("analyze", "Sales Data", hostile),
        ("vacuum", "Sales Data", hostile),
        ("vacuum_analyze", "public", "CamelCase"),
    ] {
        let r = op
            .post(
                &format!("/targets/hx/maintenance/{command}"),
                &[("schema", schema), ("table", table)],
            )
            .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{command}: {}", r.text);
        let job: i64 = r
            .location()
            .unwrap()
            .trim_start_matches("/jobs/")
            .parse()
            .unwrap();
        let (status, error) = wait_ended(&app, "jobs", job).await;
        assert_eq!(status, "succeeded", "{command} {table}: {error:?}");
        ran.push(job);
    }
    let statements: Vec<String> =
        sqlx::query_scalar("SELECT result->>'statement' FROM jobs WHERE id = ANY($1) ORDER BY id")
            .bind(&ran)
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert!(
        statements[0].contains(r#""Sales Data"."Order ""Items""; DROP TABLE victim; --""#),
        "{statements:?}"
    );
    assert!(
        statements[2].contains(r#""public"."CamelCase""#)
            || statements[2].contains(r#"public."CamelCase""#),
        "{statements:?}"
    );
    assert!(db.exists("victim").await, "nothing else was touched");

    // Names that do not exist, or split a statement, are only ever names: the job
    // fails saying there is no such table, and nothing else runs.
    for table in [
        "victim; DROP TABLE victim",
        "camelcase",
        "victim\" CASCADE; --",
    ] {
        let r = op
            .post(
                "/targets/hx/maintenance/analyze",
                &[("schema", "public"), ("table", table)],
            )
            .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{table}: {}", r.text);
        let job: i64 = r
            .location()
            .unwrap()
            .trim_start_matches("/jobs/")
            .parse()
            .unwrap();
        let (status, error) = wait_ended(&app, "jobs", job).await;
        let error = error.unwrap_or_default();
        assert_eq!(status, "failed", "{table}");
        assert!(
            error.contains("There is no table") && error.contains("nothing was run"),
            "{table}: {error}"
        );
        let page = op.get(&format!("/jobs/{job}")).await;
        assert!(page.text.contains("There is no table"), "{}", page.text);
        assert_inert("job page", &page.text);
    }
    assert!(db.exists("victim").await);
    // Empty and over-long names are refused before anything runs, and logged.
    for (table, says) in [("", "is required"), (&*"x".repeat(64), "at most 63 bytes")] {
        let r = op
            .post(
                "/targets/hx/maintenance/analyze",
                &[("schema", "public"), ("table", table)],
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert!(r.text.contains(says), "{}", r.text);
    }
    assert_eq!(app.count_ops("pg.table.analyze", Some("failed")).await, 5);
}

// ---------------------------------------------------------------------------------
// Paths and ids.
// ---------------------------------------------------------------------------------

/// Sends a request exactly as written (no client normalises the path) and reads
/// the whole answer; returns its status and text.
async fn raw_request(app: &TestApp, head: &str, body: &[u8], chunked: bool) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    if chunked {
        for chunk in body.chunks(64 * 1024) {
            let mut piece = format!("{:x}\r\n", chunk.len()).into_bytes();
            piece.extend_from_slice(chunk);
            piece.extend_from_slice(b"\r\n");
            if s.write_all(&piece).await.is_err() {
                break; // the server answered and closed early
            }
        }
        let _ = s.write_all(b"0\r\n\r\n").await;
    }
    let mut buf = vec![];
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut buf)).await;
    let out = String::from_utf8_lossy(&buf).into_owned();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, out)
}

async fn raw_get(app: &TestApp, path: &str, cookie: &str) -> (u16, String) {
    let head = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nAccept: text/html\r\nCookie: dbops_session={cookie}\r\n\
         Connection: close\r\n\r\n",
        app.addr
    );
    raw_request(app, &head, b"", false).await
}

/// Posts `body` with chunked transfer encoding (no Content-Length up front).
async fn raw_post_chunked(
    app: &TestApp,
    path: &str,
    cookie: &str,
    csrf: &str,
    body: &[u8],
) -> (u16, String) {
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nAccept: text/html\r\nCookie: dbops_session={cookie}\r\n\
         X-CSRF-Token: {csrf}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        app.addr
    );
    raw_request(app, &head, body, true).await
}

#[tokio::test]
async fn paths_that_climb_out_and_ids_that_are_not_ours_never_reach_a_file_or_a_foreign_item() {
    let db = Db::create("CREATE TABLE t (id int); INSERT INTO t VALUES (1);").await;
    let app = spawn_app_with(
        "[targets]\nconnect_timeout_seconds = 3\n[[postgres]]\nname = \"hx\"\nurl_env = \"HX\"\npolicy = \"production\"\n[[redis]]\nname = \"cache\"\nurl_env = \"REDIS\"\npolicy = \"dev\"\n",
        &[("HX", db.url.clone()), ("REDIS", services().await.redis_url.clone())],
    )
    .await;
    let mut op = app.logged_in(Role::Operator).await;
    let cookie = op.session_id().unwrap();
    let backup = run::request(
        &app.state(),
        &AuditCtx::system(),
        "hx",
        Trigger::Person,
        BackupRequest::default(),
    )
    .await
    .unwrap();
    assert_eq!(wait_ended(&app, "backups", backup).await.0, "good");

    // Paths that climb out of the URL space, raw and encoded.
    for path in [
        "/backups/../../../../etc/passwd",
        "/backups/..%2f..%2f..%2f..%2fetc%2fpasswd/download",
        "/backups/%2e%2e%2f%2e%2e%2fetc%2fpasswd/download",
        "/static/../../../../etc/passwd",
        "/static/..%2f..%2f..%2f..%2fetc%2fpasswd",
        "/static/%2e%2e/%2e%2e/Cargo.toml",
        "/static/....//....//etc/passwd",
        "/backups/1/../../../etc/passwd",
    ] {
        let (status, text) = raw_get(&app, path, &cookie).await;
        assert!(
            (400..500).contains(&status),
            "{path}: {status}\n{}",
            &text[..text.len().min(400)]
        );
        assert!(!text.contains("root:"), "{path} served /etc/passwd");
        assert!(!text.contains("[package]"), "{path} served Cargo.toml");
    }
    // Ids that are not numbers, too big, or nobody's: a page that says so.
    for path in [
        "/backups/abc",
        "/backups/1e3/download",
        "/backups/99999999999999999999999/download",
        "/backups/-1/restore",
        "/backups/987654321",
        "/approvals/abc",
        "/approvals/987654321",
        "/jobs/0x10",
        "/jobs/987654321",
        "/restores/NaN",
        "/operations/%00",
        "/targets/..%2fhx/backups",
        "/targets/nope/backups",
    ] {
        let r = op.get(path).await;
        assert!(
            matches!(r.status, StatusCode::BAD_REQUEST | StatusCode::NOT_FOUND),
            "{path}: {}",
            r.status
        );
        assert!(
            r.text.contains("Request id"),
            "{path} is not an error page: {}",
            r.text
        );
    }

    // A backup row whose file name was altered to climb out of the store: the
    // download is refused and the attempt logged, nothing outside is read.
    sqlx::query("UPDATE backups SET storage_key = '../../../../../../etc/passwd' WHERE id = $1")
        .bind(backup)
        .execute(&app.db)
        .await
        .unwrap();
    let r = op.get(&format!("/backups/{backup}/download")).await;
    assert!(!r.status.is_success(), "{}", r.status);
    assert!(!r.text.contains("root:"));
    assert_eq!(app.count_ops("backup.download", Some("failed")).await, 1);
    let r = op
        .post(
            &format!("/backups/{backup}/restore"),
            &[("database", "dbops_it_never"), ("jobs", "1")],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert!(r.text.contains("nothing was restored"), "{}", r.text);

    // A PostgreSQL backup restored "into" the Redis target, or a target that does
    // not exist: refused, logged.
    let good = run::request(
        &app.state(),
        &AuditCtx::system(),
        "hx",
        Trigger::Person,
        BackupRequest::default(),
    )
    .await
    .unwrap();
    assert_eq!(wait_ended(&app, "backups", good).await.0, "good");
    for (target, says) in [
        ("cache", "is a Redis server"),
        ("elsewhere", "no target called"),
    ] {
        let r = op
            .post(
                &format!("/backups/{good}/restore"),
                &[
                    ("database", "dbops_it_never"),
                    ("jobs", "1"),
                    ("target", target),
                ],
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{target}: {}", r.text);
        assert!(r.text.contains(says), "{target}: {}", r.text);
    }
    assert!(app.count_ops("restore.run", Some("failed")).await >= 3);

    // Someone else's approval request: another operator can neither cancel nor
    // run it once approved.
    let r = op
        .post(
            "/targets/hx/actions/backup.delete",
            &[("backup_id", &good.to_string()), ("reason", "mine")],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text);
    let request = r.location().unwrap().to_string();
    let mut ap = app.logged_in(Role::Approver).await;
    ap.get(&request).await;
    ap.post(&format!("{request}/approve"), &[("comment", "ok")])
        .await;
    let mut other = app.logged_in(Role::Operator).await;
    other.get(&request).await;
    let denied_before = app.count_ops("approval.execute", Some("denied")).await;
    let r = other.post(&format!("{request}/execute"), &[]).await;
    // Refused: back on the request's page with the reason.
    let page = match r.location() {
        Some(l) => other.get(l).await.text,
        None => r.text,
    };
    assert!(page.contains("Only the requester or an approver"), "{page}");
    assert_eq!(
        app.count_ops("approval.execute", Some("denied")).await,
        denied_before + 1
    );
    other.post(&format!("{request}/cancel"), &[]).await;
    let state: String = sqlx::query_scalar("SELECT state FROM approval_requests")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(state, "approved");
    // Cancelling a job that does not exist.
    let r = other.post("/jobs/987654321/cancel", &[]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

// ---------------------------------------------------------------------------------
// Login: redirects and planted sessions.
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn after_login_only_local_paths_are_followed() {
    let app = spawn_app().await;
    let pw = app.create_user("redirected", Role::Viewer).await;
    for (next, goes) in [
        ("/operations?kind=auth.", "/operations?kind=auth."),
        ("//evil.example/x", "/"),
        ("https://evil.example", "/"),
        ("/\\evil.example", "/"),
        ("\\\\evil.example", "/"),
        ("javascript:alert(1)", "/"),
        ("/\t/evil.example", "/"),
        ("http:evil.example", "/"),
        (" //evil.example", "/"),
    ] {
        let mut b = app.browser();
        b.get(&format!("/login?next={}", urlencode(next))).await;
        let r = b
            .post(
                "/login",
                &[
                    ("username", "redirected"),
                    ("password", &pw),
                    ("next", next),
                ],
            )
            .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{next}");
        assert_eq!(r.location(), Some(goes), "{next:?}");
        // Already logged in, the login page sends the same way.
        let r = b.get(&format!("/login?next={}", urlencode(next))).await;
        assert_eq!(r.location(), Some(goes), "{next:?} (logged in)");
    }
    // The next field of the login form is an escaped attribute.
    let mut b = app.browser();
    let r = b
        .get(&format!(
            "/login?next={}",
            urlencode(&format!("/x{BREAKOUT}"))
        ))
        .await;
    assert_inert("login form", &r.text);
}

#[tokio::test]
async fn a_session_id_planted_before_login_is_replaced_and_stays_anonymous() {
    let app = spawn_app().await;
    let pw = app.create_user("fixated", Role::Operator).await;
    // The attacker gets a session of their own from the login page...
    let mut attacker = app.browser();
    attacker.get("/login").await;
    let planted = attacker.session_id().expect("a pre-login session");
    // ...and plants it in the victim's browser, who then logs in.
    let mut victim = app.browser();
    let url: reqwest::Url = victim.base.parse().unwrap();
    victim
        .jar
        .add_cookie_str(&format!("dbops_session={planted}; Path=/"), &url);
    let r = victim.login("fixated", &pw).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text);
    let after = victim.session_id().unwrap();
    assert_ne!(after, planted, "the session id is renewed at login");
    assert_eq!(victim.get("/").await.status, StatusCode::OK);
    // The planted id is worth nothing.
    let r = attacker.get("/").await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert!(r.location().unwrap().starts_with("/login"));
    // A made-up id is ignored, never adopted.
    let mut forger = app.browser();
    forger
        .jar
        .add_cookie_str("dbops_session=AAAAAAAAAAAAAAAAAAAAAA; Path=/", &url);
    let r = forger.get("/").await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    forger.login("fixated", &pw).await;
    assert_ne!(forger.session_id().unwrap(), "AAAAAAAAAAAAAAAAAAAAAA");
}

// ---------------------------------------------------------------------------------
// Oversized bodies and fields.
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn oversized_bodies_and_fields_are_refused_with_a_sentence() {
    let app = spawn_app().await;
    let mut op = app.logged_in(Role::Operator).await;
    let token = op.csrf.clone().unwrap();

    // A body over the limit (1 MiB): 413 with a page.
    let big = "x".repeat(2 * 1024 * 1024);
    let body = format!("csrf_token={token}&label={big}");
    let r = op
        .client
        .post(format!("{}/targets/pg/backups", op.base))
        .header("accept", "text/html")
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-csrf-token", &token)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    let text = r.text().await.unwrap();
    assert!(ct.starts_with("text/html"), "{ct}: {text}");
    assert!(text.contains("too large"), "{text}");
    assert!(text.contains("Request id"), "{text}");
    // The same without a length up front (chunked): the limit holds while reading.
    let (status, text) = raw_post_chunked(
        &app,
        "/targets/pg/backups",
        &op.session_id().unwrap(),
        &token,
        body.as_bytes(),
    )
    .await;
    assert_eq!(status, 413, "{}", &text[..text.len().min(600)]);
    assert!(text.contains("too large"), "{text}");
    assert!(text.contains("Request id"), "{text}");

    // Fields within the body limit but longer than they may be.
    let long_name = "a".repeat(300);
    let mut anon = app.browser();
    let r = anon
        .post("/login", &[("username", &long_name), ("password", "x")])
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.text.contains("too long"), "{}", r.text);

    let reason = "why ".repeat(100_000);
    let before = app.count_ops("approval.requested", Some("failed")).await;
    let r = op
        .post(
            "/targets/pg/actions/pg.table.vacuum_full",
            &[("schema", "public"), ("table", "t"), ("reason", &reason)],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.text.contains("The reason is too long"), "{}", r.text);
    assert_eq!(
        app.count_ops("approval.requested", Some("failed")).await,
        before + 1
    );
    let r = op
        .post(
            "/targets/pg/actions/pg.table.vacuum_full",
            &[
                ("schema", "public"),
                ("table", &"t".repeat(5000)),
                ("reason", "r"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.text.contains("at most 63 bytes"), "{}", r.text);

    let mut admin = app.logged_in(Role::Admin).await;
    admin.get("/admin/users").await;
    for (name, says) in [
        ("u".repeat(500), "at most 64 characters"),
        (SCRIPT.to_string(), "may contain only"),
    ] {
        let r = admin
            .post("/admin/users", &[("username", &name), ("role", "viewer")])
            .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER);
        let page = admin.get(r.location().unwrap()).await;
        assert!(page.text.contains(says), "{}", page.text);
        assert_inert("admin users", &page.text);
    }
    assert_eq!(app.count_ops("user.create", Some("failed")).await, 2);
}

// ---------------------------------------------------------------------------------
// Malformed configuration.
// ---------------------------------------------------------------------------------

fn config_error(toml_text: &str) -> String {
    let env = [
        (
            "DATABASE_URL",
            "postgres://postgres@127.0.0.1/x".to_string(),
        ),
        ("PG", "postgres://postgres@127.0.0.1/x".to_string()),
        ("REDIS", "redis://127.0.0.1:6379".to_string()),
    ];
    let r = dbops::config::Config::from_toml(
        toml_text,
        std::path::Path::new("bad.toml"),
        std::path::Path::new("."),
        |k| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()),
    );
    match r {
        Ok(_) => panic!("accepted:\n{toml_text}"),
        Err(e) => e.to_string(),
    }
}

const PG: &str = "[[postgres]]\nname = \"pg\"\nurl_env = \"PG\"\npolicy = \"dev\"\n";

#[test]
fn malformed_cron_time_zones_policies_and_numbers_are_refused_naming_the_key() {
    // Sanity: the base is fine.
    test_config(PG, &[("PG", "postgres://postgres@127.0.0.1/x".into())]);
    for (extra, key, says) in [
        (
            "[postgres.backup]\nschedule = \"every day at two\"\n",
            "postgres[0].backup.schedule",
            "",
        ),
        (
            "[postgres.backup]\nschedule = \"0 2 * * 8\"\n",
            "postgres[0].backup.schedule",
            "",
        ),
        (
            "[postgres.backup]\nschedule = \"61 2 * * *\"\n",
            "postgres[0].backup.schedule",
            "",
        ),
        (
            "[postgres.backup]\nschedule = \"\"\n",
            "postgres[0].backup.schedule",
            "",
        ),
        (
            "[postgres.backup]\nschedule = \"0 2 * * *\"\ntimezone = \"Mars/Olympus\"\n",
            "postgres[0].backup.timezone",
            "Mars/Olympus",
        ),
        (
            "[postgres.backup]\ntimezone = \"Mars/Olympus\"\n",
            "postgres[0].backup.timezone",
            "Mars/Olympus",
        ),
        (
            "[postgres.backup]\nformat = \"zip\"\n",
            "postgres[0].backup.format",
            "zip",
        ),
        (
            "[postgres.backup]\njobs = 4\n",
            "postgres[0].backup.jobs",
            "",
        ),
        (
            "[postgres.backup]\nkeep_last = 0\ndaily = 0\nweekly = 0\nmonthly = 0\n",
            "postgres[0].backup.keep_last",
            "",
        ),
        (
            "[postgres.backup]\nstorage = \"ftp\"\n",
            "postgres[0].backup.storage",
            "ftp",
        ),
        (
            "[postgres.backup]\nobjective_hours = 0\n",
            "postgres[0].backup.objective_hours",
            "",
        ),
    ] {
        let e = config_error(&format!("{PG}{extra}"));
        assert!(e.contains(key), "{extra}: {e}");
        assert!(e.contains(says), "{extra}: {e}");
    }
    for (text, key) in [
        (
            "[[postgres]]\nname = \"pg\"\nurl_env = \"PG\"\npolicy = \"yolo\"\n",
            "policy",
        ),
        (
            "[[postgres]]\nname = \"<script>\"\nurl_env = \"PG\"\npolicy = \"dev\"\n",
            "postgres[0].name",
        ),
        (
            "[[postgres]]\nname = \"pg\"\nurl_env = \"NOPE\"\npolicy = \"dev\"\n",
            "postgres[0].url_env",
        ),
        (
            "[[postgres]]\nname = \"pg\"\npolicy = \"dev\"\n",
            "postgres[0]",
        ),
        (
            "[[redis]]\nname = \"pg\"\nurl_env = \"PG\"\npolicy = \"dev\"\n",
            "redis[0] connection URL",
        ),
        ("[backups]\nworkers = 0\n", "backups.workers"),
        ("[jobs]\nworkers = 1000\n", "jobs.workers"),
        (
            "[targets]\nconnect_timeout_seconds = 0\n",
            "targets.connect_timeout_seconds",
        ),
        ("listen = \"everywhere\"\n", "listen"),
        ("log_format = \"xml\"\n", "log_format"),
        (
            "[session]\nidle_timeout_minutes = 0\n",
            "session.idle_timeout_minutes",
        ),
        ("[backups]\nlease_seconds = \"soon\"\n", "lease_seconds"),
        ("[backups]\nretention = 3\n", "retention"),
        ("workers = -1\n", "workers"),
    ] {
        let e = config_error(text);
        assert!(e.contains(key), "{text}: {e}");
    }
}
