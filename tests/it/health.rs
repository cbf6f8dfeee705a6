//! Probes and metrics for the people who run dbops.

use dbops::auth::Role;
use reqwest::StatusCode;

use crate::helpers::{services, spawn_app, spawn_app_with, test_config};

const METRICS_TOKEN: &str = "scrape-token-0123456789abcdef";

/// The default test targets, with a metrics token.
async fn app_with_metrics_token() -> crate::helpers::TestApp {
    let s = services().await;
    spawn_app_with(
        r#"
        [metrics]
        token_env = "METRICS_TOKEN"
        [targets]
        connect_timeout_seconds = 2
        [[postgres]]
        name = "pg"
        url_env = "PG"
        policy = "production"
        "#,
        &[
            ("PG", format!("{}/postgres", s.pg_base)),
            ("METRICS_TOKEN", METRICS_TOKEN.to_string()),
        ],
    )
    .await
}

async fn scrape(app: &crate::helpers::TestApp, token: Option<&str>) -> (StatusCode, String) {
    let mut req = reqwest::Client::new().get(app.url("/metrics"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    (r.status(), r.text().await.unwrap())
}

#[tokio::test]
async fn health_and_readiness_answer_without_login() {
    let app = spawn_app().await;
    let mut anon = app.browser();
    let r = anon.get("/healthz").await;
    assert_eq!((r.status, r.text.as_str()), (StatusCode::OK, "ok\n"));
    let r = anon.get("/readyz").await;
    assert_eq!((r.status, r.text.as_str()), (StatusCode::OK, "ready\n"));
}

#[tokio::test]
async fn metrics_need_the_configured_bearer_token() {
    let app = app_with_metrics_token().await;
    // Some traffic, then the counters show it.
    let mut b = app.logged_in(Role::Admin).await;
    b.get("/").await;
    let (status, text) = scrape(&app, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(!text.contains("dbops_"), "{text}");
    let (status, text) = scrape(&app, Some("scrape-token-0123456789abcdeX")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "a wrong token");
    assert!(!text.contains("dbops_"), "{text}");
    let (status, _) = scrape(&app, Some("")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "an empty token");
    // A session, even an admin's, is no token.
    assert_eq!(b.get("/metrics").await.status, StatusCode::UNAUTHORIZED);

    let (status, m) = scrape(&app, Some(METRICS_TOKEN)).await;
    assert_eq!(status, StatusCode::OK);
    for metric in [
        "dbops_approvals_pending",
        "dbops_operations_total",
        "dbops_http_requests_total",
        "dbops_target_up",
        "dbops_users_enabled",
        "dbops_uptime_seconds",
    ] {
        assert!(m.contains(metric), "{metric} missing from /metrics");
    }
    assert!(m.contains("dbops_target_up{target=\"pg\"} 1"), "{m}");
}

#[tokio::test]
async fn metrics_are_no_page_unless_configured_and_public_only_when_chosen() {
    let app = spawn_app().await;
    let (status, text) = scrape(&app, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(!text.contains("dbops_"), "{text}");
    let app = spawn_app_with("[metrics]\npublic = true\n", &[]).await;
    let (status, text) = scrape(&app, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(text.contains("dbops_uptime_seconds"), "{text}");
}

#[tokio::test]
async fn the_session_cookie_is_secure_by_default_when_dbops_listens_beyond_loopback() {
    use tower::ServiceExt;
    let app = spawn_app().await;
    let settings = test_config("", &[]).session;
    // The decision dbops makes for its listen address, on a router that is never bound.
    for (listen, secure) in [("0.0.0.0:8080", true), ("127.0.0.1:8080", false)] {
        let router = axum::Router::new()
            .route(
                "/",
                axum::routing::get(|s: tower_sessions::Session| async move {
                    s.insert("x", 1).await.unwrap();
                    "ok"
                }),
            )
            .layer(dbops::app::session_layer(
                app.db.clone(),
                &settings,
                listen.parse().unwrap(),
            ));
        let res = router
            .oneshot(axum::http::Request::new(axum::body::Body::empty()))
            .await
            .unwrap();
        let cookie = res.headers()["set-cookie"].to_str().unwrap().to_string();
        assert!(cookie.starts_with("dbops_session="), "{cookie}");
        assert_eq!(cookie.contains("; Secure"), secure, "{listen}: {cookie}");
    }
}

#[tokio::test]
async fn starting_the_console_is_an_operation_naming_its_targets_but_no_secret() {
    let app = spawn_app().await;
    let params: serde_json::Value =
        sqlx::query_scalar("SELECT params FROM operations WHERE kind = 'console.start'")
            .fetch_one(&app.db)
            .await
            .unwrap();
    let targets = params["targets"].to_string();
    assert!(
        targets.contains("pg (postgres, production)") && targets.contains("cache (redis, dev)"),
        "{targets}"
    );
    assert!(!params.to_string().contains("postgres://"));
}
