//! Redis tools against real Redis: the key browser (paging, type filter, inert key
//! names), the logged key view, delete by pattern, flush gating, CONFIG SET logging,
//! memory by prefix, and a real cluster and sentinel started from the machine's
//! binaries. Each test keeps to its own key prefix on the shared Redis, or to a
//! redis-server of its own when it changes server-wide things.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dbops::auth::Role;
use dbops::devcluster::RedisServer;
use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand};
use reqwest::StatusCode;
use scraper::{Html, Selector};

use crate::helpers::{TestApp, services, spawn_app, spawn_app_with};

/// A fresh directory under /tmp, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = Path::new("/tmp").join(format!(
            "dbops-rt-{tag}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn connect(url: &str) -> Client {
    let client = Builder::from_config(Config::from_url(url).unwrap())
        .build()
        .unwrap();
    client.init().await.expect("connect to Redis");
    client
}

fn cmd(name: &str) -> CustomCommand {
    CustomCommand::new(name.to_string(), ClusterHash::FirstKey, false)
}

async fn raw(c: &Client, args: &[&[u8]]) -> Value {
    let name = String::from_utf8(args[0].to_vec()).unwrap();
    let rest: Vec<Value> = args[1..]
        .iter()
        .map(|a| Value::Bytes(bytes::Bytes::copy_from_slice(a)))
        .collect();
    c.custom(cmd(&name), rest)
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// A private prefix for one test.
fn prefix(tag: &str) -> String {
    format!(
        "it:rt:{tag}:{}:",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Every key matching a pattern (SCAN), for checks.
async fn scan_all(c: &Client, pattern: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut cursor = b"0".to_vec();
    loop {
        let v = raw(
            c,
            &[
                b"SCAN",
                &cursor,
                b"MATCH",
                pattern.as_bytes(),
                b"COUNT",
                b"1000",
            ],
        )
        .await;
        let mut parts = v.into_array().into_iter();
        cursor = parts.next().unwrap().as_bytes().unwrap().to_vec();
        for k in parts.next().unwrap().into_array() {
            out.push(k.as_bytes().unwrap().to_vec());
        }
        if cursor == b"0" {
            return out;
        }
    }
}

async fn cleanup(c: &Client, p: &str) {
    for k in scan_all(c, &format!("{p}*")).await {
        raw(c, &[b"UNLINK", &k]).await;
    }
}

fn select_texts(html: &str, css: &str) -> Vec<String> {
    let doc = Html::parse_document(html);
    let sel = Selector::parse(css).unwrap();
    doc.select(&sel)
        .map(|e| e.text().collect::<String>())
        .collect()
}

fn link_with_text(html: &str, text: &str) -> Option<String> {
    let doc = Html::parse_document(html);
    let sel = Selector::parse("a").unwrap();
    doc.select(&sel)
        .find(|e| e.text().collect::<String>().contains(text))
        .and_then(|e| e.value().attr("href").map(str::to_string))
}

fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Waits for a job to end; returns its status and result.
async fn wait_job(app: &TestApp, id: i64) -> (String, Option<serde_json::Value>, Option<String>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, result, error): (String, Option<serde_json::Value>, Option<String>) =
            sqlx::query_as("SELECT status, result, error FROM jobs WHERE id = $1")
                .bind(id)
                .fetch_one(&app.db)
                .await
                .unwrap();
        if !matches!(status.as_str(), "queued" | "running") {
            return (status, result, error);
        }
        assert!(Instant::now() < deadline, "job {id} did not end in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn job_id_from(location: &str) -> i64 {
    location
        .trim_start_matches("/jobs/")
        .parse()
        .unwrap_or_else(|_| panic!("not a job page: {location}"))
}

async fn newest_job(app: &TestApp, kind: &str) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let id: Option<i64> = sqlx::query_scalar("SELECT max(id) FROM jobs WHERE kind = $1")
            .bind(kind)
            .fetch_one(&app.db)
            .await
            .unwrap();
        if let Some(id) = id {
            return id;
        }
        assert!(Instant::now() < deadline, "no {kind} job was queued");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A dbops whose `cache` target is this Redis URL with this policy.
async fn app_for(url: &str, policy: &str) -> TestApp {
    spawn_app_with(
        &format!(
            "[targets]\nconnect_timeout_seconds = 3\n[[redis]]\nname = \"cache\"\nurl_env = \"REDIS\"\npolicy = \"{policy}\"\n"
        ),
        &[("REDIS", url.to_string())],
    )
    .await
}

#[tokio::test]
async fn key_browser_paging_finds_every_key_of_a_pattern_exactly_once() {
    let app = spawn_app().await;
    let c = connect(&services().await.redis_url).await;
    let p = prefix("page");
    let mut expected = BTreeSet::new();
    for i in 0..730 {
        let k = format!("{p}k{i:04}");
        raw(&c, &[b"SET", k.as_bytes(), b"v"]).await;
        expected.insert(k);
    }
    let mut b = app.logged_in(Role::Operator).await;
    let mut url = format!(
        "/targets/cache/redis/keys?pattern={}&count=40",
        enc(&format!("{p}*"))
    );
    let mut seen: Vec<String> = Vec::new();
    let mut pages = 0;
    loop {
        let r = b.get(&url).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        seen.extend(select_texts(&r.text, "td.keyname code"));
        pages += 1;
        match link_with_text(&r.text, "Continue scanning") {
            Some(next) => url = next.replace("&amp;", "&"),
            None => {
                assert!(r.text.contains("The scan is complete."));
                break;
            }
        }
        assert!(pages < 500, "the scan never ended");
    }
    assert!(pages > 1, "the keys should take several pages");
    let unique: BTreeSet<String> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "a key was shown twice");
    assert_eq!(unique, expected);
    cleanup(&c, &p).await;
}

#[tokio::test]
async fn the_type_filter_shows_only_keys_of_that_type() {
    let app = spawn_app().await;
    let c = connect(&services().await.redis_url).await;
    let p = prefix("type");
    for i in 0..20 {
        raw(&c, &[b"SET", format!("{p}s{i}").as_bytes(), b"v"]).await;
        raw(&c, &[b"HSET", format!("{p}h{i}").as_bytes(), b"f", b"v"]).await;
    }
    for i in 0..7 {
        raw(&c, &[b"RPUSH", format!("{p}l{i}").as_bytes(), b"a", b"b"]).await;
    }
    let mut b = app.logged_in(Role::Operator).await;
    let r = b
        .get(&format!(
            "/targets/cache/redis/keys?pattern={}&type=list&count=10000",
            enc(&format!("{p}*"))
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let names = select_texts(&r.text, "td.keyname code");
    assert_eq!(names.len(), 7, "{names:?}");
    assert!(names.iter().all(|n| n.starts_with(&format!("{p}l"))));
    let r = b.get("/targets/cache/redis/keys?type=bogus").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    cleanup(&c, &p).await;
}

#[tokio::test]
async fn key_names_with_markup_quotes_and_binary_bytes_render_inert() {
    let app = spawn_app().await;
    let c = connect(&services().await.redis_url).await;
    let p = prefix("xss");
    let script = format!("{p}<script>alert(1)</script>");
    let quotes = format!("{p}\"q'\"><img src=x onerror=alert(2)>");
    let mut binary = p.as_bytes().to_vec();
    binary.extend_from_slice(b"bin\x00\xff\x1b[31m");
    raw(&c, &[b"SET", script.as_bytes(), b"<b>bold</b>"]).await;
    raw(
        &c,
        &[
            b"HSET",
            quotes.as_bytes(),
            b"<i>field</i>",
            b"\x00\x01value",
        ],
    )
    .await;
    raw(&c, &[b"SET", &binary, b"\xff\xfe\xbe\xef"]).await;

    let mut b = app.logged_in(Role::Operator).await;
    let r = b
        .get(&format!(
            "/targets/cache/redis/keys?pattern={}",
            enc(&format!("{p}*"))
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        !r.text.contains("<script>alert(1)"),
        "a key name became markup"
    );
    assert!(!r.text.contains("<img src=x"), "a key name became markup");
    assert!(
        r.text.contains("&#60;script&#62;alert(1)") || r.text.contains("&lt;script&gt;alert(1)"),
        "the name is not shown escaped: {}",
        r.text
            .lines()
            .find(|l| l.contains("alert(1)"))
            .unwrap_or("")
    );
    let names = select_texts(&r.text, "td.keyname code");
    assert!(
        names.contains(&format!("{p}bin\\x00\\xff\\x1b[31m")),
        "{names:?}"
    );

    // Each key opens from its link, its value shown escaped, and the view is logged.
    let views_before = app.count_ops("redis.key.view", Some("succeeded")).await;
    for (name, must) in [
        (script.as_str(), "<b>bold</b>"),
        (quotes.as_str(), "\\x00\\x01value"),
        ("bin\\x00", "\\xff\\xfe\\xbe\\xef"),
    ] {
        let list = b
            .get(&format!(
                "/targets/cache/redis/keys?pattern={}",
                enc(&format!("{p}*"))
            ))
            .await;
        let doc = Html::parse_document(&list.text);
        let sel = Selector::parse("td.keyname a").unwrap();
        let href = doc
            .select(&sel)
            .find(|a| {
                a.text()
                    .collect::<String>()
                    .contains(name.trim_start_matches(&p))
            })
            .and_then(|a| a.value().attr("href").map(str::to_string))
            .unwrap_or_else(|| panic!("no link for {name}"));
        let r = b.get(&href).await;
        assert_eq!(r.status, StatusCode::OK, "{href}: {}", r.text);
        let shown = select_texts(&r.text, "code.value").join(" ");
        assert!(shown.contains(must), "{href} does not show {must}: {shown}");
        assert!(!r.text.contains("<b>bold") && !r.text.contains("<i>field"));
    }
    assert_eq!(
        app.count_ops("redis.key.view", Some("succeeded")).await,
        views_before + 3
    );
    // A key that does not exist is a 404 page, not an error.
    let r = b.get("/targets/cache/redis/key?k=6e6f7065").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(r.text.contains("no such key"));
    // A malformed key in the address is a clear 400.
    let r = b.get("/targets/cache/redis/key?k=zz").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    cleanup(&c, &p).await;
}

#[tokio::test]
async fn big_values_are_shown_a_page_at_a_time() {
    let app = spawn_app().await;
    let c = connect(&services().await.redis_url).await;
    let p = prefix("big");
    let list = format!("{p}list");
    for chunk in (0..250).collect::<Vec<_>>().chunks(50) {
        let mut args: Vec<Vec<u8>> = vec![b"RPUSH".to_vec(), list.as_bytes().to_vec()];
        args.extend(chunk.iter().map(|i| format!("item{i}").into_bytes()));
        let refs: Vec<&[u8]> = args.iter().map(|a| a.as_slice()).collect();
        raw(&c, &refs).await;
    }
    raw(
        &c,
        &[b"XADD", format!("{p}stream").as_bytes(), b"*", b"f", b"v"],
    )
    .await;
    raw(&c, &[b"ZADD", format!("{p}z").as_bytes(), b"1.5", b"m"]).await;
    raw(&c, &[b"SADD", format!("{p}set").as_bytes(), b"m1", b"m2"]).await;
    let mut b = app.logged_in(Role::Operator).await;
    let hex = hex::encode(list.as_bytes());
    let r = b.get(&format!("/targets/cache/redis/key?k={hex}")).await;
    assert!(r.text.contains("item0") && r.text.contains("item99") && !r.text.contains("item100<"));
    let next = link_with_text(&r.text, "Next part")
        .expect("a next page")
        .replace("&amp;", "&");
    let r = b.get(&next).await;
    assert!(r.text.contains("item100") && r.text.contains("item199"));
    for (k, must) in [("stream", "f=v"), ("z", "1.5"), ("set", "m2")] {
        let r = b
            .get(&format!(
                "/targets/cache/redis/key?k={}",
                hex::encode(format!("{p}{k}"))
            ))
            .await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(r.text.contains(must), "{k}: {}", r.text);
    }
    cleanup(&c, &p).await;
}

#[tokio::test]
async fn delete_by_pattern_removes_exactly_the_matching_keys_and_nothing_else() {
    let app = spawn_app().await;
    let c = connect(&services().await.redis_url).await;
    let p = prefix("del");
    for i in 0..1200 {
        raw(&c, &[b"SET", format!("{p}idem:{i}").as_bytes(), b"x"]).await;
    }
    for i in 0..300 {
        raw(&c, &[b"SET", format!("{p}keep:{i}").as_bytes(), b"x"]).await;
        raw(&c, &[b"SET", format!("{p}idemX{i}").as_bytes(), b"x"]).await;
    }
    let pattern = format!("{p}idem:*");
    let mut b = app.logged_in(Role::Operator).await;
    let r = b
        .get(&format!(
            "/targets/cache/redis/delete?pattern={}",
            enc(&pattern)
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.text.contains("1,200 keys match"), "{}", r.text);
    let ask = link_with_text(&r.text, "Ask to delete")
        .expect("an ask link")
        .replace("&amp;", "&");
    let form = b.get(&ask).await;
    assert_eq!(form.status, StatusCode::OK, "{}", form.text);
    assert!(form.text.contains("UNLINK"));
    // A pattern that matches everything is refused outright.
    let r = b
        .post(
            "/targets/cache/actions/redis.keys.delete",
            &[("pattern", "*"), ("reason", "oops")],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.text.contains("Flush database"));

    // dev policy: approved automatically, handed to a job.
    let r = b
        .post(
            "/targets/cache/actions/redis.keys.delete",
            &[
                ("db", "0"),
                ("pattern", &pattern),
                ("expected", "1200"),
                ("reason", "stale idempotency keys"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text);
    let id = newest_job(&app, "redis.keys.delete").await;
    let (status, result, error) = wait_job(&app, id).await;
    assert_eq!(status, "succeeded", "{error:?}");
    assert_eq!(result.unwrap()["deleted"], 1200);
    assert!(scan_all(&c, &pattern).await.is_empty());
    assert_eq!(scan_all(&c, &format!("{p}keep:*")).await.len(), 300);
    assert_eq!(scan_all(&c, &format!("{p}idemX*")).await.len(), 300);
    let (outcome, result): (String, serde_json::Value) = sqlx::query_as(
        "SELECT outcome, result FROM operations WHERE kind = 'redis.keys.delete' ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(outcome, "succeeded");
    assert_eq!(result["deleted"], 1200);
    cleanup(&c, &p).await;
}

#[tokio::test]
async fn flush_without_approval_is_refused_even_on_a_dev_target_and_needs_the_name_typed() {
    let dir = TempDir::new("flush");
    let server = RedisServer::start(&dir.0).await.unwrap();
    let c = connect(&server.url()).await;
    raw(&c, &[b"SELECT", b"3"]).await;
    for i in 0..10 {
        raw(&c, &[b"SET", format!("k{i}").as_bytes(), b"v"]).await;
    }
    let app = app_for(&server.url(), "dev").await;
    let mut op = app.logged_in(Role::Operator).await;
    let r = op
        .post(
            "/targets/cache/actions/redis.flushdb",
            &[("db", "3"), ("reason", "reset caches")],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    let req = r.location().unwrap().to_string();
    let page = op.get(&req).await;
    assert!(
        page.text.contains("waiting for an approver"),
        "{}",
        page.text
    );
    let id = req.trim_start_matches("/approvals/");
    // The requester cannot run it unapproved.
    let r = op
        .post(
            &format!("/approvals/{id}/execute"),
            &[("confirm_name", "cache")],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    assert_eq!(raw(&c, &[b"DBSIZE"]).await.as_i64(), Some(10));
    assert!(app.count_ops("approval.execute", Some("denied")).await >= 1);

    let mut approver = app.logged_in(Role::Approver).await;
    approver.get(&req).await;
    let r = approver
        .post(&format!("/approvals/{id}/approve"), &[("comment", "ok")])
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    // Without the name, or with a wrong one: refused, nothing flushed, still runnable.
    for typed in [None, Some("wrong")] {
        let page = op.get(&req).await;
        assert!(page.text.contains("name=\"confirm_name\""));
        let form: Vec<(&str, &str)> = typed.map(|t| vec![("confirm_name", t)]).unwrap_or_default();
        op.post(&format!("/approvals/{id}/execute"), &form).await;
        let page = op.get(&req).await;
        assert!(
            page.text.contains("Type the target&#x27;s name")
                || page.text.contains("Type the target's name"),
            "{}",
            page.text
        );
        assert_eq!(raw(&c, &[b"DBSIZE"]).await.as_i64(), Some(10));
    }
    let r = op
        .post(
            &format!("/approvals/{id}/execute"),
            &[("confirm_name", "cache")],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    let deadline = Instant::now() + Duration::from_secs(5);
    while raw(&c, &[b"DBSIZE"]).await.as_i64() != Some(0) {
        assert!(Instant::now() < deadline, "database 3 was not flushed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(app.count_ops("redis.flushdb", Some("succeeded")).await, 1);
}

// ---------------------------------------------------------------------------
// Delete by pattern is guarded on what matched, not on the pattern's text.

/// A Redis of its own whose db 0 holds `user:0..n` and `session:0..n`.
async fn server_with_keys(tag: &str, n: usize) -> (TempDir, RedisServer, Client) {
    let dir = TempDir::new(tag);
    let server = RedisServer::start(&dir.0).await.unwrap();
    let c = connect(&server.url()).await;
    for i in 0..n {
        raw(&c, &[b"SET", format!("user:{i}").as_bytes(), b"x"]).await;
        raw(&c, &[b"SET", format!("session:{i}").as_bytes(), b"x"]).await;
    }
    (dir, server, c)
}

/// The request id of an `/approvals/{id}` address.
fn approval_id(location: &str) -> i64 {
    location
        .trim_start_matches("/approvals/")
        .parse()
        .unwrap_or_else(|_| panic!("not a request page: {location}"))
}

async fn request_row(app: &TestApp, id: i64) -> (String, bool, serde_json::Value) {
    sqlx::query_as("SELECT state, auto_approved, params FROM approval_requests WHERE id = $1")
        .bind(id)
        .fetch_one(&app.db)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_pattern_that_matches_every_key_needs_an_approver_even_on_a_dev_target() {
    let (_dir, server, c) = server_with_keys("allmatch", 50).await;
    let app = app_for(&server.url(), "dev").await;
    let mut op = app.logged_in(Role::Operator).await;

    // The preview warns; the request form says why an approver is needed and
    // does not promise to run at once.
    let r = op.get("/targets/cache/redis/delete?pattern=%3F*").await;
    assert!(r.text.contains("100 keys match"), "{}", r.text);
    assert!(r.text.contains("treated as a flush"), "{}", r.text);
    let form = op
        .get("/targets/cache/actions/redis.keys.delete?pattern=%3F*")
        .await;
    assert_eq!(form.status, StatusCode::OK, "{}", form.text);
    assert!(
        form.text
            .contains("matches all 100 keys of db 0 — treated as a flush"),
        "{}",
        form.text
    );
    assert!(!form.text.contains("runs as soon as you send it"));
    assert!(form.text.contains("Ask for approval"));

    let mut last = 0;
    for pattern in ["?*", "[a-z]*", "*[0-9]"] {
        let r = op
            .post(
                "/targets/cache/actions/redis.keys.delete",
                &[("db", "0"), ("pattern", pattern), ("reason", "clean up")],
            )
            .await;
        assert_eq!(r.status, StatusCode::SEE_OTHER, "{pattern}: {}", r.text);
        let loc = r.location().unwrap().to_string();
        let id = approval_id(&loc);
        let (state, auto, params) = request_row(&app, id).await;
        assert_eq!((state.as_str(), auto), ("pending", false), "{pattern}");
        assert_eq!(params["measured"]["matched"], 100, "{pattern}: {params}");
        assert_eq!(params["measured"]["dbsize"], 100, "{pattern}: {params}");
        let page = op.get(&loc).await;
        assert!(
            page.text.contains("waiting for an approver"),
            "{}",
            page.text
        );
        assert!(
            page.text
                .contains("matches all 100 keys of db 0 — treated as a flush"),
            "{pattern}: {}",
            page.text
        );
        assert_eq!(raw(&c, &[b"DBSIZE"]).await.as_i64(), Some(100));
        last = id;
    }
    // `*` itself is refused and points to Flush database.
    let r = op
        .post(
            "/targets/cache/actions/redis.keys.delete",
            &[("pattern", "*"), ("reason", "clean up")],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.text.contains("Flush database"));
    assert_eq!(raw(&c, &[b"DBSIZE"]).await.as_i64(), Some(100));

    // Approved as a flush, it runs and empties the database.
    let mut approver = app.logged_in(Role::Approver).await;
    approver.get(&format!("/approvals/{last}")).await;
    let r = approver
        .post(&format!("/approvals/{last}/approve"), &[("comment", "ok")])
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    op.get(&format!("/approvals/{last}")).await;
    op.post(&format!("/approvals/{last}/execute"), &[]).await;
    let id = newest_job(&app, "redis.keys.delete").await;
    let (status, result, error) = wait_job(&app, id).await;
    assert_eq!(status, "succeeded", "{error:?}");
    assert_eq!(result.unwrap()["deleted"], 100);
    assert_eq!(raw(&c, &[b"DBSIZE"]).await.as_i64(), Some(0));
}

#[tokio::test]
async fn a_pattern_that_matches_a_subset_runs_without_an_approver_on_dev_and_the_request_shows_what_was_measured()
 {
    let (_dir, server, c) = server_with_keys("subset", 10).await;
    let app = app_for(&server.url(), "dev").await;
    let mut op = app.logged_in(Role::Operator).await;
    let form = op
        .get("/targets/cache/actions/redis.keys.delete?pattern=user%3A*")
        .await;
    assert!(
        form.text.contains("runs as soon as you send it"),
        "{}",
        form.text
    );
    let r = op
        .post(
            "/targets/cache/actions/redis.keys.delete",
            // What the form claims is not what is recorded.
            &[
                ("pattern", "user:*"),
                ("expected", "3"),
                ("reason", "old users"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text);
    let loc = r.location().unwrap().to_string();
    let (state, auto, params) = request_row(&app, approval_id(&loc)).await;
    assert!(auto, "approved automatically on dev ({state})");
    assert_eq!(params["measured"]["matched"], 10, "{params}");
    let id = newest_job(&app, "redis.keys.delete").await;
    let (status, result, error) = wait_job(&app, id).await;
    assert_eq!(status, "succeeded", "{error:?}");
    assert_eq!(result.unwrap()["deleted"], 10);
    assert!(scan_all(&c, "user:*").await.is_empty());
    assert_eq!(scan_all(&c, "session:*").await.len(), 10);
    let page = op.get(&loc).await;
    assert!(
        page.text.contains(
            "Measured by dbops when this was asked: the pattern matches 10 of the 20 keys of db 0"
        ),
        "{}",
        page.text
    );
}

#[tokio::test]
async fn an_automatic_delete_whose_pattern_matches_every_key_by_the_time_it_runs_is_refused_and_deletes_nothing()
 {
    let (_dir, server, c) = server_with_keys("recheck", 10).await;
    let app = app_for(&server.url(), "dev").await;
    let state = app.state();
    let op = app.current_user("olga", Role::Operator).await;
    let ctx = dbops::audit::AuditCtx::system().with_user(&op);
    let form: BTreeMap<String, String> = [
        ("pattern".to_string(), "user:*".to_string()),
        ("db".to_string(), "0".to_string()),
    ]
    .into();
    let req = dbops::approvals::request(
        &state,
        &ctx,
        &op,
        "cache",
        "redis.keys.delete",
        &form,
        "old users",
    )
    .await
    .unwrap();
    assert_eq!((req.state.as_str(), req.auto_approved), ("approved", true));
    // Meanwhile every other key goes: the pattern now matches the whole database.
    for k in scan_all(&c, "session:*").await {
        raw(&c, &[b"UNLINK", &k]).await;
    }
    let done = dbops::approvals::execute(&state, &ctx, &op, req.id)
        .await
        .unwrap();
    assert_eq!(done.state, "failed");
    let error = done.error.unwrap_or_default();
    assert!(
        error.contains("now matches all 10 keys of db 0")
            && error.contains("Nothing was deleted")
            && error.contains("not approved as a flush"),
        "{error}"
    );
    assert_eq!(raw(&c, &[b"DBSIZE"]).await.as_i64(), Some(10));
    let jobs: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE kind = 'redis.keys.delete'")
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(jobs, 0, "no delete job was queued");
    let mut b = app.logged_in(Role::Operator).await;
    let page = b.get(&format!("/approvals/{}", req.id)).await;
    assert!(page.text.contains("Nothing was deleted"), "{}", page.text);
}

#[tokio::test]
async fn the_flush_page_on_a_dev_target_shows_the_approver_rule_and_the_configured_notes_escaped() {
    let s = services().await;
    let app = spawn_app_with(
        r#"
        [targets]
        connect_timeout_seconds = 3
        [[redis]]
        name = "cache"
        url_env = "REDIS"
        policy = "dev"
        notes = """
        Emptying this signs every user out.
        <b>Call #payments</b> first."""
        [[redis]]
        name = "scratch"
        url_env = "REDIS"
        policy = "dev"
        "#,
        &[("REDIS", s.redis_url.clone())],
    )
    .await;
    let mut op = app.logged_in(Role::Operator).await;
    // askama escapes `<` and `>` as numeric references.
    let notes = "&#60;b&#62;Call #payments&#60;/b&#62; first.";
    for path in [
        "/targets/cache/actions/redis.flushdb?db=0",
        "/targets/cache/actions/redis.flushall",
    ] {
        let r = op.get(path).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert!(
            !r.text.contains("runs as soon as you send it"),
            "{}",
            r.text
        );
        assert!(!r.text.contains("Run it"), "{}", r.text);
        assert!(r.text.contains("Ask for approval"));
        assert!(
            r.text
                .contains("always needs an approver, whatever the target")
                && r.text.contains("even though this target"),
            "{}",
            r.text
        );
        assert!(!r.text.contains("refresh token"), "{}", r.text);
        assert!(r.text.contains("Emptying this signs every user out."));
        assert!(r.text.contains(notes), "{}", r.text);
        assert!(!r.text.contains("<b>Call"), "markup in notes is escaped");
    }
    // The delete-by-pattern page and the request's page show them too.
    let r = op.get("/targets/cache/redis/delete").await;
    assert!(r.text.contains(notes), "{}", r.text);
    let r = op
        .post(
            "/targets/cache/actions/redis.flushdb",
            &[("db", "0"), ("reason", "see the notes")],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text);
    let page = op.get(r.location().unwrap()).await;
    assert!(page.text.contains("waiting for an approver"));
    assert!(page.text.contains(notes), "{}", page.text);
    // A target without notes shows none.
    for path in [
        "/targets/scratch/actions/redis.flushdb?db=0",
        "/targets/scratch/redis/delete",
    ] {
        let r = op.get(path).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert!(!r.text.contains("target-notes"), "{path}: {}", r.text);
        assert!(!r.text.contains("payments"));
    }
}

#[tokio::test]
async fn config_set_is_logged_with_the_old_and_new_value() {
    let dir = TempDir::new("cfg");
    let server = RedisServer::start(&dir.0).await.unwrap();
    let c = connect(&server.url()).await;
    let app = app_for(&server.url(), "dev").await;
    let mut b = app.logged_in(Role::Operator).await;
    let page = b.get("/targets/cache/redis/config").await;
    assert!(page.text.contains("maxmemory-policy"));
    // A bad value is refused with a sentence, nothing set.
    let r = b
        .post(
            "/targets/cache/actions/redis.config.set",
            &[("name", "maxmemory"), ("value", "lots"), ("reason", "x")],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = b
        .post(
            "/targets/cache/actions/redis.config.set",
            &[("name", "requirepass"), ("value", "x"), ("reason", "x")],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = b
        .post(
            "/targets/cache/actions/redis.config.set",
            &[
                ("name", "maxmemory"),
                ("value", "64mb"),
                ("reason", "the runbook says so"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text);
    let (outcome, result): (String, serde_json::Value) = sqlx::query_as(
        "SELECT outcome, result FROM operations WHERE kind = 'redis.config.set' ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(outcome, "succeeded");
    assert_eq!(result["old"], "0");
    assert_eq!(result["new"], "67108864");
    let v = raw(&c, &[b"CONFIG", b"GET", b"maxmemory"])
        .await
        .into_array();
    assert_eq!(v[1].as_str().unwrap(), "67108864");
    // The server is this test's own; it is stopped (and the setting gone) on drop.
}

#[tokio::test]
async fn memory_by_prefix_totals_equal_the_sum_of_memory_usage() {
    let app = spawn_app().await;
    let c = connect(&services().await.redis_url).await;
    let p = prefix("mem");
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for i in 0..150 {
        let k = format!("{p}auth:{i}");
        raw(&c, &[b"SET", k.as_bytes(), "x".repeat(i * 10).as_bytes()]).await;
        groups.entry(format!("{p}auth:*")).or_default().push(k);
    }
    for i in 0..40 {
        let k = format!("{p}cache:{i}");
        raw(
            &c,
            &[
                b"HSET",
                k.as_bytes(),
                b"a",
                b"1",
                b"b",
                "y".repeat(300).as_bytes(),
            ],
        )
        .await;
        raw(&c, &[b"EXPIRE", k.as_bytes(), b"3600"]).await;
        groups.entry(format!("{p}cache:*")).or_default().push(k);
    }
    let depth = (p.matches(':').count() + 1).to_string();
    let mut b = app.logged_in(Role::Operator).await;
    b.get("/targets/cache/redis/memory").await;
    let r = b
        .post(
            "/targets/cache/redis/memory",
            &[
                ("db", "0"),
                ("depth", &depth),
                ("pattern", &format!("{p}*")),
                ("sample", ""),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text);
    let id = job_id_from(r.location().unwrap());
    let (status, result, error) = wait_job(&app, id).await;
    assert_eq!(status, "succeeded", "{error:?}");
    let result = result.unwrap();
    let mut total = 0u64;
    for (prefix, keys) in &groups {
        let mut sum = 0u64;
        for k in keys {
            sum += raw(&c, &[b"MEMORY", b"USAGE", k.as_bytes()])
                .await
                .as_i64()
                .unwrap() as u64;
        }
        total += sum;
        let g = result["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["prefix"] == prefix.as_str())
            .unwrap_or_else(|| panic!("no group {prefix}: {result}"));
        assert_eq!(g["bytes"].as_u64().unwrap(), sum, "{prefix}");
        assert_eq!(g["keys"].as_u64().unwrap(), keys.len() as u64);
    }
    assert_eq!(result["total_bytes"].as_u64().unwrap(), total);
    assert_eq!(result["keys_scanned"].as_u64().unwrap(), 190);
    assert_eq!(result["groups"][0]["prefix"], format!("{p}auth:*"));
    // The page shows the kept result.
    let page = b
        .get(&format!("/targets/cache/redis/memory?job={id}"))
        .await;
    assert!(page.text.contains(&format!("{p}cache:*")));
    assert!(page.text.contains("Every key was looked at"));
    // A prefix leads to the key browser filtered on it.
    let href = {
        let doc = scraper::Html::parse_document(&page.text);
        let sel = scraper::Selector::parse("table.prefixes a").unwrap();
        doc.select(&sel)
            .filter_map(|a| a.value().attr("href").map(str::to_string))
            .find(|h| h.contains("%3Acache%3A"))
            .expect("a link to the key browser")
    };
    assert!(
        href.starts_with("/targets/cache/redis/keys?db=0&pattern="),
        "{href}"
    );
    let keys = b.get(&href).await;
    assert_eq!(keys.status, StatusCode::OK);
    assert!(keys.text.contains(&format!("{p}cache:7")), "{}", keys.text);
    assert!(!keys.text.contains(&format!("{p}auth:7")), "{}", keys.text);
    cleanup(&c, &p).await;
}

#[tokio::test]
async fn the_overview_shows_info_facts_and_the_tools_are_for_operators() {
    let app = spawn_app().await;
    let mut viewer = app.logged_in(Role::Viewer).await;
    let r = viewer.get("/targets/cache/redis").await;
    assert_eq!(r.status, StatusCode::OK);
    for fact in [
        "Used",
        "Eviction policy",
        "Hit ratio",
        "Rejected connections",
        "Evicted keys",
        "Last save",
        "AOF",
        "Role",
        "Topology",
    ] {
        assert!(r.text.contains(fact), "{fact} missing");
    }
    assert!(!r.text.contains("BGSAVE"), "viewers see no tools");
    let r = viewer.get("/targets/cache/redis/keys").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let mut op = app.logged_in(Role::Operator).await;
    let r = op.get("/targets/pg/redis").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    for page in ["slowlog", "clients", "config", "delete", "memory"] {
        let r = op.get(&format!("/targets/cache/redis/{page}")).await;
        assert_eq!(r.status, StatusCode::OK, "{page}: {}", r.text);
    }
    let r = op.get("/targets/cache/redis/clients").await;
    assert!(r.text.contains("this page"));
}

#[tokio::test]
async fn bgsave_runs_as_a_job_and_reports_its_outcome() {
    let dir = TempDir::new("bgsave");
    let server = RedisServer::start(&dir.0).await.unwrap();
    let app = app_for(&server.url(), "dev").await;
    let mut b = app.logged_in(Role::Operator).await;
    b.get("/targets/cache/redis").await;
    let r = b.post("/targets/cache/redis/bgsave", &[]).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    let id = job_id_from(r.location().unwrap());
    let (status, result, error) = wait_job(&app, id).await;
    assert_eq!(status, "succeeded", "{error:?}");
    assert_eq!(result.unwrap()["nodes"][0]["status"], "ok");
}

// ---------------------------------------------------------------------------
// Cluster and sentinel, from the machine's redis-server.

/// A child process killed on drop.
struct Proc(tokio::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

fn free_port_pair() -> u16 {
    // A port whose cluster bus port (+10000) is free too.
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        if port < 55000 && std::net::TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
}

fn spawn_redis(dir: &Path, args: &[String]) -> Proc {
    std::fs::create_dir_all(dir).unwrap();
    Proc(
        tokio::process::Command::new("redis-server")
            .args(args)
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server"),
    )
}

async fn wait_ping(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "redis on {port} did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_cluster_target_is_scanned_and_cleaned_on_every_primary() {
    let dir = TempDir::new("cluster");
    let ports: Vec<u16> = (0..3).map(|_| free_port_pair()).collect();
    let mut procs = Vec::new();
    for p in &ports {
        procs.push(spawn_redis(
            &dir.0.join(p.to_string()),
            &[
                "--port".into(),
                p.to_string(),
                "--bind".into(),
                "127.0.0.1".into(),
                "--cluster-enabled".into(),
                "yes".into(),
                "--cluster-config-file".into(),
                "nodes.conf".into(),
                "--save".into(),
                "".into(),
                "--appendonly".into(),
                "no".into(),
            ],
        ));
    }
    for p in &ports {
        wait_ping(*p).await;
    }
    let mut args: Vec<String> = vec!["--cluster".into(), "create".into()];
    args.extend(ports.iter().map(|p| format!("127.0.0.1:{p}")));
    args.extend([
        "--cluster-replicas".into(),
        "0".into(),
        "--cluster-yes".into(),
    ]);
    let out = tokio::process::Command::new("redis-cli")
        .args(&args)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let url = format!(
        "redis-cluster://127.0.0.1:{}?node=127.0.0.1:{}&node=127.0.0.1:{}",
        ports[0], ports[1], ports[2]
    );
    // Wait for the cluster to be ok.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let o = tokio::process::Command::new("redis-cli")
            .args(["-p", &ports[0].to_string(), "cluster", "info"])
            .output()
            .await
            .unwrap();
        if String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok") {
            break;
        }
        assert!(Instant::now() < deadline, "the cluster did not become ok");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let c = connect(&url).await;
    for i in 0..300 {
        let _: () = c
            .set(format!("user:{i}"), "v", None, None, false)
            .await
            .unwrap();
        let _: () = c
            .set(format!("keep:{i}"), "v", None, None, false)
            .await
            .unwrap();
    }
    let app = app_for(&url, "dev").await;
    let mut b = app.logged_in(Role::Operator).await;
    let r = b.get("/targets/cache/redis").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(r.text.contains("cluster"));
    assert_eq!(r.text.matches("<td>primary</td>").count(), 3, "{}", r.text);
    // Browsing covers every primary.
    let mut url_ = "/targets/cache/redis/keys?pattern=user:*&count=1000".to_string();
    let mut seen = BTreeSet::new();
    loop {
        let r = b.get(&url_).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        seen.extend(select_texts(&r.text, "td.keyname code"));
        match link_with_text(&r.text, "Continue scanning") {
            Some(n) => url_ = n.replace("&amp;", "&"),
            None => break,
        }
    }
    assert_eq!(seen.len(), 300);
    // Preview and delete cover every primary.
    let r = b.get("/targets/cache/redis/delete?pattern=user:*").await;
    assert!(r.text.contains("300 keys match"), "{}", r.text);
    let r = b
        .post(
            "/targets/cache/actions/redis.keys.delete",
            &[
                ("pattern", "user:*"),
                ("expected", "300"),
                ("reason", "cleanup"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::SEE_OTHER, "{}", r.text);
    let id = newest_job(&app, "redis.keys.delete").await;
    let (status, result, error) = wait_job(&app, id).await;
    assert_eq!(status, "succeeded", "{error:?}");
    assert_eq!(result.as_ref().unwrap()["deleted"], 300);
    assert_eq!(result.unwrap()["nodes"], 3);
    let mut left = 0;
    let mut kept = 0;
    for p in &ports {
        let nc = connect(&format!("redis://127.0.0.1:{p}")).await;
        left += scan_all(&nc, "user:*").await.len();
        kept += scan_all(&nc, "keep:*").await.len();
    }
    assert_eq!((left, kept), (0, 300));
    drop(procs);
}

#[tokio::test]
async fn a_sentinel_target_reaches_the_primary_and_shows_the_topology() {
    let dir = TempDir::new("sentinel");
    let primary = free_port_pair();
    let sentinel = free_port_pair();
    let _p = spawn_redis(
        &dir.0.join("primary"),
        &[
            "--port".into(),
            primary.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--save".into(),
            "".into(),
        ],
    );
    wait_ping(primary).await;
    let conf = dir.0.join("sentinel.conf");
    std::fs::write(
        &conf,
        format!("port {sentinel}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {primary} 1\nsentinel down-after-milliseconds mymaster 5000\n"),
    )
    .unwrap();
    let _s = spawn_redis(&dir.0, &[conf.display().to_string(), "--sentinel".into()]);
    wait_ping(sentinel).await;
    let url = format!("redis-sentinel://127.0.0.1:{sentinel}?sentinelServiceName=mymaster");
    let app = app_for(&url, "dev").await;
    let mut b = app.logged_in(Role::Operator).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let r = loop {
        let r = b.get("/targets/cache/redis").await;
        if r.text.contains(&format!("127.0.0.1:{primary}")) || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(r.text.contains("sentinel"), "{}", r.text);
    assert!(
        r.text.contains(&format!("127.0.0.1:{primary}")),
        "{}",
        r.text
    );
    assert!(
        r.text.contains(&format!("127.0.0.1:{sentinel}")),
        "{}",
        r.text
    );
    // Keys written through the primary are browsed through sentinel.
    let c = connect(&format!("redis://127.0.0.1:{primary}")).await;
    let _: () = c.set("via:sentinel", "v", None, None, false).await.unwrap();
    let r = b.get("/targets/cache/redis/keys?pattern=via:*").await;
    assert_eq!(
        select_texts(&r.text, "td.keyname code"),
        vec!["via:sentinel".to_string()]
    );
}
