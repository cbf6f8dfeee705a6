//! Migration status pages: a PostgreSQL target's databases with every migration
//! tool found in them (applied, current, failed/dirty, pending and drift), and the
//! same for dbops' own console schema. Read-only, so viewers may read them. Also
//! the API route where a pipeline reports a deploy (manifest + outcome).

use askama::Template;
use askama_web::WebTemplate;
use axum::{
    Extension, Json,
    extract::{Path, State, rejection::JsonRejection},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde_json::json;

use super::Layout;
use crate::{
    app::AppState,
    audit::{self, AuditCtx, Entry},
    auth::{CurrentUser, Role, tokens::ApiClient},
    config::TargetKind,
    error::{AppError, AppResult},
    migration_status::{
        self, DatabaseReport, ToolReport,
        deploys::{self, DeployError, DeployReport},
    },
};

#[derive(Template, WebTemplate)]
#[template(path = "migrations/target.html")]
pub struct TargetMigrationsPage {
    layout: Layout,
    target: String,
    policy: &'static str,
    description: String,
    /// Operators may start a backup; others get a link to the history.
    can_backup: bool,
    /// Migrations directories configured for the target.
    configured_dirs: usize,
    databases: Vec<DatabaseReport>,
    /// The tools dbops recognises, for the "none found" sentence.
    looked_for: String,
}

#[derive(Template, WebTemplate)]
#[template(path = "migrations/console.html")]
pub struct ConsoleMigrationsPage {
    layout: Layout,
    outcome: Result<Vec<ToolReport>, String>,
}

/// `GET /targets/{target}/migrations`
#[tracing::instrument(skip(state, user))]
pub async fn show_target_migrations(
    State(state): State<AppState>,
    user: CurrentUser,
    Path(name): Path<String>,
) -> AppResult<TargetMigrationsPage> {
    let target = state.targets.get(&name).ok_or(AppError::NotFound)?;
    if target.kind() != TargetKind::Postgres {
        return Err(AppError::bad_request(format!(
            "{name} is a Redis server; migration status is for PostgreSQL targets."
        )));
    }
    let report = migration_status::inspect_target(
        &target,
        &state.config,
        &state.db,
        migration_status::time_limit(&state.config),
    )
    .await;
    Ok(TargetMigrationsPage {
        can_backup: user.has(Role::Operator),
        layout: Layout::load(&state, user, "overview").await?,
        target: name,
        policy: target.policy().as_str(),
        description: target.config.description.clone().unwrap_or_default(),
        configured_dirs: target.config.migrations.len(),
        databases: report.databases,
        looked_for: migration_status::looked_for(),
    })
}

/// `GET /migrations/console`: dbops' own schema migrations.
#[tracing::instrument(skip(state, user))]
pub async fn show_console_migrations(
    State(state): State<AppState>,
    user: CurrentUser,
) -> AppResult<ConsoleMigrationsPage> {
    let outcome =
        migration_status::inspect_console(&state.db, migration_status::time_limit(&state.config))
            .await;
    Ok(ConsoleMigrationsPage {
        layout: Layout::load(&state, user, "overview").await?,
        outcome,
    })
}

fn api_error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// `POST /api/v1/targets/{target}/migrations/deploys` (token scope
/// `migrations:deploy`): a pipeline reports a deploy: `{"outcome": "succeeded" |
/// "failed", "reference": "…", "database": "…", "manifest": {…}}` with the manifest
/// `dbops migrations manifest DIR --tool T` prints.
#[tracing::instrument(skip_all, fields(target = %name))]
pub async fn api_report_deploy(
    State(state): State<AppState>,
    client: Extension<ApiClient>,
    ctx: AuditCtx,
    Path(name): Path<String>,
    body: Result<Json<DeployReport>, JsonRejection>,
) -> Response {
    let target = match state.targets.get(&name) {
        Some(t) if client.may_use(&name) && t.kind() == TargetKind::Postgres => t,
        _ => {
            let _ = audit::record(
                &state.db,
                &ctx,
                Entry::new("migrations.deploy")
                    .target(name.clone())
                    .denied("the token is not for this target, or it is no PostgreSQL target"),
            )
            .await;
            return api_error(
                StatusCode::NOT_FOUND,
                format!("no PostgreSQL target {name} for this token"),
            );
        }
    };
    let input = match body {
        Ok(Json(b)) => b,
        Err(e) => {
            let reason = format!("the body is not a deploy report: {}", e.body_text());
            deploys::record_refusal(&state.db, &ctx, &name, &reason).await;
            return api_error(e.status(), reason);
        }
    };
    let outcome = input.outcome;
    let tool = input.manifest.tool.clone();
    match deploys::report(&state.db, &state.config, &target, &ctx, input).await {
        Ok(r) => (
            StatusCode::CREATED,
            Json(json!({
                "id": r.id,
                "target": name,
                "database": r.database,
                "tool": tool,
                "outcome": outcome.as_str(),
                "snapshot": match &r.snapshot {
                    Ok(n) => json!({ "relations": n }),
                    Err(e) => json!({ "error": e }),
                },
                "url": format!("/targets/{name}/migrations"),
            })),
        )
            .into_response(),
        Err(DeployError::Invalid(reason)) => {
            deploys::record_refusal(&state.db, &ctx, &name, &reason).await;
            api_error(StatusCode::UNPROCESSABLE_ENTITY, reason)
        }
        Err(DeployError::Database(e)) => AppError::from(e).into_response(),
    }
}
