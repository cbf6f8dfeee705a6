//! The one error type of the web layer. It logs internals and shows the person a
//! sentence; the page (or htmx toast) is rendered by the web layer's `render_errors`,
//! which adds the request id so that a report can be matched to the log.

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
};

/// An error a handler returns.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("You need to log in to see this page.")]
    Unauthenticated,
    #[error("{0}")]
    Forbidden(String),
    #[error("There is no such page or item.")]
    NotFound,
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("Something went wrong on our side.")]
    Internal(#[from] anyhow::Error),
}

/// What the web layer's `render_errors` needs to render an error page; put into the
/// response's extensions.
#[derive(Debug, Clone)]
pub struct ErrorInfo {
    pub message: String,
}

impl AppError {
    pub fn status(&self) -> StatusCode {
        match self {
            AppError::Unauthenticated => StatusCode::UNAUTHORIZED,
            AppError::Forbidden(_) => StatusCode::FORBIDDEN,
            AppError::NotFound => StatusCode::NOT_FOUND,
            AppError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AppError::Conflict(_) => StatusCode::CONFLICT,
            AppError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            AppError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn bad_request(msg: impl Into<String>) -> AppError {
        AppError::BadRequest(msg.into())
    }
}

impl From<sqlx::Error> for AppError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                tracing::error!(error = %e, "console database unavailable");
                AppError::Unavailable(
                    "The console database is not answering right now. Try again in a moment."
                        .into(),
                )
            }
            sqlx::Error::RowNotFound => AppError::NotFound,
            other => AppError::Internal(anyhow::Error::new(other).context("console database")),
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        if let AppError::Internal(e) = &self {
            // The chain goes to the log (with the request id from the trace span),
            // never to the page.
            tracing::error!(error = format!("{e:#}"), "internal error");
        }
        let status = self.status();
        let message = self.to_string();
        let mut res = (status, message.clone()).into_response();
        res.extensions_mut().insert(ErrorInfo { message });
        res
    }
}

/// Shorthand for handler results.
pub type AppResult<T> = Result<T, AppError>;
