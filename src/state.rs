//! The state every handler, job and action reaches: the configuration, the
//! console database, the targets, the registries and the storages. Built by
//! [`crate::app`]; part of the foundation, so nothing here imports the web layer.

use std::{ops::Deref, sync::Arc};

use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;

use crate::{config::Config, targets::Registry};

/// What every handler can reach.
pub struct Inner {
    pub config: Config,
    /// The console's own database.
    pub db: PgPool,
    pub targets: Registry,
    /// Every gated action kind, for approvals.
    pub actions: crate::approvals::ActionRegistry,
    pub metrics: PrometheusHandle,
    pub started: std::time::Instant,
    /// Every job kind, and the durable queue jobs go into.
    pub job_kinds: crate::jobs::JobRegistry,
    pub job_queue: Arc<underway::Queue<crate::jobs::JobTask>>,
    /// Local backup storage (always there: also the scratch space).
    pub local_storage: Arc<crate::storage::LocalStorage>,
    /// S3-compatible storage, when configured.
    pub s3_storage: Option<Arc<crate::storage::S3Storage>>,
    /// The `[[oidc]]` sign-in providers and their cached discovery documents.
    pub oidc: crate::auth::oidc::Providers,
    /// Cancelled when the process shuts down: running work ends as interrupted.
    pub shutdown: tokio_util::sync::CancellationToken,
}

impl Inner {
    /// The storage called `name` (`local` or `s3`).
    pub fn storage_for(&self, name: &str) -> Result<Arc<dyn crate::storage::Storage>, String> {
        match name {
            "local" => Ok(self.local_storage.clone()),
            "s3" => self
                .s3_storage
                .clone()
                .map(|s| s as Arc<dyn crate::storage::Storage>)
                .ok_or_else(|| "S3 storage is not configured ([backups.s3])".to_string()),
            other => Err(format!("unknown storage {other}")),
        }
    }
}

/// Cheaply cloneable handle to [`Inner`].
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

impl AppState {
    pub fn new(inner: Inner) -> AppState {
        AppState(Arc::new(inner))
    }
}

impl Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// Quotes a PostgreSQL identifier (doubling embedded quotes), as `quote_ident` does.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
