//! `/healthz` (the process answers), `/readyz` (the console database answers) and
//! `/metrics` (Prometheus text).

use std::time::Duration;

use axum::{
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
};

use crate::app::AppState;

/// `GET /healthz`
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// `GET /readyz`: 200 when the console database answers within 2 s, else 503.
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let ping = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&state.db);
    match tokio::time::timeout(Duration::from_secs(2), ping).await {
        Ok(Ok(_)) => (StatusCode::OK, "ready\n"),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            "console database unavailable\n",
        ),
    }
}

/// `GET /metrics`: counters kept by this process, plus gauges read now from the
/// console database.
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let counts = sqlx::query_as::<_, (i64, i64, i64)>(
        "SELECT (SELECT count(*) FROM users WHERE NOT disabled),
                (SELECT count(*) FROM operations WHERE outcome = 'running'),
                (SELECT count(*) FROM approval_requests WHERE state = 'pending' AND expires_at > now())",
    )
    .fetch_one(&state.db);
    if let Ok(Ok((users, running, pending))) =
        tokio::time::timeout(Duration::from_secs(2), counts).await
    {
        metrics::gauge!("dbops_users_enabled").set(users as f64);
        metrics::gauge!("dbops_operations_running").set(running as f64);
        metrics::gauge!("dbops_approvals_pending").set(pending as f64);
    }
    if let Ok(Ok(rows)) = tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::query_as::<_, (String, chrono::DateTime<chrono::Utc>, i64)>(
            "SELECT DISTINCT ON (target) target, finished_at, bytes FROM backups
             WHERE status = 'good' ORDER BY target, finished_at DESC",
        )
        .fetch_all(&state.db),
    )
    .await
    {
        for (target, at, bytes) in rows {
            metrics::gauge!("dbops_backup_last_good_timestamp_seconds", "target" => target.clone())
                .set(at.timestamp() as f64);
            metrics::gauge!("dbops_backup_last_good_bytes", "target" => target).set(bytes as f64);
        }
    }
    metrics::gauge!("dbops_uptime_seconds").set(state.started.elapsed().as_secs_f64());
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
