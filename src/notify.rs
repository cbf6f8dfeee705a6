//! Notifications: a Slack-compatible webhook (`{"text": "…"}`), sent in the
//! background. A failing webhook is logged (and written to the operations log) and
//! never blocks or fails the action that triggered it.

use std::time::Duration;

use secrecy::ExposeSecret;
use serde_json::json;

use crate::{
    audit::{self, AuditCtx, Entry},
    state::AppState,
};

/// Sends `text` to the configured webhook, if any, without waiting for it.
pub fn send(state: &AppState, event: &'static str, text: String) {
    if state.config.notifications.webhook_url.is_none() {
        return;
    }
    let state = state.clone();
    tokio::spawn(async move {
        let _ = deliver(&state, event, text).await;
    });
}

/// Sends `text` to the configured webhook and waits for its answer (a step
/// that must know it was announced); a failure is logged as [`send`] logs it
/// and returned as a sentence. Nothing is sent when no webhook is configured.
pub async fn deliver(state: &AppState, event: &'static str, text: String) -> Result<(), String> {
    let Some(url) = state.config.notifications.webhook_url.clone() else {
        return Ok(());
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build();
    let outcome = match client {
        Ok(c) => c
            .post(url.expose_secret())
            .json(&json!({ "text": text }))
            .send()
            .await
            .map_err(|e| e.without_url().to_string())
            .and_then(|r| {
                if r.status().is_success() {
                    Ok(())
                } else {
                    Err(format!("the webhook answered {}", r.status()))
                }
            }),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = &outcome {
        tracing::warn!(event, error = %e, "webhook notification failed");
        let _ = audit::record(
            &state.db,
            &AuditCtx::system(),
            Entry::new("notify.webhook")
                .params(json!({ "event": event }))
                .failed(e.clone()),
        )
        .await;
    }
    outcome
}
