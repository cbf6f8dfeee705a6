//! Probes and metrics for the people who run dbops.

use dbops::auth::Role;
use reqwest::StatusCode;

use crate::helpers::spawn_app;

#[tokio::test]
async fn health_readiness_and_metrics_answer_without_login() {
    let app = spawn_app().await;
    let mut anon = app.browser();
    let r = anon.get("/healthz").await;
    assert_eq!((r.status, r.text.as_str()), (StatusCode::OK, "ok\n"));
    let r = anon.get("/readyz").await;
    assert_eq!((r.status, r.text.as_str()), (StatusCode::OK, "ready\n"));

    // Some traffic, then the counters show it.
    let mut b = app.logged_in(Role::Viewer).await;
    b.get("/").await;
    let m = anon.get("/metrics").await;
    assert_eq!(m.status, StatusCode::OK);
    for metric in [
        "dbops_approvals_pending",
        "dbops_operations_total",
        "dbops_http_requests_total",
        "dbops_target_up",
        "dbops_users_enabled",
        "dbops_uptime_seconds",
    ] {
        assert!(m.text.contains(metric), "{metric} missing from /metrics");
    }
    assert!(
        m.text.contains("dbops_target_up{target=\"pg\"} 1"),
        "{}",
        m.text
    );
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
