//! One-time messages carried across a redirect (Post/Redirect/Get), kept in the
//! session.

use serde::{Deserialize, Serialize};
use tower_sessions::Session;

const KEY: &str = "flash";

/// A message for the next page.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Flash {
    /// `ok` or `error`.
    pub kind: String,
    pub message: String,
}

pub async fn ok(session: &Session, message: impl Into<String>) {
    set(session, "ok", message.into()).await
}

pub async fn error(session: &Session, message: impl Into<String>) {
    set(session, "error", message.into()).await
}

async fn set(session: &Session, kind: &str, message: String) {
    let f = Flash {
        kind: kind.into(),
        message,
    };
    if let Err(e) = session.insert(KEY, f).await {
        tracing::warn!(error = %e, "could not keep a message for the next page");
    }
}

/// The message left for this page, removed so that it shows once.
pub async fn take(session: &Session) -> Option<Flash> {
    session.remove::<Flash>(KEY).await.ok().flatten()
}
