//! Targets on the overview: reachable, down within the timeout, and never a secret
//! on a page or in a log line.

use std::time::{Duration, Instant};

use dbops::auth::Role;
use reqwest::StatusCode;

use crate::helpers::{captured_logs, services, spawn_app, spawn_app_with};

/// A TCP port that accepts connections and then never says anything: what a
/// firewalled or hung server looks like to a client.
async fn black_hole() -> (tokio::net::TcpListener, u16) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

#[tokio::test]
async fn the_overview_shows_reachable_targets_with_their_facts() {
    let app = spawn_app().await;
    let mut b = app.logged_in(Role::Viewer).await;
    let page = b.get("/").await;
    assert_eq!(page.status, StatusCode::OK);
    let doc = scraper::Html::parse_document(&page.text);
    let row = |name: &str| {
        let sel = scraper::Selector::parse(&format!("tr[data-target=\"{name}\"]")).unwrap();
        doc.select(&sel)
            .next()
            .map(|e| e.text().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    let pg = row("pg");
    assert!(
        pg.contains("reachable") && pg.contains("PostgreSQL 1") && pg.contains("production"),
        "{pg}"
    );
    let cache = row("cache");
    assert!(
        cache.contains("reachable") && cache.contains("Redis 7") && cache.contains("dev"),
        "{cache}"
    );
}

#[tokio::test]
async fn an_unreachable_target_shows_as_down_within_the_timeout_while_others_render() {
    let (_hole, port) = black_hole().await;
    let (_hole2, port2) = black_hole().await;
    let s = services().await;
    let app = spawn_app_with(
        r#"
        [targets]
        connect_timeout_seconds = 1
        [[postgres]]
        name = "good"
        url_env = "GOOD"
        policy = "dev"
        [[postgres]]
        name = "hung"
        url_env = "HUNG"
        policy = "production"
        [[redis]]
        name = "hung-cache"
        url_env = "HUNG_REDIS"
        policy = "dev"
        [[postgres]]
        name = "refused"
        url_env = "REFUSED"
        policy = "staging"
        "#,
        &[
            ("GOOD", format!("{}/postgres", s.pg_base)),
            ("HUNG", format!("postgres://app:pw@127.0.0.1:{port}/app")),
            ("HUNG_REDIS", format!("redis://127.0.0.1:{port2}")),
            ("REFUSED", "postgres://app:pw@127.0.0.1:1/app".into()),
        ],
    )
    .await;
    let mut b = app.logged_in(Role::Viewer).await;
    let started = Instant::now();
    let page = b.get("/").await;
    let took = started.elapsed();
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        took < Duration::from_secs(8),
        "the overview waited {took:?} for dead targets"
    );
    let doc = scraper::Html::parse_document(&page.text);
    let row = |name: &str| {
        let sel = scraper::Selector::parse(&format!("tr[data-target=\"{name}\"]")).unwrap();
        doc.select(&sel)
            .next()
            .map(|e| e.text().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    assert!(row("good").contains("reachable"), "{}", row("good"));
    for dead in ["hung", "hung-cache", "refused"] {
        assert!(row(dead).contains("down"), "{dead}: {}", row(dead));
    }
    assert!(
        row("refused").contains("refused"),
        "the reason is given: {}",
        row("refused")
    );
    assert!(
        row("hung").contains("timeout") || row("hung").contains("not responding"),
        "{}",
        row("hung")
    );
}

#[tokio::test]
async fn no_page_or_log_line_contains_a_target_password() {
    let s = services().await;
    let pg_secret = "Pg-S3cret-5d1e7b";
    let redis_secret = "Rd-S3cret-9a2c4f";
    let down_secret = "Dn-S3cret-77e1aa";
    // Trust authentication ignores the password, so this target is reachable.
    let pg_url = s
        .pg_base
        .replace("postgres@", &format!("postgres:{pg_secret}@"))
        + "/postgres";
    let app = spawn_app_with(
        r#"
        [metrics]
        public = true
        [targets]
        connect_timeout_seconds = 1
        [[postgres]]
        name = "withpw"
        url_env = "PGURL"
        policy = "production"
        [[postgres]]
        name = "downpw"
        url_env = "DOWNURL"
        policy = "dev"
        [[redis]]
        name = "redispw"
        url_env = "REDISURL"
        policy = "dev"
        "#,
        &[
            ("PGURL", pg_url),
            (
                "DOWNURL",
                format!("postgres://app:{down_secret}@127.0.0.1:1/app"),
            ),
            ("REDISURL", format!("redis://:{redis_secret}@127.0.0.1:1")),
        ],
    )
    .await;
    let mut b = app.logged_in(Role::Admin).await;
    let mut html = String::new();
    for path in [
        "/",
        "/operations",
        "/operations/1",
        "/admin/users",
        "/metrics",
        "/operations/export.csv",
    ] {
        html.push_str(&b.get(path).await.text);
    }
    assert!(
        html.contains("withpw") && html.contains("downpw") && html.contains("dbops_target_up"),
        "the pages did render the targets"
    );
    let logs = captured_logs();
    for secret in [pg_secret, redis_secret, down_secret] {
        assert!(!html.contains(secret), "a page shows {secret}");
        assert!(!logs.contains(secret), "the log shows {secret}");
    }
}
