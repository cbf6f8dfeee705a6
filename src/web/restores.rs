//! Restore pages: the "restore into a new database" form of a backup, asking for
//! it, and one restore with live progress and then its outcome (tables and rows).

use askama::Template;
use askama_web::WebTemplate;
use axum::{
    Form,
    extract::{Path, Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Redirect, Response},
};
use serde::Deserialize;

use super::Layout;
use crate::{
    app::AppState,
    audit::AuditCtx,
    auth::CurrentUser,
    backups::{self, Backup},
    error::{AppError, AppResult},
    restores::{self as restore, Restore, RestoreError, RestoreOptions, RestoreRequest},
};

#[derive(Template, WebTemplate)]
#[template(path = "restores/new.html")]
pub struct NewRestorePage {
    layout: Layout,
    b: Backup,
    form: RestoreForm,
    /// The PostgreSQL targets a backup can be restored into.
    targets: Vec<String>,
    error: Option<String>,
}

fn targets_of(state: &AppState, kind: crate::config::TargetKind) -> Vec<String> {
    state
        .targets
        .all()
        .filter(|t| t.kind() == kind)
        .map(|t| t.name().to_string())
        .collect()
}

fn postgres_targets(state: &AppState) -> Vec<String> {
    targets_of(state, crate::config::TargetKind::Postgres)
}

/// The restore page of a Redis backup: a logical export can be loaded into a
/// Redis target (four ways, two of them approved); an RDB snapshot only on the
/// server itself, so the page says how.
#[derive(Template, WebTemplate)]
#[template(path = "restores/redis.html")]
pub struct RedisRestorePage {
    layout: Layout,
    b: Backup,
    targets: Vec<String>,
    target: String,
    modes: Vec<(&'static str, &'static str, bool)>,
    error: Option<String>,
}

async fn redis_page(
    state: &AppState,
    user: CurrentUser,
    b: Backup,
    target: String,
    error: Option<String>,
) -> AppResult<RedisRestorePage> {
    use crate::restores::redis::RedisMode;
    Ok(RedisRestorePage {
        layout: Layout::load(state, user, "backups").await?,
        targets: targets_of(state, crate::config::TargetKind::Redis),
        target,
        modes: RedisMode::ALL
            .iter()
            .map(|m| (m.as_str(), m.describe(), m.destructive()))
            .collect(),
        error,
        b,
    })
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
) -> AppResult<Response> {
    let b = backups::find(&state.db, id)
        .await?
        .ok_or(AppError::NotFound)?;
    if b.method != "pg_dump" {
        let target = b.target.clone();
        return Ok(redis_page(&state, user, b, target, None)
            .await?
            .into_response());
    }
    Ok(NewRestorePage {
        layout: Layout::load(&state, user, "backups").await?,
        form: RestoreForm {
            database: suggested_name(&b),
            jobs: restore::default_jobs().to_string(),
            target: b.target.clone(),
            ..RestoreForm::default()
        },
        targets: postgres_targets(&state),
        error: None,
        b,
    }
    .into_response())
}

/// The restore form.
#[derive(Deserialize, Default)]
pub struct RestoreForm {
    #[serde(default)]
    database: String,
    #[serde(default)]
    jobs: String,
    #[serde(default)]
    target: String,
    #[serde(default)]
    schema_only: Option<String>,
    #[serde(default)]
    data_only: Option<String>,
    #[serde(default)]
    schemas: String,
    #[serde(default)]
    tables: String,
    #[serde(default)]
    keep_owner: Option<String>,
    #[serde(default)]
    role: String,
    #[serde(default)]
    single_transaction: Option<String>,
    /// For Redis: how the export meets the keys there.
    #[serde(default)]
    mode: String,
}

impl RestoreForm {
    fn options(&self) -> RestoreOptions {
        RestoreOptions {
            schema_only: self.schema_only.is_some(),
            data_only: self.data_only.is_some(),
            schemas: RestoreOptions::names(&self.schemas),
            tables: RestoreOptions::names(&self.tables),
            no_owner: self.keep_owner.is_none(),
            role: Some(self.role.trim().to_string()).filter(|r| !r.is_empty()),
            single_transaction: self.single_transaction.is_some(),
        }
    }
}

/// `POST /backups/{id}/restore`: checks, queues and starts a restore into a new
/// database, then shows it; a refusal re-shows the form with the reason.
#[tracing::instrument(skip_all, fields(backup = id))]
pub async fn request_restore(
    State(state): State<AppState>,
    user: CurrentUser,
    axum::Extension(roles): axum::Extension<crate::auth::roles::Roles>,
    ctx: AuditCtx,
    Path(id): Path<i64>,
    Form(form): Form<RestoreForm>,
) -> AppResult<Response> {
    let b = backups::find(&state.db, id)
        .await?
        .ok_or(AppError::NotFound)?;
    // Per-target roles: the route checked the role on the backup's target; a
    // restore into another target needs the operator role there too.
    if let Some(dest) = state.targets.get(form.target.trim()) {
        let role = roles.on(dest.name(), dest.policy());
        if role < crate::auth::Role::Operator {
            let dest = dest.name();
            crate::audit::record(
                &state.db,
                &ctx,
                crate::audit::Entry::new("auth.denied")
                    .target(dest)
                    .params(serde_json::json!({
                        "method": "POST", "path": format!("/backups/{id}/restore"),
                        "required_role": "operator", "target": dest,
                    }))
                    .denied(format!("role too low on {dest}")),
            )
            .await?;
            return Err(AppError::Forbidden(format!(
                "Restoring into {dest} needs the operator role or higher on {dest}; you are signed in as {} with the {role} role on {dest}.",
                user.username
            )));
        }
    }
    if b.method != "pg_dump" {
        return request_redis_restore(&state, user, &ctx, b, form).await;
    }
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
                target: Some(form.target.trim().to_string()).filter(|t| !t.is_empty()),
                options: form.options(),
            };
            restore::request(&state, &ctx, &req).await
        }
        Err(m) => Err(RestoreError::Refused(m)),
    };
    match outcome {
        Ok(rid) => Ok(Redirect::to(&format!("/restores/{rid}")).into_response()),
        Err(RestoreError::Refused(msg)) => {
            let page = NewRestorePage {
                layout: Layout::load(&state, user, "backups").await?,
                form,
                targets: postgres_targets(&state),
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
    tables: Vec<(String, i64, Option<i64>)>,
    /// Whether the backup recorded per-table counts to compare with.
    recorded: bool,
    r: Restore,
    /// `[restores] keep_previous_days`, when dbops drops kept databases itself.
    keep_days: Option<u64>,
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
        recorded: r.tables().iter().any(|(_, _, b)| b.is_some()),
        tables: r.tables(),
        r,
        keep_days: state
            .config
            .restores
            .keep_previous
            .map(|d| d.as_secs() / 86_400),
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

/// `GET /backups/{id}/restore-over?target=T&…`: on to the approval request form
/// of `restore.over` on the chosen target, with the backup and options filled in.
pub async fn restore_over(
    State(state): State<AppState>,
    Path(id): Path<i64>,
    Query(query): Query<Vec<(String, String)>>,
) -> AppResult<Redirect> {
    let target = query
        .iter()
        .find(|(k, _)| k == "target")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    if state.targets.get(&target).is_none() {
        return Err(AppError::bad_request(format!(
            "There is no target called {target}."
        )));
    }
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    q.append_pair("backup_id", &id.to_string());
    for (k, v) in query.iter().filter(|(k, v)| k != "target" && !v.is_empty()) {
        q.append_pair(k, v);
    }
    let path = format!(
        "/targets/{}/actions/restore.over?{}",
        url::form_urlencoded::byte_serialize(target.as_bytes()).collect::<String>(),
        q.finish()
    );
    Ok(Redirect::to(&path))
}

/// A Redis restore: the non-destructive modes start a job now; the destructive
/// ones go on to the approval request form.
async fn request_redis_restore(
    state: &AppState,
    user: CurrentUser,
    ctx: &AuditCtx,
    b: Backup,
    form: RestoreForm,
) -> AppResult<Response> {
    use crate::restores::redis::{self as redis_restore, RedisMode};
    let target = form.target.trim().to_string();
    let Some(mode) = RedisMode::parse(&form.mode) else {
        let page = redis_page(
            state,
            user,
            b,
            target,
            Some("Choose how the export meets the keys there.".into()),
        )
        .await?;
        return Ok((StatusCode::BAD_REQUEST, page).into_response());
    };
    if mode.destructive() {
        if state.targets.get(&target).is_none() {
            return Err(AppError::bad_request(format!(
                "There is no target called {target}."
            )));
        }
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        q.append_pair("backup_id", &b.id.to_string())
            .append_pair("mode", mode.as_str());
        let path = format!(
            "/targets/{}/actions/redis.restore.over?{}",
            url::form_urlencoded::byte_serialize(target.as_bytes()).collect::<String>(),
            q.finish()
        );
        return Ok(Redirect::to(&path).into_response());
    }
    match redis_restore::request(state, ctx, b.id, &target, mode).await {
        Ok(job) => Ok(Redirect::to(&format!("/jobs/{job}")).into_response()),
        Err(AppError::BadRequest(msg)) => {
            let page = redis_page(state, user, b, target, Some(msg)).await?;
            Ok((StatusCode::BAD_REQUEST, page).into_response())
        }
        Err(e) => Err(e),
    }
}
