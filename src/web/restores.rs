//! Restore pages: the "restore into a new database" form of a backup, asking for
//! it, and one restore with live progress and then its outcome (tables and rows).

use askama::Template;
use askama_web::WebTemplate;
use axum::{
    Form,
    extract::{Path, State},
    http::{StatusCode, header},
    response::{IntoResponse, Redirect, Response},
};
use serde::Deserialize;

use super::Layout;
use crate::{
    app::AppState,
    audit::AuditCtx,
    auth::CurrentUser,
    backups::{
        self, Backup,
        restore::{self, Restore, RestoreError, RestoreRequest},
    },
    error::{AppError, AppResult},
};

#[derive(Template, WebTemplate)]
#[template(path = "restores/new.html")]
pub struct NewRestorePage {
    layout: Layout,
    b: Backup,
    database: String,
    jobs: String,
    error: Option<String>,
}

/// A new database name nobody typed yet: `<target>_restore_<backup id>`.
fn suggested_name(b: &Backup) -> String {
    let base: String = b
        .target
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut name = format!("{base}_restore_{}", b.id);
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        name.insert(0, '_');
    }
    name.chars().take(63).collect()
}

/// `GET /backups/{id}/restore`: the form.
pub async fn new_restore(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<i64>,
) -> AppResult<NewRestorePage> {
    let b = backups::find(&state.db, id)
        .await?
        .ok_or(AppError::NotFound)?;
    Ok(NewRestorePage {
        layout: Layout::load(&state, user, "backups").await?,
        database: suggested_name(&b),
        jobs: restore::default_jobs().to_string(),
        error: None,
        b,
    })
}

/// The restore form.
#[derive(Deserialize, Default)]
pub struct RestoreForm {
    #[serde(default)]
    database: String,
    #[serde(default)]
    jobs: String,
}

/// `POST /backups/{id}/restore`: checks, queues and starts a restore into a new
/// database, then shows it; a refusal re-shows the form with the reason.
#[tracing::instrument(skip_all, fields(backup = id))]
pub async fn request_restore(
    State(state): State<AppState>,
    user: CurrentUser,
    ctx: AuditCtx,
    Path(id): Path<i64>,
    Form(form): Form<RestoreForm>,
) -> AppResult<Response> {
    let b = backups::find(&state.db, id)
        .await?
        .ok_or(AppError::NotFound)?;
    let jobs = match form.jobs.trim() {
        "" => Ok(None),
        j => j
            .parse::<u32>()
            .map(Some)
            .map_err(|_| format!("“{j}” is not a number of jobs.")),
    };
    let outcome = match jobs {
        Ok(jobs) => {
            let req = RestoreRequest {
                backup_id: id,
                database: form.database.clone(),
                jobs,
            };
            restore::request(&state, &ctx, &req).await
        }
        Err(m) => Err(RestoreError::Refused(m)),
    };
    match outcome {
        Ok(rid) => {
            restore::spawn(&state, rid);
            Ok(Redirect::to(&format!("/restores/{rid}")).into_response())
        }
        Err(RestoreError::Refused(msg)) => {
            let page = NewRestorePage {
                layout: Layout::load(&state, user, "backups").await?,
                database: form.database.trim().to_string(),
                jobs: form.jobs.trim().to_string(),
                error: Some(msg),
                b,
            };
            Ok((StatusCode::BAD_REQUEST, page).into_response())
        }
        Err(e) => Err(e.into()),
    }
}

#[derive(Template, WebTemplate)]
#[template(path = "restores/show.html")]
pub struct RestorePage {
    layout: Layout,
    tables: Vec<(String, i64)>,
    r: Restore,
}

/// `GET /restores/{id}`
pub async fn show_restore(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(id): Path<i64>,
) -> AppResult<RestorePage> {
    let r = restore::find(&state.db, id)
        .await?
        .ok_or(AppError::NotFound)?;
    Ok(RestorePage {
        layout: Layout::load(&state, user, "backups").await?,
        tables: r.tables(),
        r,
    })
}

#[derive(Template, WebTemplate)]
#[template(path = "restores/_progress.html")]
pub struct RestoreProgressPartial {
    r: Restore,
}

/// `GET /restores/{id}/progress`: the live part of a restore's page (htmx polls
/// it while the restore runs; once it ends the whole page reloads once).
pub async fn restore_progress(
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> AppResult<Response> {
    let r = restore::find(&state.db, id)
        .await?
        .ok_or(AppError::NotFound)?;
    let done = !r.is_active();
    let mut res = RestoreProgressPartial { r }.into_response();
    if done {
        res.headers_mut()
            .insert("hx-refresh", header::HeaderValue::from_static("true"));
    }
    Ok(res)
}
